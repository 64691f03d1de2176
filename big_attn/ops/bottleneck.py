"""Bottleneck-token attention: a few proxy / carrier / agent tokens gather from all tokens,
attend among themselves, and broadcast back (Qihoo-T2X proxy tokens, FasterViT carrier tokens,
LookupViT's compressed tokens).

With P bottleneck tokens the cost is O(seq·P) instead of O(seq²); no `[seq, seq]` matrix is
formed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array


# LookupViT's compressed tokens: a 7 x 7 grid.
LOOKUP_TOKENS = 49


def _pooled_queries(query: Array, num_tokens: int) -> Array:
  """Means of `num_tokens` contiguous, equal segments of the queries: `[b, P, n, d]`."""
  b, t, n, d = query.shape
  if t % num_tokens:
    raise ValueError(f"num_tokens ({num_tokens}) must divide the query length ({t}) to pool "
                     "the bottleneck queries; or pass bottleneck_queries")
  pooled = query.astype(jnp.float32).reshape(b, num_tokens, t // num_tokens, n, d).mean(2)
  return pooled.astype(query.dtype)


@register("bottleneck", causal=False)
def bottleneck_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         num_tokens=None, bottleneck_queries=None):
  """Bottleneck-token attention: proxy tokens of Qihoo-T2X (Wang et al., 2024, pyramid proxy
  attention), carrier tokens of FasterViT (Hatamizadeh et al., 2024), LookupViT (Koner et
  al., 2024).

  P bottleneck tokens with queries B (`bottleneck_queries`, or the means of P contiguous
  segments of the queries, as pooled carrier tokens) exchange information with all tokens in
  three attentions:

      Z  = softmax(s·B Kᵀ) V               gather: the bottleneck reads every token,
      Z' = softmax(s·Z Zᵀ) Z               the bottleneck tokens attend among themselves,
      out = softmax(s·Q Z'ᵀ) Z'            broadcast: every token reads the bottleneck.

  The op takes no weights, so the bottleneck tokens act as their own queries, keys and values
  in the last two stages (identity projections); this needs value_dim == head_dim. Keys and
  values may have fewer heads (GQA, first stage); Z has one bottleneck per query head.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, head_dim]`.
    mask: optional key-padding mask broadcastable to `[batch, num_heads, 1, kv_len]`, applied
      when the bottleneck gathers; a batch row without valid keys returns zeros.
    is_causal: must be False (the bottleneck mixes all positions).
    scale: logit scale s of the three attentions; `1/sqrt(head_dim)` when None.
    num_tokens: P, used when `bottleneck_queries` is None (then it must divide q_len; the
      pooled means include every query token, padding too: pass `bottleneck_queries` pooled
      over the valid tokens when the queries are padded). Default LookupViT's 7×7 = 49
      compressed tokens, or the largest divisor of q_len below 49.
    bottleneck_queries: B `[batch | 1, P, num_heads, head_dim]`.

  Returns:
    `[batch, q_len, num_heads, head_dim]` in the query's dtype.
  """
  common.check_no_causal("bottleneck", is_causal)
  dims = common.check_qkv(query, key, value)
  if dims.value_dim != dims.head_dim:
    raise ValueError("bottleneck uses its tokens (values) as keys of the later stages: value "
                     f"head_dim must equal query head_dim {dims.head_dim}, got {dims.value_dim}")
  if mask is not None:
    full = common.make_mask(dims, mask=mask)
    if full.shape[2] != 1:
      raise ValueError("bottleneck supports key-padding masks only: mask must broadcast to "
                       f"[batch, num_heads, 1, kv_len], got shape {mask.shape}")
  num_tokens = checks.positive_int("num_tokens", num_tokens, optional=True)
  if bottleneck_queries is None:
    if num_tokens is None:
      num_tokens = common.largest_divisor(dims.q_len, LOOKUP_TOKENS)
    tokens = _pooled_queries(query, num_tokens)
  else:
    common.check_float("bottleneck_queries", bottleneck_queries)
    want = (dims.num_heads, dims.head_dim)
    if (bottleneck_queries.ndim != 4 or bottleneck_queries.shape[0] not in (1, dims.batch)
        or tuple(bottleneck_queries.shape[2:]) != want
        or num_tokens not in (None, bottleneck_queries.shape[1])):
      raise ValueError(
          "bottleneck_queries must have shape [batch | 1, num_tokens, num_heads, head_dim] = "
          f"[{dims.batch} | 1, {num_tokens or 'P'}, {want[0]}, {want[1]}], "
          f"got {bottleneck_queries.shape}")
    tokens = jnp.broadcast_to(bottleneck_queries, (dims.batch,) + bottleneck_queries.shape[1:])
    tokens = tokens.astype(query.dtype)
  attend = lambda q, k, v, m=None: dot_product_attention(  # pylint: disable=g-long-lambda
      q, k, v, mask=m, scale=scale, implementation="xla")
  gathered = attend(tokens, key, value, mask)
  mixed = attend(gathered, gathered, gathered)
  return attend(query, mixed, mixed)
