"""LeViT (LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference, Graham et al.
2021).

    model = Model(num_classes=1000, variant="128S")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A convolutional stem (four 3x3 stride-2 convolutions, widths D/8, D/4, D/2, D, each followed by
BatchNorm, Hardswish between them) turns a 224x224 image into a 14x14 map of D channels, then
three stages of residual blocks on its tokens, all linear layers without bias and followed by
BatchNorm (`LinearBN`):

    x + Attention(x),  x + MLP(x),

MLP: `LinearBN` to `mlp_ratio`·D (2), Hardswish, `LinearBN` back. Attention (`LeViTAttention`):
per head, queries and keys of `key_dim` and values of `attn_ratio`·key_dim (2x) from one
`LinearBN`, attended by the op `attention` (the paper's `levit_bias`: softmax of
q·k/√key_dim + B_h[|Δy|, |Δx|], a learned bias per head and absolute offset on the grid; any op
by name, a 2-D op gets the grid), then Hardswish and a `LinearBN` back to D. Between stages the
shrinking attention, not residual: keys and values (4x wide) from every token of the map, queries
from every other row and column (the map subsampled with stride 2), D_in/key_dim heads, the
attention bias B_h[|y_q − y_k|, |x_q − x_k|] at the queries' positions on the full map,
Hardswish and a `LinearBN` to the next stage's width; an MLP residual follows. The head: the
tokens' mean, BatchNorm and a linear classifier; with `distillation` a second such head (the
paper's distillation head, trained against a teacher) and the two heads' mean as the logits.
Residual branches end in BatchNorm scales initialised to 0, as the authors' code. BatchNorm:
PyTorch's eps 1e-5 and momentum 0.9 in Flax's convention, running statistics in `batch_stats`.

Parameter counts (224x224x3 input, 1000 classes, with the distillation head; `jax.eval_shape`)
against the paper's Table 1; every layer's shape is timm's `levit_*` (the authors' code), so the
counts are equal:

| variant | widths          | key_dim | heads      | depths    | parameters | paper |
|---------|-----------------|---------|------------|-----------|------------|-------|
| 128S    | (128, 256, 384) |      16 | (4, 6, 8)  | (2, 3, 4) |  7,777,058 |  7.8M |
| 128     | (128, 256, 384) |      16 | (4, 8, 12) | (4, 4, 4) |  9,213,936 |  9.2M |
| 192     | (192, 288, 384) |      32 | (3, 5, 6)  | (4, 4, 4) | 10,947,069 | 11.0M |
| 256     | (256, 384, 512) |      32 | (4, 6, 8)  | (4, 4, 4) | 18,893,876 | 18.9M |
| 384     | (384, 512, 768) |      32 | (6, 9, 12) | (4, 4, 4) | 39,128,836 | 39.1M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.layers import batch_norm
from big_attn.layers.attention import Attention, learned_op_args
from big_attn.models import common
from big_attn.models import mobilevit
from big_attn.ops import checks
from big_attn.ops import spatial
from big_attn.ops.softmax import dot_product_attention

# widths, key_dim, num_heads, depths (the paper's Table 1).
_SIZES = {
    "128S": ((128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "128": ((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "192": ((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "256": ((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "384": ((384, 512, 768), 32, (6, 9, 12), (4, 4, 4)),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"LeViT-128S" (or "128S") -> dict(widths=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8),
  depths=(2, 3, 4)). Sizes: 128S, 128, 192, 256, 384."""
  size = variant[len("LeViT-"):] if isinstance(variant, str) and variant.startswith(
      "LeViT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown LeViT variant {variant!r}; expected LeViT-SIZE or SIZE with SIZE "
                     f"in {', '.join(_SIZES)}")
  widths, key_dim, heads, depths = _SIZES[size]
  return dict(widths=widths, key_dim=key_dim, num_heads=heads, depths=depths)


