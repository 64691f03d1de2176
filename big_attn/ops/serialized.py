"""Serialized patch attention: Point Transformer V3's attention over patches of tokens taken in
the order of a space-filling curve, here over the 2-D grid of image tokens.

- `serialized_patch_attention`: Point Transformer V3: Simpler, Faster, Stronger (Wu et al.,
  2024).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import register

# The curves of PTv3 (its layers cycle through them: order shuffling).
ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
# PTv3's patch size (points per patch).
PTV3_PATCH = 1024


def z_order(y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Morton codes: the bits of y and x interleaved (y's bit above x's at every level)."""
  code = np.zeros_like(y)
  for bit in range(int(max(y.max(initial=0), x.max(initial=0))).bit_length()):
    code |= ((y >> bit) & 1) << (2 * bit + 1) | ((x >> bit) & 1) << (2 * bit)
  return code


def hilbert_order(y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Distances along the Hilbert curve of the smallest 2^m x 2^m square holding the points
  (the classic xy → d conversion, x along the curve's first step)."""
  side = 1 << int(max(y.max(initial=0), x.max(initial=0))).bit_length()
  x, y, d = x.copy(), y.copy(), np.zeros_like(x)
  s = side // 2
  while s > 0:
    rx, ry = (x & s) > 0, (y & s) > 0
    d += s * s * ((3 * rx) ^ ry)
    flip = ~ry & rx
    x, y = np.where(flip, side - 1 - x, x), np.where(flip, side - 1 - y, y)
    x, y = np.where(~ry, y, x), np.where(~ry, x, y)
    s //= 2
  return d


def serialization(grid: tuple[int, int], order: str) -> np.ndarray:
  """The row-major token indices of the `grid` sorted along the curve `order` (`ORDERS`;
  "-trans" swaps the roles of x and y)."""
  h, w = grid
  pos = np.arange(h * w)
  y, x = pos // w, pos % w
  if order.endswith("-trans"):
    y, x = x, y
  codes = (z_order if order.startswith("z") else hilbert_order)(y, x)
  return np.argsort(codes, kind="stable")


@register("serialized_patch_attention", causal=False, grid=True)
def serialized_patch_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                               grid=None, patch_size=PTV3_PATCH, order="z"):
  """Serialized patch attention: Point Transformer V3: Simpler, Faster, Stronger (Wu et al.,
  2024), on the `grid=(h, w)` image.

  The tokens are serialized along a space-filling curve π (Z-order or Hilbert, optionally
  with x and y swapped: PTv3's "z", "z-trans", "hilbert", "hilbert-trans"), cut into
  consecutive patches P of `patch_size` tokens, and attend within their patch:

      out_{π(r)} = Σ_{r' : ⌊r'/P⌋ = ⌊r/P⌋} softmax_{r'}(s·q_{π(r)}·k_{π(r')}) v_{π(r')},

  then return to row-major order. PTv3 fills the last patch by repeating points; here the
  last patch is shorter (its missing slots are masked). Cost O(seq·P); no causal form (a
  patch holds tokens from all around in raster order).

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, row-major tokens.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: boolean, broadcastable to `[batch, num_heads, seq, seq]`, read inside each patch; a
      token with nothing left returns zeros.
    is_causal: must be False.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    patch_size: tokens per patch (PTv3: 1024); clipped to the sequence.
    order: the curve, one of `ORDERS`.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("serialized_patch_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len:
    raise ValueError("serialized_patch_attention is self-attention over one image: q_len must "
                     f"equal kv_len, got {dims.q_len} and {dims.kv_len}")
  grid = windowed.check_grid(grid, dims.q_len)
  size = min(checks.positive_int("patch_size", patch_size), dims.q_len)
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
  return _serialized(query, key, value, mask, common.default_scale(dims.head_dim, scale),
                     grid=grid, size=size, order=order)


@functools.partial(jax.jit, static_argnames=("grid", "size", "order"))
def _serialized(query, key, value, mask, scale, *, grid, size, order):
  """The body of `serialized_patch_attention` after its checks, compiled once per
  configuration."""
  dims = common.check_qkv(query, key, value)
  num = -(-dims.q_len // size)
  slots = np.arange(num * size)
  tokens = serialization(grid, order)[np.minimum(slots, dims.q_len - 1)].reshape(num, size)
  filled = (slots < dims.q_len).reshape(num, size)
  group_mask = jnp.asarray(filled[:, None, :])[None, :, None, None]  # [1, G, 1, 1, 1, P]
  full = common.make_mask(dims, mask=mask)
  if full is not None:
    picked = windowed.pick_mask(full, tokens[:, :, None], tokens[:, None, :])
    group_mask = jnp.logical_and(windowed.grouped_group_mask(picked, dims), group_mask)
  out = windowed.group_attention(query[:, tokens], key[:, tokens], value[:, tokens], dims,
                                 scale, None, group_mask)
  out = out.reshape(dims.batch, num * size, dims.num_heads, dims.value_dim)
  back = np.argsort(tokens.reshape(-1)[:dims.q_len])
  return out[:, back].astype(query.dtype)
