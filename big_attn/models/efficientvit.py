"""EfficientViT (EfficientViT: Memory Efficient Vision Transformer with Cascaded Group
Attention, Liu et al. 2023).

    model = Model(num_classes=1000, variant="M4")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

An overlapping patch embedding (four 3x3 stride-2 convolutions, widths d/8, d/4, d/2, d, each
with BatchNorm, ReLU between) gives a 14x14 map at 224x224, then three stages of sandwich
blocks, all residual on the map:

    x + DW(x),  x + FFN(x),  x + CGA(x),  x + DW(x),  x + FFN(x),

DW a depthwise 3x3 convolution (token interaction), FFN 1x1 convolutions d -> 2d -> d with ReLU,
every convolution followed by BatchNorm. CGA is the cascaded group attention of the
`cascaded_group_attention` op (`attention`; any op by name, a 2-D op gets the window's grid):
head j projects its own d/h channels X_j to queries and keys of `key_dim` and values of d/h;
with the op, the previous head's output joins its input (X_j + õ_{j−1}, the op's cascade maps
being head j's own projections, as the paper) and its queries go through a depthwise
`kernel_size` convolution; the heads' outputs, concatenated, pass a ReLU and a linear layer.
Maps wider than `window_size` (7) attend within windows (zero padded). Between stages an
EfficientViT subsample block: DW and FFN residuals, then 1x1 to 4d (BN, ReLU), depthwise 3x3
stride 2 (BN, ReLU), squeeze-and-excitation (ratio 1/4), 1x1 to the next width (BN), then DW
and FFN residuals at the new width. The head: global average pooling, BatchNorm, a linear
layer. BatchNorm: PyTorch's eps 1e-5 and momentum 0.9 in Flax's convention; running statistics
in `batch_stats`.

Parameter counts (224x224x3 input, 1000 classes; `jax.eval_shape`) against the paper's
Table 1 (the authors' code also has per-head kernels (7, 5, 3, 3) in M1, M2, M4, M5 where one
`kernel_size` 5 is used here, BatchNorm after each head's projection where a bias is, and a
relative position bias per head that the op has not):

| variant | widths          | depths    | heads     | parameters | paper |
|---------|-----------------|-----------|-----------|------------|-------|
| M0      | (64, 128, 192)  | (1, 2, 3) | (4, 4, 4) |  2,345,328 |  2.3M |
| M1      | (128, 144, 192) | (1, 2, 3) | (2, 3, 3) |  2,975,928 |  3.0M |
| M2      | (128, 192, 224) | (1, 2, 3) | (4, 3, 2) |  4,182,296 |  4.2M |
| M3      | (128, 240, 320) | (1, 2, 3) | (4, 3, 4) |  6,895,496 |  6.9M |
| M4      | (128, 256, 384) | (1, 2, 3) | (4, 4, 4) |  8,799,096 |  8.8M |
| M5      | (192, 288, 384) | (1, 3, 4) | (3, 3, 4) | 12,465,952 | 12.4M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import batch_norm
from big_attn.layers.attention import Attention, learned_op_args
from big_attn.models import common
from big_attn.models import mobilevit
from big_attn.ops import checks
from big_attn.ops import efficient
from big_attn.ops import spatial
from big_attn.ops import windowed

# widths, depths, heads (the paper's Table 1; key_dim 16 and window 7 throughout).
_SIZES = {
    "M0": ((64, 128, 192), (1, 2, 3), (4, 4, 4)),
    "M1": ((128, 144, 192), (1, 2, 3), (2, 3, 3)),
    "M2": ((128, 192, 224), (1, 2, 3), (4, 3, 2)),
    "M3": ((128, 240, 320), (1, 2, 3), (4, 3, 4)),
    "M4": ((128, 256, 384), (1, 2, 3), (4, 4, 4)),
    "M5": ((192, 288, 384), (1, 3, 4), (3, 3, 4)),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"EfficientViT-M4" (or "M4") -> dict(widths=(128, 256, 384), depths=(1, 2, 3),
  num_heads=(4, 4, 4)). Sizes: M0 ... M5."""
  size = (variant[len("EfficientViT-"):] if isinstance(variant, str)
          and variant.startswith("EfficientViT-") else variant)
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown EfficientViT variant {variant!r}; expected EfficientViT-SIZE or "
                     f"SIZE with SIZE in {', '.join(_SIZES)}")
  widths, depths, heads = _SIZES[size]
  return dict(widths=widths, depths=depths, num_heads=heads)