def subsampled_grid(grid: tuple[int, int], stride: int = 2) -> tuple[int, int]:
  """The grid of every `stride`-th row and column of `grid` (ceil(h / stride), ...)."""
  return tuple((side - 1) // stride + 1 for side in grid)


def shrink_bias(table, grid: tuple[int, int], stride: int):
  """`[num_heads, q_len, kv_len]` bias B_h[|y_q − y_k|, |x_q − x_k|] of a `[num_heads, h, w]`
  table, for queries at every `stride`-th row and column of the `grid=(h, w)` keys."""
  h, w = grid
  qy, qx = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
  ky, kx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  dy = np.abs(qy.reshape(-1, 1) - ky.reshape(1, -1))
  dx = np.abs(qx.reshape(-1, 1) - kx.reshape(1, -1))
  return table[:, dy, dx]


class LinearBN(nn.Module):
  """A linear layer without bias, then BatchNorm over the batch and token axes (`zero_scale`:
  its scale starts at 0)."""
  features: int
  zero_scale: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="linear", kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
    return batch_norm(not train, self.dtype, self.param_dtype, "norm", epsilon=1e-5,
                      momentum=0.9, zero_scale=self.zero_scale)(x)


class MLP(nn.Module):
  """LeViT's MLP: `LinearBN` to `hidden`, Hardswish, `LinearBN` back (scale starting at 0)."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = jax.nn.hard_swish(LinearBN(self.hidden, name="expand", **kw)(x, train))
    return LinearBN(x.shape[-1], zero_scale=True, name="project", **kw)(y, train)


class LeViTAttention(nn.Module):
  """LeViT's attention on `[batch, h·w, width]` tokens of a `grid=(h, w)` map -> `[batch,
  tokens', features]` (see the module docstring).

  `stride` 1: queries, keys and values (`key_dim`, `key_dim`, `value_dim` per head) from one
  `LinearBN`, the op `attention` by name (its learned arguments by `learned_op_args`, the call
  through `Attention.attend`). `stride` 2: the shrinking attention, queries from the map
  subsampled with `stride` and softmax attention with LeViT's bias at their positions
  (`shrink_bias`), whatever `attention` is. Then Hardswish and a `LinearBN` to `features`
  (its scale starting at 0 when `stride` is 1, a residual branch).
  """
  num_heads: int
  key_dim: int
  value_dim: int
  features: int
  stride: int = 1
  attention: str = "levit_bias"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int], train: bool = False):
    (b, t, width), h, kd, vd = x.shape, self.num_heads, self.key_dim, self.value_dim
    if t != grid[0] * grid[1]:
      raise ValueError(f"LeViTAttention: {t} tokens are not the grid {grid}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.stride == 1:
      qkv = LinearBN(h * (2 * kd + vd), name="qkv", **kw)(x, train).reshape(b, t, h, -1)
      query, key, value = jnp.split(qkv, [kd, 2 * kd], axis=-1)
      op_args = learned_op_args(self.attention,
                                spatial.op_args(self.attention, self.attention_args, grid),
                                self.attention_impl, x, query, key, value, **kw)
      out = Attention(num_heads=h, op=self.attention, name="attention_op").attend(
          query, key, value, op_args=op_args)
    else:
      kv = LinearBN(h * (kd + vd), name="kv", **kw)(x, train).reshape(b, t, h, -1)
      key, value = jnp.split(kv, [kd], axis=-1)
      queries = x.reshape(b, *grid, width)[:, ::self.stride, ::self.stride]
      query = LinearBN(h * kd, name="query", **kw)(queries.reshape(b, -1, width), train)
      table = self.param("attention_bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("heads", None, None)), (h, *grid), self.param_dtype)
      bias = shrink_bias(jnp.asarray(table, jnp.float32), grid, self.stride)
      out = dot_product_attention(query.reshape(b, -1, h, kd), key, value, bias=bias[None],
                                  implementation="xla")
    out = jax.nn.hard_swish(out.reshape(b, -1, h * vd))
    return LinearBN(self.features, zero_scale=self.stride == 1, name="out", **kw)(out, train)


class Model(nn.Module):
  """LeViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the tokens' mean `[batch, width]`.
    variant: size name for `decode_variant` ("LeViT-128S" or "128S"); explicit fields override
      it.
    widths, num_heads, depths: of the stages (equal lengths); the shrinking attention before
      stage i > 0 has widths[i − 1] / key_dim heads.
    key_dim: query and key width per head.
    attn_ratio: value width over key_dim in the blocks (2); shrink_attn_ratio: in the shrinking
      attention (4).
    mlp_ratio: MLP width over the stage width (2).
    patch_size: the stem's stride, a power of two >= 2 (16: four stride-2 convolutions).
    distillation: a second (distillation) head; the logits are the two heads' mean.
    attention: registry name of the blocks' op (`levit_bias`, the paper's); attention_args its
      arguments; attention_impl its `implementation`. A 2-D op gets the stage's grid. An op
      that needs values as wide as its queries and keys (`spatial.EQUAL_WIDTH_OPS`) is refused
      (`spatial.OpRefused`) unless attn_ratio is 1.
    dtype: compute dtype; param_dtype: parameter dtype.
  BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  widths: tuple[int, ...] | None = None
  key_dim: int | None = None
  num_heads: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  attn_ratio: int = 2
  shrink_attn_ratio: int = 4
  mlp_ratio: int = 2
  patch_size: int = 16
  distillation: bool = False
  attention: str = "levit_bias"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant,
                           required=("widths", "key_dim", "num_heads", "depths"))
    super().__post_init__()

  def _check(self, images):
    stages = len(self.widths)
    for name in ("widths", "num_heads", "depths"):
      checks.int_tuple(name, getattr(self, name), stages, allow_int=False)
    for name in ("key_dim", "attn_ratio", "shrink_attn_ratio", "mlp_ratio", "patch_size"):
      checks.positive_int(name, getattr(self, name))
    if not isinstance(self.distillation, bool):
      raise TypeError(f"distillation must be a bool, got {self.distillation!r}")
    common.stride_two_convs(self.patch_size)
    if self.widths[0] % (self.patch_size // 2):
      raise ValueError(f"widths[0] ({self.widths[0]}) must be divisible by patch_size / 2 "
                       f"({self.patch_size // 2}), the stem's first width divisor")
    if any(width % self.key_dim for width in self.widths[:-1]):
      raise ValueError(f"widths {self.widths[:-1]} (all but the last) must be divisible by "
                       f"key_dim {self.key_dim}: the shrinking attention has width / key_dim "
                       "heads")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    common.check_images(images, self.patch_size)
    spatial.check_op(self.attention, "LeViT", wide_values=self.attn_ratio != 1)

  def _head(self, x, train, name):
    """BatchNorm, then the linear classifier."""
    x = batch_norm(not train, self.dtype, self.param_dtype, f"{name}_norm", epsilon=1e-5,
                   momentum=0.9)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "classes")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("classes",)))(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.asarray(images, self.dtype)
    convs = common.stride_two_convs(self.patch_size)
    for i in range(convs):
      x = mobilevit.ConvBN(self.widths[0] >> (convs - 1 - i), 3, 2, act=False,
                           name=f"stem_{i}", **kw)(x, train)
      x = jax.nn.hard_swish(x) if i < convs - 1 else x
    b, h, w, _ = x.shape
    grid, x = (h, w), x.reshape(b, h * w, -1)
    attention = dict(attention=self.attention, attention_args=self.attention_args,
                     attention_impl=self.attention_impl, **kw)
    for stage, (width, heads, depth) in enumerate(zip(self.widths, self.num_heads,
                                                      self.depths)):
      if stage:
        x = LeViTAttention(x.shape[-1] // self.key_dim, self.key_dim,
                           self.shrink_attn_ratio * self.key_dim, width, stride=2,
                           name=f"shrink_{stage}", **attention)(x, grid, train)
        grid = subsampled_grid(grid)
        x = x + MLP(self.mlp_ratio * width, name=f"shrink_{stage}_mlp", **kw)(x, train)
      for i in range(depth):
        name = f"stage_{stage}_block_{i}"
        x = x + LeViTAttention(heads, self.key_dim, self.attn_ratio * self.key_dim, width,
                               name=f"{name}_attention", **attention)(x, grid, train)
        x = x + MLP(self.mlp_ratio * width, name=f"{name}_mlp", **kw)(x, train)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      logits = self._head(x, train, "head")
      x = (logits + self._head(x, train, "head_dist")) / 2 if self.distillation else logits
    return x.astype(jnp.float32)
