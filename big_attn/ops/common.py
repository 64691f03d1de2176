"""Shared pieces of the attention ops: input checks, masks, and masked normalisation.

Every op takes `[batch, seq, heads, head_dim]` arrays. Keys and values may have fewer heads
than queries (grouped-query attention). Masks are boolean, True = may attend, broadcastable to
`[batch, heads, q_seq, kv_seq]`. The layout checks, masks and masked softmax that the Pallas
kernels share with the ops live in `pallas_kernels.common` and are re-exported here.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from pallas_kernels.common import (MASKED_LOGIT, Array, Dims, attention_logits,
                                   check_broadcastable, check_float, check_qkv, default_scale,
                                   group_query, grouped, make_mask, masked_softmax,
                                   normalize_segment_ids, normalize_window, weighted_values)

from big_attn.ops import checks

__all__ = ["MASKED_LOGIT", "Array", "Dims", "apply_row_mask", "attention_logits", "cap_and_bias",
           "check_bias", "check_broadcastable", "check_float", "check_no_causal", "check_qkv",
           "check_weight", "default_scale", "group_query", "grouped", "largest_divisor",
           "make_mask", "masked_softmax", "normalize_segment_ids", "normalize_window", "scores",
           "segment_layout", "weighted_values"]


def check_weight(name: str, x: Any, shape: tuple[int, ...], layout: str) -> None:
  """A required floating array argument of exactly `shape`; errors name it and its `layout`."""
  if x is None:
    raise ValueError(f"{name} {layout} = {tuple(shape)} is required")
  check_float(name, x)
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")


def largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of `n` that is <= `at_most` (1 for n = 0): a paper's size clipped to
  fit `n`."""
  return max((d for d in range(1, min(n, at_most) + 1) if n % d == 0), default=1)


def check_bias(bias: Array | None, dims: Dims) -> None:
  if bias is None:
    return
  check_float("bias", bias)
  check_broadcastable("bias", bias, dims)


def scores(query: Array, key: Array, value: Array, *, scale=None, bias=None, mask=None,
           is_causal=False, segment_ids=None, local_window_size=None, logits_soft_cap=None
           ) -> tuple[Dims, Array, Array | None]:
  """Checked sizes, grouped float32 logits and grouped mask, as the score-based ops use them.

  logits = cap·tanh(scale·QKᵀ/cap) + B, `[b, k, g, t, s]`; the mask combines `mask`,
  `is_causal`, `segment_ids` and `local_window_size` (`make_mask`), laid out like the logits.
  """
  dims = check_qkv(query, key, value)
  check_bias(bias, dims)
  if logits_soft_cap is not None:
    logits_soft_cap = checks.positive_float("logits_soft_cap", logits_soft_cap)
  full_mask = make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                        local_window_size=local_window_size)
  logits = attention_logits(query, key, dims, default_scale(dims.head_dim, scale))
  return dims, cap_and_bias(logits, logits_soft_cap, grouped(bias, dims)), grouped(full_mask, dims)


def cap_and_bias(logits: Array, logits_soft_cap: float | None, bias: Array | None) -> Array:
  """cap·tanh(logits/cap) + B (either optional), the bias added in float32."""
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def apply_row_mask(out: Array, mask: Array | None, dims: Dims) -> Array:
  """Zeros the output of query rows that have nothing to attend to (`out` is `[b,t,n,d]`)."""
  if mask is None:
    return out
  any_key = jnp.any(mask, axis=-1)  # [b|1, n|1, t]
  any_key = jnp.broadcast_to(any_key, (any_key.shape[0], dims.num_heads if any_key.shape[1] != 1
                                       else 1, dims.q_len))
  keep = jnp.transpose(any_key, (0, 2, 1))[..., None]  # [b|1, t, n|1, 1]
  return jnp.where(keep, out, jnp.zeros((), out.dtype))


def check_no_causal(name: str, is_causal: bool) -> None:
  if is_causal:
    raise NotImplementedError(f"op {name!r} has no causal form (is_causal=True)")


def segment_layout(segment_ids, dims: Dims) -> tuple[Array, Array]:
  """Packed rows of a self-attention op (q_len == kv_len): `same [b, t, s]`, whether query t
  and key s share a segment, and `local [b, seq]`, each token's index within its segment (the
  number of earlier tokens with its id), so that a segment computes as if run alone."""
  q_seg, kv_seg = normalize_segment_ids(segment_ids, dims)
  same = q_seg[:, :, None] == kv_seg[:, None, :]
  earlier = jnp.tril(jnp.ones((dims.kv_len, dims.kv_len), bool), -1)
  local = jnp.sum((kv_seg[:, :, None] == kv_seg[:, None, :]) & earlier, axis=-1)
  return same, local
