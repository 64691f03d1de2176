"""ConvMixer (Patches Are All You Need?).

    model = Model(num_classes=1000, variant="1536/20")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A p×p stride-p patch embedding z₀ = BN(GELU(Conv_p(x))), then `depth` ConvMixer layers

    z' = BN(GELU(DepthwiseConv_k(z))) + z,    z = BN(GELU(PointwiseConv(z'))),

(convs with bias, "same" padding, exact GELU, BatchNorm with PyTorch's eps 1e-5 and momentum
0.9 in Flax's convention, running statistics in `batch_stats`), global average pooling and a
linear head. The width and resolution stay fixed through the network.

Parameter counts (224x224x3, 1000 classes; `jax.eval_shape`) against the paper's Table 1:

| variant  | kernel | patch | parameters | paper |
|----------|--------|-------|------------|-------|
| 1536/20  | 9      | 7     | 51,625,960 | 51.6M |
| 768/32   | 7      | 7     | 21,110,248 | 21.1M |
| 1024/20  | 9      | 14    | 24,383,464 | 24.4M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import batch_norm
from big_attn.models import common

_SIZES = {"1536/20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7),
          "768/32": dict(dim=768, depth=32, kernel_size=7, patch_size=7),
          "1024/20": dict(dim=1024, depth=20, kernel_size=9, patch_size=14)}


def decode_variant(variant: str) -> dict[str, Any]:
  """"1536/20" -> dict(dim=1536, depth=20, kernel_size=9, patch_size=7) (the paper's
  ConvMixer-h/d of Table 1: 1536/20, 768/32, 1024/20)."""
  if not isinstance(variant, str) or variant not in _SIZES:
    raise ValueError(f"unknown ConvMixer variant {variant!r}; expected one of "
                     f"{', '.join(_SIZES)}")
  return dict(_SIZES[variant])


class ConvGeluBN(nn.Module):
  """BN(GELU(Conv(x))): a k×k conv with bias of stride `strides` (depthwise when `depthwise`),
  exact GELU, BatchNorm."""
  features: int
  kernel: int
  strides: int = 1
  depthwise: bool = False
  padding: Any = "SAME"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel,) * 2, strides=(self.strides,) * 2,
                padding=self.padding,
                feature_group_count=x.shape[-1] if self.depthwise else 1, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(),
                    ("conv_height", "conv_width", None if self.depthwise else "channels_in",
                     "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       ("embed",)))(x)
    x = nn.gelu(x, approximate=False)
    return batch_norm(not train, self.dtype, self.param_dtype, "norm", epsilon=1e-5,
                      momentum=0.9)(x)


class ConvMixerLayer(nn.Module):
  """z' = BN(GELU(DepthwiseConv_k(z))) + z, then BN(GELU(PointwiseConv(z')))."""
  kernel_size: int = 9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = False):
    layer = lambda *a, **k: ConvGeluBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    dim = z.shape[-1]
    z = z + layer(dim, self.kernel_size, depthwise=True, name="depthwise")(z, train)
    return layer(dim, 1, name="pointwise")(z, train)


class Model(nn.Module):
  """ConvMixer classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled features `[batch, dim]`.
    variant: size for `decode_variant` ("1536/20", "768/32", "1024/20"); explicit fields
      override it.
    dim: channels h; depth: ConvMixer layers d.
    kernel_size: the depthwise kernel k (9); patch_size: the patch embedding's p (7); image
      sides must be divisible by it.
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names conv_height, conv_width, channels_in, embed, norm
  and classes; BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  dim: int | None = None
  depth: int | None = None
  kernel_size: int | None = None
  patch_size: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("dim", "depth"),
                           defaults=dict(kernel_size=9, patch_size=7))
    super().__post_init__()

  def _check(self, images):
    for name in ("dim", "depth", "kernel_size", "patch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ConvMixer: {name} must be a positive int, got {value!r}")
    common.check_images(images, self.patch_size)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    z = ConvGeluBN(self.dim, self.patch_size, self.patch_size, padding="VALID",
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(jnp.asarray(images, self.dtype), train)
    for i in range(self.depth):
      z = ConvMixerLayer(self.kernel_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"layer_{i}")(z, train)
    x = jnp.mean(z, axis=(1, 2))
    if self.num_classes:
      x = common.classifier(self.num_classes, self.dtype, self.param_dtype)(x)
    return x.astype(jnp.float32)
