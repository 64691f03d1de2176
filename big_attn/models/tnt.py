"""TNT (Transformer in Transformer, Han et al. 2021).

    model = Model(num_classes=1000, variant="TNT-S", attention="softmax")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

The image is cut into 16x16 patches ("visual sentences"); `pixel_embed` embeds each patch on
its own into a 4x4 grid of "visual words" of `inner_width` channels (a 7x7 convolution with
stride 4 and zero padding 3 inside the patch) plus a learned position embedding of that grid.
The patch tokens start as LN(Dense(LN(flattened words))), with a class token and a learned
position embedding of the patch grid. Each of the `depth` TNT blocks then runs

    words   <- InnerBlock(words)                      (within each patch, `inner_attention`)
    patches <- patches + LN(W · LN(flatten(words)))   (the class token unchanged)
    tokens  <- OuterBlock([cls, patches])             (`attention`)

where both blocks are ViT's pre-LayerNorm blocks (`big_attn.models.vit.Encoder1DBlock`, any
attention op by name; a 2-D op gets the 4x4 word grid inside, the patch grid and the class
token as an extra token outside). The final LayerNorm'd class token is classified. Both
projections W are without bias (timm's layout; the first, before the blocks, has one).

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table 1; timm's `tnt_s_patch16_224` / `tnt_b_patch16_224`
count 23,768,584 / 65,428,680 (ours has query/key/value biases, 1,224 / 2,040 per block,
and no position embedding of the class token):

| variant | width | inner width | depth | heads (outer, inner) | parameters | paper |
|---------|-------|-------------|-------|----------------------|------------|-------|
| TNT-S   |   384 |          24 |    12 |               (6, 4) | 23,782,888 | 23.8M |
| TNT-B   |   640 |          40 |    12 |              (10, 4) | 65,452,520 | 65.6M |
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import PositionEmbedding, layer_norm
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

_SIZES = {"S": (384, 24, 6), "B": (640, 40, 10)}  # width, inner_width, heads (depth 12)
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"TNT-S" (or "S") -> dict(width=384, inner_width=24, num_heads=6, depth=12).

  Sizes: S, B."""
  size = variant[4:] if isinstance(variant, str) and variant.startswith("TNT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown TNT variant {variant!r}; expected TNT-S or TNT-B (or S, B)")
  width, inner_width, heads = _SIZES[size]
  return dict(width=width, inner_width=inner_width, num_heads=heads, depth=12)


def word_grid(patch_size: int, stride: int) -> tuple[int, int]:
  """The grid of words `pixel_embed` makes of one patch: ceil(patch_size / stride) a side."""
  side = math.ceil(patch_size / stride)
  return side, side


