"""PiT (Rethinking Spatial Dimensions of Vision Transformers, Heo et al. 2021).

    model = Model(num_classes=1000, variant="S", attention="softmax")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

A ViT whose token grid shrinks and width grows between stages, as in a ResNet. The image is
embedded by an overlapping strided convolution (`patch_size` 16 with stride 8; PiT-B 14 with
stride 7: a 27x27 or 31x31 grid at 224x224) plus a learned position embedding of the grid, and
a class token is prepended. Each stage is ViT's pre-LayerNorm blocks
(`big_attn.models.vit.Encoder`, any attention op by name; a 2-D op gets the stage's grid and
the class token as an extra token). Between stages a `Pooling` layer halves the grid and
doubles the width (stage widths `base_dim · heads`):

    patches: depthwise convolution, kernel 3, stride 2, padding 1, channel multiplier 2,
    class token: a Dense layer to the new width.

The final LayerNorm'd class token is classified.

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table 2 (timm's `pit_*_224`, the authors' code, counts
4,847,272 / 10,618,888 / 23,461,912 / 73,764,840):

| variant | base_dim | heads      | depths    | patch/stride | parameters | paper |
|---------|----------|------------|-----------|--------------|------------|-------|
| Ti      |       32 | (2, 4, 8)  | (2, 6, 4) |   16/8       |  4,847,272 |  4.9M |
| XS      |       48 | (2, 4, 8)  | (2, 6, 4) |   16/8       | 10,618,888 | 10.6M |
| S       |       48 | (3, 6, 12) | (2, 6, 4) |   16/8       | 23,461,912 | 23.5M |
| B       |       64 | (4, 8, 16) | (3, 6, 4) |   14/7       | 73,764,840 | 73.8M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import PositionEmbedding, layer_norm
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

_SIZES = {  # base_dim, num_heads, depths, patch_size, patch_stride (the paper's Table 2)
    "Ti": (32, (2, 4, 8), (2, 6, 4), 16, 8),
    "XS": (48, (2, 4, 8), (2, 6, 4), 16, 8),
    "S": (48, (3, 6, 12), (2, 6, 4), 16, 8),
    "B": (64, (4, 8, 16), (3, 6, 4), 14, 7),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"PiT-S" (or "S") -> dict(base_dim=48, num_heads=(3, 6, 12), depths=(2, 6, 4),
  patch_size=16, patch_stride=8). Sizes: Ti, XS, S, B."""
  size = variant[4:] if isinstance(variant, str) and variant.startswith("PiT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown PiT variant {variant!r}; expected PiT-SIZE or SIZE with SIZE in "
                     f"{', '.join(_SIZES)}")
  base_dim, heads, depths, patch, stride = _SIZES[size]
  return dict(base_dim=base_dim, num_heads=heads, depths=depths, patch_size=patch,
              patch_stride=stride)


def pooled_grid(grid: tuple[int, int], stride: int) -> tuple[int, int]:
  """The grid after `Pooling` (kernel stride + 1, padding stride // 2)."""
  return tuple((s + 2 * (stride // 2) - (stride + 1)) // stride + 1 for s in grid)


class Pooling(nn.Module):
  """PiT's pooling layer: `[batch, prefix + h·w, width]` tokens on a `grid=(h, w)` -> `[batch,
  prefix + h'·w', features]` on `pooled_grid(grid, stride)`.

  The patch tokens, as an image, go through a depthwise convolution (`width` groups, each
  giving `features / width` channels) with kernel `stride + 1`, stride `stride` and zero
  padding `stride // 2`, with bias; the first `prefix` tokens (the class token) through a
  Dense layer to `features`.
  """
  features: int
  stride: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int], prefix: int = 1):
    (h, w), n, width = grid, x.shape[0], x.shape[-1]
    if self.features % width:
      raise ValueError(f"Pooling: features ({self.features}) must be a multiple of the width "
                       f"({width}) for its depthwise convolution")
    if x.shape[1] != prefix + h * w:
      raise ValueError(f"Pooling: {x.shape[1]} tokens are not {prefix} + the grid {grid}")
    k, pad = self.stride + 1, self.stride // 2
    patches = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride),
                      padding=((pad, pad), (pad, pad)), feature_group_count=width,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
                      kernel_init=nn.with_logical_partitioning(
                          _INIT, ("conv_height", "conv_width", None, "embed")),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("embed",))
                      )(jnp.reshape(x[:, prefix:], (n, h, w, width)))
    tokens = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc",
                      kernel_init=nn.with_logical_partitioning(_INIT, ("channels_in", "embed")),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("embed",)))(x[:, :prefix])
    return jnp.concatenate([tokens, jnp.reshape(patches, (n, -1, self.features))], axis=1)


