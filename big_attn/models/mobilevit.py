"""MobileViT (MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer).

    model = Model(num_classes=1000, variant="S", attention="softmax")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A 3x3 stride-2 stem (16 channels), then five layers: MobileNetV2 inverted residuals
(1x1 expand by `expansion`, depthwise 3x3 of the layer's stride, 1x1 project; residual when the
shape is kept), one in layers 1, 3, 4, 5 and three in layer 2; layers 3, 4, 5 end with a
MobileViT block of width d and `depths` transformer layers:

    y = Conv1x1_d(Conv3x3(x)),  patches of 2x2: the pixels at the same offset in every patch
    form a sequence, L pre-LN layers y + Attn(LN y), y + FFN_2d(LN y) (SiLU) and a LayerNorm,
    folded back;  out = Conv3x3([x, Conv1x1_C(y)]),

the attention any op by name (`attention`, 4 heads). Every conv but the one into the
transformer has BatchNorm (PyTorch's eps 1e-5, momentum 0.9 in Flax's convention; running
statistics in `batch_stats`) and SiLU (none after the projecting 1x1 of an inverted residual).
The head: a 1x1 conv to `head_channels` (BN, SiLU), global average pooling, a linear layer.

Parameter counts (256x256x3, 1000 classes; `jax.eval_shape`) against the paper (Figure 1 /
Table 1, one decimal):

| variant | channels              | d               | parameters | paper |
|---------|-----------------------|-----------------|------------|-------|
| XXS     | 16, 24, 48, 64, 80    | 64, 80, 96      |  1,272,024 |  1.3M |
| XS      | 32, 48, 64, 80, 96    | 96, 120, 144    |  2,317,848 |  2.3M |
| S       | 32, 64, 96, 128, 160  | 144, 192, 240   |  5,578,632 |  5.6M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import Attention, batch_norm, layer_norm
from big_attn.models import common
from big_attn.ops import spatial

_SIZES = {
    "XXS": dict(channels=(16, 24, 48, 64, 80), dims=(64, 80, 96), expansion=2,
                head_channels=320),
    "XS": dict(channels=(32, 48, 64, 80, 96), dims=(96, 120, 144), expansion=4,
               head_channels=384),
    "S": dict(channels=(32, 64, 96, 128, 160), dims=(144, 192, 240), expansion=4,
              head_channels=640),
}
# Inverted residuals per layer, transformer layers of layers 3-5, strides of stem and layers.
_BLOCKS = (1, 3, 1, 1, 1)
_DEPTHS = (2, 4, 3)
_STRIDES = (2, 1, 2, 2, 2, 2)


def decode_variant(variant: str) -> dict[str, Any]:
  """"S" -> dict(channels=(32, 64, 96, 128, 160), dims=(144, 192, 240), expansion=4,
  head_channels=640); sizes XXS, XS, S."""
  if not isinstance(variant, str) or variant not in _SIZES:
    raise ValueError(f"unknown MobileViT variant {variant!r}; expected one of "
                     f"{', '.join(_SIZES)}")
  return dict(_SIZES[variant])


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> SiLU (`act=False`: no SiLU; `norm=False`: neither)."""
  features: int
  kernel: int = 1
  strides: int = 1
  groups: int = 1
  norm: bool = True
  act: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel,) * 2, strides=(self.strides,) * 2,
                padding=((pad, pad),) * 2, feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.kaiming_normal(),
                    ("conv_height", "conv_width", None if self.groups > 1 else "channels_in",
                     "embed")))(x)
    if not self.norm:
      return x
    x = batch_norm(not train, self.dtype, self.param_dtype, "norm", epsilon=1e-5,
                   momentum=0.9)(x)
    return nn.silu(x) if self.act else x


class InvertedResidual(nn.Module):
  """MobileNetV2's block: 1x1 expand (BN, SiLU), depthwise 3x3 (BN, SiLU), 1x1 project (BN),
  plus the input when `strides` is 1 and the channels are kept."""
  features: int
  strides: int = 1
  expansion: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, name="expand")(x, train) if self.expansion != 1 else x
    y = conv(hidden, 3, self.strides, groups=hidden, name="dwconv")(y, train)
    y = conv(self.features, act=False, name="project")(y, train)
    return x + y if self.strides == 1 and x.shape[-1] == self.features else y