class CascadedGroupAttention(nn.Module):
  """EfficientViT's attention on `[batch, tokens, width]` tokens of a `grid=(h, w)` map (see the
  module docstring): per-head projections of the head's channel group, the op by name (its
  learned arguments by `learned_op_args`, the call through `Attention.attend`, which the
  interpretability hooks see), ReLU and a linear layer back to `width`."""
  num_heads: int
  key_dim: int = 16
  kernel_size: int = 5
  attention: str = "cascaded_group_attention"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    (b, t, width), h, kd = x.shape, self.num_heads, self.key_dim
    if width % h:
      raise ValueError(f"width {width} must be divisible by num_heads {h}")
    dv = width // h

    def project(name, features):
      kernel = self.param(f"{name}_kernel", nn.with_logical_partitioning(
          _INIT, ("heads", None, "head_dim")), (h, dv, features), self.param_dtype)
      bias = self.param(f"{name}_bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("heads", "head_dim")), (h, features), self.param_dtype)
      kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
      return jnp.einsum("bthc,hcd->bthd", x.reshape(b, t, h, dv).astype(kernel.dtype),
                        kernel) + bias, kernel

    (query, wq), (key, wk), (value, wv) = (project("query", kd), project("key", kd),
                                           project("value", dv))
    op_args = spatial.op_args(self.attention, self.attention_args, grid)
    if self.attention == "cascaded_group_attention":  # the cascade through each head's maps
      k = self.kernel_size
      conv = self.param("query_conv", nn.with_logical_partitioning(
          efficient.centred_delta(2), ("conv_height", "conv_width", "heads", "head_dim")),
                        (k, k, h, kd), self.param_dtype)
      op_args = dict(op_args or {}, cascade_query=wq[1:], cascade_key=wk[1:],
                     cascade_value=wv[1:], query_conv=jnp.asarray(conv, self.dtype))
      if self.attention_impl is not None:
        op_args["implementation"] = self.attention_impl
    else:
      op_args = learned_op_args(self.attention, op_args, self.attention_impl, x, query, key,
                                value, dtype=self.dtype, param_dtype=self.param_dtype)
    # The op through the one method every attention layer calls it with (interpret sees it).
    out = Attention(num_heads=h, op=self.attention, name="attention_op").attend(
        query, key, value, op_args=op_args)
    out = nn.relu(out.reshape(b, t, -1))
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="out",
                    kernel_init=nn.with_logical_partitioning(_INIT, ("mlp", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)))(out)