class Model(nn.Module):
  """PiT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, width]`.
    variant: size name for `decode_variant` ("PiT-S" or "S"); explicit fields override it.
    base_dim: width per head; stage i is `base_dim · num_heads[i]` wide.
    num_heads, depths: heads and blocks of each stage (equal lengths).
    patch_size, patch_stride: the embedding convolution (no padding).
    mlp_ratio: MLP width over the stage width (4).
    posemb: "learn" (the paper's) or "sincos2d", on the embedded grid.
    attention: registry name of the attention op (`big_attn.ops.names()`); attention_args its
      keyword arguments; attention_impl its `implementation`. A 2-D op gets each stage's
      `grid` and the class token as `extra_tokens` (`big_attn.ops.spatial`).
    qk_norm: as in `big_attn.layers.Attention`.
    dropout: rate after the embedding and inside every block.
    norm_eps: every LayerNorm's eps (1e-6, timm's).
    approximate_gelu: tanh-approximate GELU (True); False: exact, the authors' `nn.GELU()`.
    head_zeroinit: zero-initialised classifier head.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  base_dim: int | None = None
  num_heads: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  patch_size: int | None = None
  patch_stride: int | None = None
  mlp_ratio: int = 4
  posemb: str = "learn"
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("base_dim", "num_heads", "depths"),
                           defaults=dict(patch_size=16, patch_stride=8))
    super().__post_init__()

  def _check(self, images):
    checks.positive_int("base_dim", self.base_dim)
    checks.positive_int("patch_size", self.patch_size)
    checks.positive_int("patch_stride", self.patch_stride)
    checks.positive_int("mlp_ratio", self.mlp_ratio)
    stages = len(self.num_heads)
    if len(self.depths) != stages:
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have one "
                       "entry per stage each")
    checks.int_tuple("num_heads", self.num_heads, stages, allow_int=False)
    checks.int_tuple("depths", self.depths, stages, allow_int=False)
    if any(b % a for a, b in zip(self.num_heads, self.num_heads[1:])):
      raise ValueError(f"num_heads {self.num_heads}: each stage's heads must be a multiple of "
                       "the previous stage's (the pooling is depthwise)")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if min(images.shape[1:3]) < self.patch_size:
      raise ValueError(f"images {images.shape[1:3]} are smaller than patch_size "
                       f"{self.patch_size}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    spatial.check_op(self.attention, "PiT")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    deterministic = not train
    widths = [self.base_dim * heads for heads in self.num_heads]
    x = nn.Conv(widths[0], (self.patch_size,) * 2, strides=(self.patch_stride,) * 2,
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="embedding",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(),
                    ("patch_h", "patch_w", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
                )(jnp.asarray(images, self.dtype))
    n, h, w, _ = x.shape
    x = jnp.reshape(x, (n, h * w, widths[0])) + PositionEmbedding(
        self.posemb, dtype=self.dtype, param_dtype=self.param_dtype, name="posemb")(
            (h, w), widths[0])[None]
    cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")),
                     (1, widths[0]), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None],
                                          (n, 1, widths[0])), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)

    grid = (h, w)
    for stage, (width, heads, depth) in enumerate(zip(widths, self.num_heads, self.depths)):
      if stage:
        x = Pooling(width, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"pool_{stage}")(x, grid)
        grid = pooled_grid(grid, 2)
      block_args = dict(num_heads=heads, mlp_dim=self.mlp_ratio * width,
                        attention=self.attention,
                        attention_args=spatial.op_args(self.attention, self.attention_args,
                                                       grid, 1),
                        attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                        dropout=self.dropout, norm_eps=self.norm_eps,
                        approximate_gelu=self.approximate_gelu)
      x = vit.Encoder(depth=depth, block_args=block_args, final_norm=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"stage_{stage}")(x, deterministic)

    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=self.norm_eps)(x[:, 0])
    if self.num_classes:
      kernel_init = nn.initializers.zeros_init() if self.head_zeroinit else _INIT
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
