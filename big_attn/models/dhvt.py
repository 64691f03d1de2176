"""DHVT (Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small
Datasets, Lu et al. 2022).

    model = Model(num_classes=100, variant="S", patch_size=4)
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A ViT with three modules that give it a convolution's inductive biases on small datasets:

- SOPE, the sequential overlapping patch embedding (`patch_embedding`): an affine map of the
  input channels (α·x + β), log2(patch_size) 3x3 stride-2 convolutions without bias, each
  followed by BatchNorm (widths D/2^(n−1) ... D, GELU between them; after the one convolution
  of patch size 2), an affine map of the D output channels. No position embedding.
- HI-MHSA, head interaction (`HeadInteractionAttention`): each head's channels are averaged over
  the tokens, projected to D, LayerNorm'd per head_dim group, GELU'd and given a learned
  position, making one head token per head; the tokens and the head tokens attend together
  (`attention`, softmax by default, any op by name; a 2-D op gets the patch grid and the class
  and head tokens as extra tokens), and the head tokens' mean output is added to the class
  token's, after which they are dropped.
- DAFF, the dynamic aggregation feed-forward (`DAFF`): on the patch tokens as an image, a 1x1
  convolution to r·D (BatchNorm, GELU), a residual depthwise 3x3 convolution (BatchNorm, GELU),
  a 1x1 convolution back to D (BatchNorm); the class token is multiplied channel-wise by
  W₂·GELU(W₁·mean(patches)) (a squeeze-excitation with ratio 4 and no sigmoid).

Blocks x + HI-MHSA(LN x), x + DAFF(LN x) with a class token prepended, a final LayerNorm and the
class token classified. BatchNorm: PyTorch's eps 1e-5 and momentum 0.9 in Flax's convention,
running statistics in `batch_stats`.

Parameter counts (`jax.eval_shape`; equal to the authors' modules' shapes rebuilt in PyTorch)
against the authors' (ImageNet, 224x224, 1000 classes, patch 16: DHVT-T 6.2M, DHVT-S 23.8M;
CIFAR-100, 32x32, 100 classes, patch 4, 4 and 8 heads: 6.0M, 23.4M), all within 2%:

| variant | width | depth | heads | ImageNet   | CIFAR-100 (patch 4)   |
|---------|-------|-------|-------|------------|-----------------------|
| T       |   192 |    12 |     3 |  6,267,334 |  6,008,650 (4 heads)  |
| S       |   384 |    12 |     6 | 24,040,606 | 23,425,450 (8 heads)  |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers import Attention, layer_norm
from big_attn.layers.norm import batch_norm
from big_attn.models import common
from big_attn.models import mobilevit
from big_attn.ops import checks
from big_attn.ops import spatial

_SIZES = {"T": (192, 12, 3), "S": (384, 12, 6)}  # width, depth, heads (ImageNet)
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"DHVT-S" (or "S") -> dict(width=384, depth=12, num_heads=6). Sizes: T, S."""
  size = variant[len("DHVT-"):] if isinstance(variant, str) and variant.startswith(
      "DHVT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown DHVT variant {variant!r}; expected DHVT-SIZE or SIZE with SIZE in "
                     f"{', '.join(_SIZES)}")
  width, depth, heads = _SIZES[size]
  return dict(width=width, depth=depth, num_heads=heads)


def _dense(features, name, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "mlp")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))


class HeadInteractionAttention(nn.Module):
  """DHVT's HI-MHSA on `[batch, 1 + h·w, width]` tokens (the class token first) of a
  `grid=(h, w)` map (see the module docstring): head tokens from each head's token mean, the op
  over the class, head and patch tokens, the head tokens' mean output added to the class
  token's."""
  num_heads: int
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    (b, t, width), h = x.shape, self.num_heads
    if width % h:
      raise ValueError(f"width {width} must be divisible by num_heads {h}")
    if t != 1 + grid[0] * grid[1]:
      raise ValueError(f"HeadInteractionAttention: {t} tokens are not a class token and the "
                       f"grid {grid}")
    d = width // h
    heads = jnp.mean(x.reshape(b, t, h, d), axis=1)  # [b, h, d]
    heads = _dense(width, "head_proj", self.dtype, self.param_dtype)(heads).reshape(b, h, h, d)
    heads = layer_norm(self.dtype, self.param_dtype, "head_norm", epsilon=1e-5)(heads)
    position = self.param("head_posemb", nn.with_logical_partitioning(_INIT, ("heads", "embed")),
                          (h, width), self.param_dtype)
    heads = jax.nn.gelu(heads, approximate=False).reshape(b, h, width) + jnp.asarray(
        position, self.dtype)
    tokens = jnp.concatenate([x[:, :1], heads.astype(x.dtype), x[:, 1:]], axis=1)
    out = Attention(num_heads=h, op=self.attention,
                    op_args=spatial.op_args(self.attention, self.attention_args, grid, 1 + h),
                    implementation=self.attention_impl, use_bias=True, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=_INIT,
                    name="MultiHeadAttention")(tokens)
    cls = out[:, :1] + jnp.mean(out[:, 1:1 + h], axis=1, keepdims=True)
    return jnp.concatenate([cls, out[:, 1 + h:]], axis=1)