class MobileViTBlock(nn.Module):
  """Local 3x3 and 1x1 convs, `depth` transformer layers over the unfolded 2x2 patches, fold,
  1x1 conv back and a 3x3 fusion conv of `[input, result]` (see the module docstring)."""
  dim: int
  depth: int
  num_heads: int = 4
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    d, gh, gw = self.dim, h // 2, w // 2
    y = conv(c, 3, name="local")(x, train)
    y = conv(d, norm=False, name="to_tokens")(y, train)
    # [b, gh, 2, gw, 2, d] -> [b, 4, gh·gw, d]: one sequence per offset inside the patches.
    y = y.reshape(b, gh, 2, gw, 2, d).transpose(0, 2, 4, 1, 3, 5).reshape(b * 4, gh * gw, d)
    dense = lambda width, axes, name: nn.Dense(  # pylint: disable=g-long-lambda
        width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
    for i in range(self.depth):
      z = layer_norm(self.dtype, self.param_dtype, f"layer_{i}_norm1", epsilon=1e-5)(y)
      y = y + Attention(num_heads=self.num_heads, op=self.attention,
                        op_args=spatial.op_args(self.attention, self.attention_args, (gh, gw)),
                        implementation=self.attention_impl, use_bias=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"layer_{i}_attention")(z)
      z = layer_norm(self.dtype, self.param_dtype, f"layer_{i}_norm2", epsilon=1e-5)(y)
      z = nn.silu(dense(2 * d, ("embed", "mlp"), f"layer_{i}_ffn_0")(z))
      y = y + dense(d, ("mlp", "embed"), f"layer_{i}_ffn_1")(z)
    y = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=1e-5)(y)
    y = y.reshape(b, 2, 2, gh, gw, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, h, w, d)
    y = conv(c, name="from_tokens")(y, train)
    return conv(c, 3, name="fusion")(jnp.concatenate([x, y], axis=-1), train)


class Model(nn.Module):
  """MobileViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled features `[batch, head_channels]`.
    variant: size for `decode_variant` ("XXS", "XS", "S"); explicit fields override it.
    channels: output channels of the five layers; dims: transformer widths of layers 3-5.
    expansion: the inverted residuals' expansion (2 for XXS, 4 otherwise).
    head_channels: channels of the head's 1x1 conv.
    depths: transformer layers of layers 3-5 ((2, 4, 3)).
    strides: of the stem and the five layers ((2, 1, 2, 2, 2, 2)); image sides must be divisible
      by their product and the maps of layers 3-5 by 2 (256x256 in the paper).
    num_heads: attention heads (4).
    attention, attention_args, attention_impl: the op by registry name, its arguments and
      `implementation`; a 2-D op gets the patch grid.
    dropout: before the classifier (0.1 in the paper's training).
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names conv_height, conv_width, channels_in, embed, mlp,
  norm, heads, head_dim and classes; BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  channels: tuple[int, ...] | None = None
  dims: tuple[int, ...] | None = None
  expansion: int | None = None
  head_channels: int | None = None
  depths: tuple[int, ...] = _DEPTHS
  strides: tuple[int, ...] = _STRIDES
  num_heads: int = 4
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant,
                           required=("channels", "dims", "expansion", "head_channels"))
    super().__post_init__()

  def _check(self, images):
    sizes = dict(channels=(self.channels, 5), dims=(self.dims, 3), depths=(self.depths, 3),
                 strides=(tuple(self.strides), 6))
    for name, (value, length) in sizes.items():
      if len(value) != length or not all(isinstance(v, int) and not isinstance(v, bool)
                                         and v >= 1 for v in value):
        raise ValueError(f"{name} must be {length} positive ints, got {value!r}")
    for name in ("expansion", "head_channels", "num_heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if any(d % self.num_heads for d in self.dims):
      raise ValueError(f"dims {self.dims} must be divisible by num_heads ({self.num_heads})")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    spatial.check_op(self.attention, "MobileViT")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    side = 1
    for i, s in enumerate(self.strides):
      side *= s
      if images.shape[1] % (side * (2 if i >= 3 else 1)) or images.shape[2] % (
          side * (2 if i >= 3 else 1)):
        raise ValueError(f"image size {images.shape[1:3]} must be divisible by the strides "
                         f"{tuple(self.strides)} with the maps of layers 3-5 even")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(16, 3, self.strides[0], name="stem")(jnp.asarray(images, self.dtype), train)
    for layer, (features, blocks, stride) in enumerate(zip(self.channels, _BLOCKS,
                                                           self.strides[1:])):
      for i in range(blocks):
        x = InvertedResidual(features, stride if i == 0 else 1, self.expansion,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"layer_{layer + 1}_mv2_{i}")(x, train)
      if layer >= 2:
        x = MobileViTBlock(self.dims[layer - 2], self.depths[layer - 2],
                           num_heads=self.num_heads, attention=self.attention,
                           attention_args=self.attention_args,
                           attention_impl=self.attention_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"layer_{layer + 1}_vit")(x, train)
    x = jnp.mean(conv(self.head_channels, name="head_conv")(x, train), axis=(1, 2))
    x = nn.Dropout(self.dropout)(x, not train)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head",
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
