"""Attention in wavelet space: WavSpA's IDWT(Attn(DWT x)) around any registered op."""
from __future__ import annotations

import math

import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register, spec

WAVELETS = ("haar",)


def haar_dwt(x, levels: int) -> list:
  """Orthonormal Haar transform along axis 1 of `[b, n, ...]` (n a multiple of 2^levels):
  the bands `[a_L, d_L, ..., d_1]`, a_l = (a_{l−1}[0::2] + a_{l−1}[1::2])/√2, d_l the
  difference, band l of length n/2^l."""
  details = []
  for _ in range(levels):
    even, odd = x[:, 0::2], x[:, 1::2]
    x, detail = (even + odd) / math.sqrt(2), (even - odd) / math.sqrt(2)
    details.append(detail)
  return [x] + details[::-1]


def haar_idwt(bands: list):
  """The inverse of `haar_dwt`: even = (a + d)/√2, odd = (a − d)/√2, coarsest level first."""
  x = bands[0]
  for detail in bands[1:]:
    even, odd = (x + detail) / math.sqrt(2), (x - detail) / math.sqrt(2)
    x = jnp.stack([even, odd], axis=2).reshape((x.shape[0], 2 * x.shape[1]) + x.shape[2:])
  return x


@register("wavelet_attention", causal=False)
def wavelet_attention(query, key, value, *, mask=None, is_causal=False, scale=None, levels=1,
                      wavelet="haar", inner="softmax", inner_args=None):
  """WavSpA: Wavelet Space Attention for Boosting Transformers' Long Sequence Learning
  Ability (Zhuang et al., 2023).

  Queries, keys and values are taken to wavelet space along the sequence, attention runs
  there, and the result comes back by the inverse transform:

      out = IDWT(Attn(DWT Q, DWT K, DWT V)).

  DWT is the orthonormal Haar transform with `levels` levels (bands a_L, d_L, ..., d_1, band
  l of length n/2^l); the inner op `inner` (any registered op, `inner_args` its arguments)
  attends within each band, the coarse band seeing the sequence at 2^L-token resolution and
  the detail bands its local variations; each band's output is that band's coefficients
  of the output. This is the fixed-wavelet form of the paper (its learned adaptive wavelets
  are not implemented). Sequences are zero-padded to a multiple of 2^levels and the output
  cropped. Wavelets mix neighbouring tokens, so there is no causal form and no token mask.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (GQA when fewer heads).
    mask: not supported (None): a token mask has no meaning between wavelet coefficients.
    is_causal: must be False.
    scale: passed to the inner op.
    levels: number of DWT levels (1 by default).
    wavelet: "haar".
    inner: name of the registered op used in wavelet space ("softmax" by default).
    inner_args: dict of further arguments of the inner op.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("wavelet_attention", is_causal)
  common.check_qkv(query, key, value)
  if mask is not None:
    raise ValueError("wavelet_attention takes no mask: attention runs between wavelet "
                     "coefficients, not tokens")
  levels = checks.positive_int("levels", levels)
  if wavelet not in WAVELETS:
    raise ValueError(f"wavelet must be one of {WAVELETS}, got {wavelet!r}")
  if not isinstance(inner, str):
    raise ValueError(f"inner must be the name of a registered op, got {inner!r}")
  try:
    inner_spec = spec(inner)
  except KeyError as e:
    raise ValueError(f"inner: {e.args[0]}") from None
  if inner_spec.grid or inner == "wavelet_attention":
    raise ValueError(f"inner must be a 1-D sequence op other than wavelet_attention, got "
                     f"{inner!r}")
  if inner_args is not None and not isinstance(inner_args, dict):
    raise ValueError(f"inner_args must be a dict or None, got {inner_args!r}")
  multiple = 2 ** levels

  def to_bands(x):
    pad = -x.shape[1] % multiple
    x = jnp.pad(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                [(0, 0), (0, pad), (0, 0), (0, 0)])
    return haar_dwt(x, levels)

  bands = [inner_spec.fn(q, k, v, scale=scale, **(inner_args or {}))
           for q, k, v in zip(to_bands(query), to_bands(key), to_bands(value))]
  return haar_idwt(bands)[:, :query.shape[1]].astype(query.dtype)