class Model(nn.Module):
  """EfficientViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled, normalised features `[batch, width]`.
    variant: size name for `decode_variant` ("EfficientViT-M4" or "M4"); explicit fields
      override it.
    widths, depths, num_heads: of the three stages.
    key_dim: query and key width per head (16).
    kernel_size: the cascaded op's depthwise query convolution (5).
    window_size: maps wider than this attend within windows of it (7).
    patch_size: the embedding's stride, a power of two >= 2 (16: four stride-2 convolutions);
      image sides must be divisible by it.
    attention: registry name of the op (`cascaded_group_attention`, the paper's);
      attention_args its arguments; attention_impl its `implementation`. A 2-D op gets the
      window's grid. An op that needs values as wide as its queries and keys
      (`spatial.EQUAL_WIDTH_OPS`) is refused (`spatial.OpRefused`) unless every stage's
      width / num_heads equals `key_dim`.
    dtype: compute dtype; param_dtype: parameter dtype.
  BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  widths: tuple[int, int, int] | None = None
  depths: tuple[int, int, int] | None = None
  num_heads: tuple[int, int, int] | None = None
  key_dim: int = 16
  kernel_size: int = 5
  window_size: int = 7
  patch_size: int = 16
  attention: str = "cascaded_group_attention"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("widths", "depths", "num_heads"))
    super().__post_init__()

  def _check(self, images):
    for name in ("widths", "depths", "num_heads"):
      checks.int_tuple(name, getattr(self, name), 3, allow_int=False)
    for name in ("key_dim", "kernel_size", "window_size", "patch_size"):
      checks.positive_int(name, getattr(self, name))
    common.stride_two_convs(self.patch_size)
    if any(w % h for w, h in zip(self.widths, self.num_heads)):
      raise ValueError(f"widths {self.widths} must be divisible by num_heads {self.num_heads}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if any(side % self.patch_size for side in images.shape[1:3]):
      raise ValueError(f"image size {images.shape[1:3]} must be divisible by patch_size "
                       f"{self.patch_size}")
    spatial.check_op(self.attention, "EfficientViT", wide_values=any(
        w // h != self.key_dim for w, h in zip(self.widths, self.num_heads)))

  def _conv(self, features, kernel=1, strides=1, groups=1, name=None):
    """Convolution without bias, then BatchNorm (MobileViT's, without its activation)."""
    return mobilevit.ConvBN(features, kernel, strides, groups, act=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

  def _residuals(self, x, name, train):
    """x + DW(x), then x + FFN(x) (the sandwich's outer layers)."""
    c = x.shape[-1]
    x = x + self._conv(c, 3, groups=c, name=f"{name}_dw")(x, train)
    y = nn.relu(self._conv(2 * c, name=f"{name}_ffn_0")(x, train))
    return x + self._conv(c, name=f"{name}_ffn_1")(y, train)

  def _attend(self, x, stage, name):
    """x + CGA(x), within windows of `window_size` where the map is wider (zero padded)."""
    b, h, w, c = x.shape
    size = (min(self.window_size, h), min(self.window_size, w))
    ph, pw = -h % size[0], -w % size[1]
    y = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    grid = (h + ph, w + pw)
    y = windowed.to_groups(y.reshape(b, -1, c), grid, size, dilated=False)
    groups = y.shape[1]
    y = CascadedGroupAttention(
        num_heads=self.num_heads[stage], key_dim=self.key_dim, kernel_size=self.kernel_size,
        attention=self.attention, attention_args=self.attention_args,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)(y.reshape(b * groups, -1, c), size)
    y = windowed.from_groups(y.reshape(b, groups, -1, c), grid, size, dilated=False)
    return x + y.reshape(b, *grid, c)[:, :h, :w]

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    x = jnp.asarray(images, self.dtype)
    convs = common.stride_two_convs(self.patch_size)
    for i in range(convs):
      x = self._conv(self.widths[0] >> (convs - 1 - i), 3, 2, name=f"stem_{i}")(x, train)
      x = nn.relu(x) if i < convs - 1 else x
    for stage, (width, depth) in enumerate(zip(self.widths, self.depths)):
      if stage:  # the subsample block
        name = f"subsample_{stage}"
        x = self._residuals(x, f"{name}_pre", train)
        hidden = 4 * x.shape[-1]
        x = nn.relu(self._conv(hidden, name=f"{name}_expand")(x, train))
        x = nn.relu(self._conv(hidden, 3, 2, groups=hidden, name=f"{name}_dw")(x, train))
        se = lambda features, suffix: nn.Conv(  # pylint: disable=g-long-lambda
            features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            name=f"{name}_se_{suffix}",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.kaiming_normal(),
                ("conv_height", "conv_width", "channels_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
        gate = nn.relu(se(hidden // 4, "reduce")(jnp.mean(x, axis=(1, 2), keepdims=True)))
        x = x * nn.sigmoid(se(hidden, "expand")(gate))
        x = self._conv(width, name=f"{name}_project")(x, train)
        x = self._residuals(x, f"{name}_post", train)
      for i in range(depth):
        name = f"stage_{stage}_block_{i}"
        x = self._residuals(x, f"{name}_pre", train)
        x = self._attend(x, stage, f"{name}_attention")
        x = self._residuals(x, f"{name}_post", train)
    x = batch_norm(not train, self.dtype, self.param_dtype, "head_norm", epsilon=1e-5,
                   momentum=0.9)(jnp.mean(x, axis=(1, 2)))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head",
                   kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
