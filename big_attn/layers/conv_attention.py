"""Multi-head self-attention that computes a given convolution exactly.

The construction of Can Vision Transformers Perform Convolution? (Li et al., 2021): a k×k
convolution of a d-channel image is one self-attention layer over its patch tokens with k²
heads, one per kernel offset δ = (δy, δx). Head h attends only to the token at relative
position δ_h (its relative-position term is 0 there and -∞ elsewhere, the hard-attention
limit of the paper's relative positional encoding; a token whose δ_h neighbour is off the image
attends to nothing, which is the convolution's zero padding), its value projection is the
kernel slice W[δ_h] and the output projection sums the heads:

    out_i = Σ_h W[δ_h]ᵀ x_{i+δ_h} + b = Conv(x)_i.

Queries and keys are zero: the heads need no content, only relative positions.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from big_attn.layers.attention import Attention


def convolution_attention(kernel: Any, grid: tuple[int, int], bias: Any = None
                          ) -> tuple[Attention, dict[str, Any], np.ndarray]:
  """`(layer, variables, mask)`: an `Attention` layer whose
  `layer.apply(variables, tokens, mask=mask)` equals the convolution of the image with `kernel`.

  Args:
    kernel: `[k, k, d, d]` (HWIO, odd k) convolution kernel; stride 1, "SAME" zero padding.
    grid: `(h, w)` of the image; `tokens` are its pixels row-major, `[batch, h·w, d]`.
    bias: `[d]` convolution bias (zeros when None).

  Returns:
    the layer (k² heads of width d, softmax), its variables (`params`) and the boolean
    relative-position mask `[1, k², h·w, h·w]`: head h at query i sees only key i + δ_h.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
    raise ValueError(f"kernel must be [k, k, d, d] with k odd, got shape {kernel.shape}")
  k, _, d_in, d = kernel.shape
  if d_in != d:
    raise ValueError(f"kernel must map d channels to d (the layer's width), got {d_in} -> {d}")
  if (len(tuple(grid)) != 2
      or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid)):
    raise ValueError(f"grid must be (height, width) positive ints, got {grid!r}")
  bias = np.zeros(d, kernel.dtype) if bias is None else np.asarray(bias)
  if bias.shape != (d,):
    raise ValueError(f"bias must have shape ({d},), got {bias.shape}")
  h, w = grid
  heads = k * k
  offsets = np.stack(np.meshgrid(np.arange(k), np.arange(k), indexing="ij"), -1).reshape(
      heads, 2) - k // 2  # head h <- kernel tap (a, b) = offset (a - k//2, b - k//2)
  ys, xs = np.divmod(np.arange(h * w), w)
  mask = ((ys[None, None, :] - ys[None, :, None] == offsets[:, 0, None, None])
          & (xs[None, None, :] - xs[None, :, None] == offsets[:, 1, None, None]))
  zeros = jnp.zeros((d, heads, d), kernel.dtype)
  params = {
      "query": {"kernel": zeros}, "key": {"kernel": zeros},
      "value": {"kernel": jnp.asarray(kernel.reshape(heads, d, d).transpose(1, 0, 2))},
      "out": {"kernel": jnp.asarray(np.broadcast_to(np.eye(d, dtype=kernel.dtype),
                                                    (heads, d, d))),
              "bias": jnp.asarray(bias)},
  }
  layer = Attention(num_heads=heads, head_dim=d, use_bias=False, out_bias=True)
  return layer, {"params": params}, mask[None]
