"""Deformable token merging (DTM) of LIT: Less is More: Pay Less Attention in Vision
Transformers (Pan et al., 2022)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers.norm import batch_norm
from big_attn.ops import checks
from big_attn.ops.deformable import bilinear_corners


class DeformableTokenMerging(nn.Module):
  """`[batch, h·w, C]` tokens of a `grid=(h, w)` map -> `[batch, (h/k)·(w/k), features]`, merged
  by a deformable convolution with kernel and stride k = `kernel_size` (LIT's DTM, the
  authors' DCNv1 layer).

  An offset convolution (k x k, stride k, with bias, zero-initialised: the layer starts as a
  plain k x k patch merging) predicts, for each output position p₀ and kernel point pₙ, an
  offset Δpₙ = (Δy, Δx) (channels 2n and 2n + 1); the merged token is

      y(p₀) = b + Σₙ Wₙ · X(k·p₀ + pₙ + Δpₙ),

  X read at the fractional points by bilinear interpolation (zero outside the map), then
  BatchNorm (PyTorch's eps 1e-5 and momentum 0.9; statistics in `batch_stats`) and exact GELU.
  `offsets=True` also returns the offsets `[batch, h/k, w/k, k, k, 2]`.
  """
  features: int
  kernel_size: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid: tuple[int, int], train: bool = False, offsets: bool = False):
    k = checks.positive_int("kernel_size", self.kernel_size)
    (b, t, c), (h, w) = x.shape, grid
    if t != h * w:
      raise ValueError(f"DeformableTokenMerging: {t} tokens are not the grid {grid}")
    if h % k or w % k:
      raise ValueError(f"DeformableTokenMerging: grid {grid} must be divisible by kernel_size "
                       f"{k}")
    oh, ow = h // k, w // k
    image = jnp.asarray(x, self.dtype).reshape(b, h, w, c)
    delta = nn.Conv(2 * k * k, (k, k), strides=(k, k), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="offset",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.zeros_init(),
                        ("conv_height", "conv_width", "channels_in", None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (None,)))(image)
    delta = delta.astype(jnp.float32).reshape(b, oh, ow, k, k, 2)
    base_y = (k * jnp.arange(oh))[:, None, None, None] + jnp.arange(k)[None, None, :, None]
    base_x = (k * jnp.arange(ow))[None, :, None, None] + jnp.arange(k)[None, None, None, :]
    py = (base_y + delta[..., 0]).reshape(b, -1)
    px = (base_x + delta[..., 1]).reshape(b, -1)
    tokens = jnp.asarray(x, jnp.float32)
    sampled = 0.0
    for index, weight in bilinear_corners(py, px, h, w):
      sampled = sampled + weight[..., None] * jnp.take_along_axis(tokens, index[..., None],
                                                                  axis=1)
    sampled = sampled.reshape(b, oh, ow, k, k, c).astype(self.dtype)
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        ("conv_height", "conv_width", "channels_in", "embed")), (k, k, c, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)),
                      (self.features,), self.param_dtype)
    kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
    y = jnp.einsum("bhwijc,ijco->bhwo", sampled, kernel) + bias
    y = batch_norm(not train, self.dtype, self.param_dtype, "norm", epsilon=1e-5,
                   momentum=0.9)(y)
    y = jax.nn.gelu(y, approximate=False).reshape(b, oh * ow, self.features)
    return (y, delta) if offsets else y