class PixelEmbed(nn.Module):
  """`[b, H, W, C]` images -> (`[b·h·w, words, features]` words, the patch grid `(h, w)`):
  each `patch_size` patch (row-major) is, on its own, convolved with a 7x7 kernel at `stride`
  with zero padding 3 (with bias), its `word_grid` of outputs flattened row-major."""
  features: int
  patch_size: int = 16
  stride: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    n, height, width, c = images.shape
    p = self.patch_size
    h, w = height // p, width // p
    patches = jnp.reshape(images, (n, h, p, w, p, c)).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Conv(self.features, (7, 7), strides=(self.stride,) * 2, padding=((3, 3), (3, 3)),
                dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(),
                    ("patch_h", "patch_w", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
                )(jnp.reshape(jnp.asarray(patches, self.dtype), (n * h * w, p, p, c)))
    return jnp.reshape(x, (n * h * w, -1, self.features)), (h, w)


class Model(nn.Module):
  """TNT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, width]`.
    variant: size name for `decode_variant` ("TNT-S" or "S"); explicit fields override it.
    width, depth, num_heads: the outer transformer (patch tokens).
    inner_width, inner_heads: the inner transformer (words; 4 heads).
    patch_size: the patches (16); pixel_stride: the word convolution's stride (4: 4x4 words).
    mlp_ratio, inner_mlp_ratio: MLP widths over the outer and inner widths (4, 4).
    posemb: "learn" (the paper's) or "sincos2d", for the words and the patches.
    attention: registry name of the outer attention op; attention_args its keyword
      arguments; attention_impl its `implementation`. A 2-D op gets the patch `grid` and the
      class token as `extra_tokens` (`big_attn.ops.spatial`).
    inner_attention: registry name of the inner attention op ("softmax"); inner_attention_args
      its arguments. A 2-D op gets the word grid of each patch.
    qk_norm: as in `big_attn.layers.Attention`.
    dropout: rate after the embeddings and inside every block.
    norm_eps: every LayerNorm's eps (1e-6).
    approximate_gelu: tanh-approximate GELU (True); False: exact, the authors'.
    head_zeroinit: zero-initialised classifier head.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  inner_width: int | None = None
  inner_heads: int = 4
  patch_size: int = 16
  pixel_stride: int = 4
  mlp_ratio: int = 4
  inner_mlp_ratio: int = 4
  posemb: str = "learn"
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  inner_attention: str = "softmax"
  inner_attention_args: Any = None
  qk_norm: bool = False
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant,
                           required=("width", "depth", "num_heads", "inner_width"))
    super().__post_init__()

  def _check(self, images):
    for name in ("width", "depth", "num_heads", "inner_width", "inner_heads", "patch_size",
                 "pixel_stride", "mlp_ratio", "inner_mlp_ratio"):
      checks.positive_int(name, getattr(self, name))
    for name in ("attention_args", "inner_attention_args"):
      value = getattr(self, name)
      if value is not None and not hasattr(value, "keys"):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f"image size {images.shape[1:3]} must be divisible by patch_size "
                       f"{self.patch_size}")
    spatial.check_op(self.attention, "TNT")
    spatial.check_op(self.inner_attention, "TNT inner transformer")

  def _block_args(self, heads, width, mlp_ratio, op, op_args, grid, extra, impl=None):
    return dict(num_heads=heads, mlp_dim=mlp_ratio * width, attention=op,
                attention_args=spatial.op_args(op, op_args, grid, extra), attention_impl=impl,
                qk_norm=self.qk_norm, dropout=self.dropout, norm_eps=self.norm_eps,
                approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def _words_to_patches(self, words, n, name, use_bias):
    """LN, then Dense to `width`, of each patch's flattened words: `[n, patches, width]`."""
    flat = jnp.reshape(words, (n, -1, words.shape[1] * words.shape[2]))
    return nn.Dense(self.width, use_bias=use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"{name}_proj",
                    kernel_init=nn.with_logical_partitioning(_INIT, ("channels_in", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)))(
        layer_norm(self.dtype, self.param_dtype, f"{name}_norm1", epsilon=self.norm_eps)(flat))

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    deterministic = not train
    n = images.shape[0]
    words, grid = PixelEmbed(self.inner_width, self.patch_size, self.pixel_stride,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="pixel_embed")(images)
    inner_grid = word_grid(self.patch_size, self.pixel_stride)
    words = words + PositionEmbedding(self.posemb, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name="pixel_posemb")(
                                          inner_grid, self.inner_width)[None]
    patches = layer_norm(self.dtype, self.param_dtype, "patch_embed_norm2",
                         epsilon=self.norm_eps)(
                             self._words_to_patches(words, n, "patch_embed", True))
    patches = patches + PositionEmbedding(self.posemb, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name="posemb")(
                                              grid, self.width)[None]
    cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")),
                     (1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None],
                                          (n, 1, self.width)), patches], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    words = nn.Dropout(rate=self.dropout)(words, deterministic)

    inner_args = self._block_args(self.inner_heads, self.inner_width, self.inner_mlp_ratio,
                                  self.inner_attention, self.inner_attention_args, inner_grid, 0)
    outer_args = self._block_args(self.num_heads, self.width, self.mlp_ratio, self.attention,
                                  self.attention_args, grid, 1, self.attention_impl)
    for i in range(self.depth):
      words, _ = vit.Encoder1DBlock(name=f"inner_{i}", **inner_args)(words, deterministic)
      added = layer_norm(self.dtype, self.param_dtype, f"block_{i}_norm2",
                         epsilon=self.norm_eps)(
                             self._words_to_patches(words, n, f"block_{i}", False))
      x = jnp.concatenate([x[:, :1], x[:, 1:] + added], axis=1)
      x, _ = vit.Encoder1DBlock(name=f"outer_{i}", **outer_args)(x, deterministic)

    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=self.norm_eps)(x[:, 0])
    if self.num_classes:
      kernel_init = nn.initializers.zeros_init() if self.head_zeroinit else _INIT
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