class DAFF(nn.Module):
  """DHVT's dynamic aggregation feed-forward on `[batch, 1 + h·w, width]` tokens (the class
  token first) of a `grid=(h, w)` map (see the module docstring)."""
  mlp_ratio: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int], train: bool = False):
    b, t, width = x.shape
    hidden = self.mlp_ratio * width
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv_bn(y, features, kernel, groups, name):
      y = nn.Conv(features, (kernel, kernel), padding="SAME", feature_group_count=groups,
                  name=name, kernel_init=nn.with_logical_partitioning(
                      nn.initializers.kaiming_normal(),
                      ("conv_height", "conv_width", None if groups > 1 else "channels_in",
                       "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("embed",)), **kw)(y)
      return batch_norm(not train, self.dtype, self.param_dtype, f"{name}_norm", epsilon=1e-5,
                        momentum=0.9)(y)

    image = x[:, 1:].reshape(b, *grid, width)
    y = jax.nn.gelu(conv_bn(image, hidden, 1, 1, "expand"), approximate=False)
    y = y + jax.nn.gelu(conv_bn(y, hidden, 3, hidden, "depthwise"), approximate=False)
    y = conv_bn(y, width, 1, 1, "project")
    gate = jax.nn.gelu(_dense(width // 4, "compress", **kw)(jnp.mean(y, axis=(1, 2))),
                       approximate=False)
    gate = _dense(width, "excite", **kw)(gate)
    return jnp.concatenate([x[:, :1] * gate[:, None], y.reshape(b, t - 1, width)], axis=1)


class Model(nn.Module):
  """DHVT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, width]`.
    variant: size name for `decode_variant` ("DHVT-S" or "S"); explicit fields override it.
    width, depth, num_heads: of the encoder.
    mlp_ratio: DAFF's hidden width over `width` (4).
    patch_size: SOPE's stride, a power of two >= 2 (16 on ImageNet, 4 or 2 on CIFAR); `width`
      must be divisible by patch_size / 2.
    attention: registry name of HI-MHSA's op (softmax, the paper's); attention_args its
      arguments; attention_impl its `implementation`. A 2-D op gets the patch grid with the
      class and head tokens as extra tokens.
    dtype: compute dtype; param_dtype: parameter dtype.
  BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_ratio: int = 4
  patch_size: int = 16
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("width", "depth", "num_heads"))
    super().__post_init__()

  def _check(self, images):
    for name in ("width", "depth", "num_heads", "mlp_ratio", "patch_size"):
      checks.positive_int(name, getattr(self, name))
    common.stride_two_convs(self.patch_size)
    if self.width % (self.patch_size // 2) or self.width % 4:
      raise ValueError(f"width {self.width} must be divisible by 4 and by patch_size / 2 "
                       f"({self.patch_size // 2})")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    common.check_images(images, self.patch_size)
    spatial.check_op(self.attention, "DHVT")

  def _affine(self, x, name):
    """α·x + β per channel (α ones, β zeros at the start)."""
    alpha = self.param(f"{name}_scale", nn.with_logical_partitioning(
        nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
    beta = self.param(f"{name}_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
    return x * jnp.asarray(alpha, self.dtype) + jnp.asarray(beta, self.dtype)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._affine(jnp.asarray(images, self.dtype), "pre_affine")
    convs = common.stride_two_convs(self.patch_size)
    for i in range(convs):
      x = mobilevit.ConvBN(self.width >> (convs - 1 - i), 3, 2, act=False,
                           name=f"patch_embedding_{i}", **kw)(x, train)
      x = jax.nn.gelu(x, approximate=False) if i < convs - 1 or convs == 1 else x
    x = self._affine(x, "post_affine")
    b, h, w, _ = x.shape
    grid = (h, w)
    cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")),
                     (1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None],
                                          (b, 1, self.width)), x.reshape(b, h * w, -1)], axis=1)
    for i in range(self.depth):
      y = layer_norm(self.dtype, self.param_dtype, f"block_{i}_norm_0", epsilon=1e-6)(x)
      x = x + HeadInteractionAttention(
          self.num_heads, attention=self.attention, attention_args=self.attention_args,
          attention_impl=self.attention_impl, name=f"block_{i}_attention", **kw)(y, grid)
      y = layer_norm(self.dtype, self.param_dtype, f"block_{i}_norm_1", epsilon=1e-6)(x)
      x = x + DAFF(self.mlp_ratio, name=f"block_{i}_daff", **kw)(y, grid, train)
    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=1e-6)(x)[:, 0]
    if self.num_classes:
      x = common.classifier(self.num_classes, self.dtype, self.param_dtype)(x)
    return x.astype(jnp.float32)
