"""Causal Toeplitz products that never read the future (`kernelized_rpe`'s causal sums).

One FFT of length 2n mixes every token into every output at round-off, so a causal output would
move (or turn NaN) when a later token changes. Here the product is split by divide and conquer:
the second half of a block gets the FFT product of the first half (past tokens only) plus its
own recursive product; blocks of at most `LEAF` tokens are summed directly over the offsets
r ≥ 0. No later token enters an earlier output's computation; the cost is O(n log² n).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

LEAF = 16  # the largest block summed directly


def _pad_tokens(x: Array, pad: int, mode: str = "constant") -> Array:
  """`x [..., n]` with `pad` more tokens at the end (zeros, or copies of the last token)."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode=mode)


def _pad_front(x: Array, pad: int, mode: str = "constant") -> Array:
  """`x [..., n]` with `pad` tokens before the first (zeros, or copies of the first token)."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, 0)], mode=mode)


def causal_toeplitz(taps: Array, x: Array, log_scale: Array | None = None, *,
                    leaf: int = LEAF) -> Array:
  """y_i = Σ_{j≤i} c_{i−j} e^{C_j − C_i} x_j for i < n, where no x_j or C_j with j > i is read.

  x `[b, n, *rest]`; taps `[n, *rest']` with `taps[r]` = c_r (rest' broadcasting against rest);
  log_scale C `[b, n, *rest'']` (broadcasting against rest) non-decreasing along n, or None for
  C = 0: a running stabiliser, so every factor e^{C_j − C_i} and e^{R − C_i} is at most 1.
  Returns `[b, n, *rest]`.
  """
  n = x.shape[1]
  levels = max(0, math.ceil(math.log2(n / leaf)))
  size = -(-n // 2**levels)  # leaf blocks of `size` ≤ `leaf` tokens, 2**levels of them
  total = size * 2**levels
  # The tokens last: every shift and FFT below runs along the contiguous axis.
  x = _pad_tokens(jnp.moveaxis(x, 1, -1), total - n)  # [b, *rest, total]
  taps = _pad_tokens(jnp.moveaxis(taps.astype(x.dtype), 0, -1)[None], total - n)[0]
  scale = None if log_scale is None else _pad_tokens(jnp.moveaxis(log_scale, 1, -1),
                                                    total - n, mode="edge")

  # Leaves: offsets 0..size−1 inside each block, as shifts that read earlier tokens only.
  blocks = x.reshape(*x.shape[:-1], total // size, size)
  shifted = _pad_front(blocks, size - 1)
  if scale is not None:
    c_blocks = scale.reshape(*scale.shape[:-1], total // size, size)
    c_shifted = _pad_front(c_blocks, size - 1, mode="edge")
  y = jnp.zeros_like(blocks)
  for r in range(size):
    term = taps[..., r, None, None] * shifted[..., size - 1 - r:2 * size - 1 - r]
    if scale is not None:
      term = term * jnp.exp(c_shifted[..., size - 1 - r:2 * size - 1 - r] - c_blocks)
    y = y + term
  y = y.reshape(x.shape)

  # Levels: the later half of each pair of blocks gets the product of the earlier half.
  for level in range(levels):
    width = size * 2**level
    pairs = total // (2 * width)
    past = x.reshape(*x.shape[:-1], pairs, 2, width)[..., 0, :]
    if scale is not None:
      c_pairs = scale.reshape(*scale.shape[:-1], pairs, 2, width)
      end = c_pairs[..., 0, -1:]  # R: the stabiliser at the end of the past block
      past = past * jnp.exp(c_pairs[..., 0, :] - end)
    # z_a = Σ_c c_{width + a − c} past_c: taps c_1..c_{2·width−1}, circular length 2·width.
    kernel_f = jnp.fft.rfft(taps[..., 1:2 * width], n=2 * width)[..., None, :]
    z = jnp.fft.irfft(jnp.fft.rfft(past, n=2 * width) * kernel_f,
                      n=2 * width)[..., width - 1:2 * width - 1]
    if scale is not None:
      z = z * jnp.exp(end - c_pairs[..., 1, :])
    y = y + jnp.stack([jnp.zeros_like(z), z], axis=-2).reshape(x.shape).astype(y.dtype)
  return jnp.moveaxis(y[..., :n], -1, 1)
