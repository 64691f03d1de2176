"""Combiner: full-support attention at sub-quadratic cost through region summaries.

Combiner: Full Attention Transformer with Sparse Computation Cost (Ren et al., NeurIPS 2021),
the Combiner-Fixed factorisation: every query attends directly to the keys of its own block and
to one summary per other block, whose probability mass is spread over the block's keys, so
every key keeps a non-zero weight (full attention support) at O(L·(c + L/c)) cost.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register

KEY_POOLS = ("mean", "max")


@register("combiner", segment_ids=True, head_args={},
          block_refusal=(
              "a query attends to the keys of its own block of ⌈√n⌉ tokens (n the whole length) "
              "and to one summary key and value per earlier block, so what it sees follows a "
              "partition of the whole sequence, not the key blocks of the shards"))
def combiner_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                       segment_ids=None, block_size=None, key_pool="mean"):
  """Combiner-Fixed attention (Combiner: Full Attention Transformer with Sparse Computation
  Cost, Ren et al. 2021).

  The sequence is cut into blocks Ω_1..Ω_S of `block_size` c tokens. Query i in block b(i)
  attends directly to Ω⁰_i = Ω_b(i) (to its keys j ≤ i when causal) and, through summaries, to
  the other blocks r (only r < b(i) when causal). The attention factorises as

      p(j | i) = exp(s·q_i·k_j) / Z_i                                j ∈ Ω⁰_i
      p(j | i) = p(Ω_r | i) · q(j | Ω_r),  p(Ω_r | i) = exp(s·q_i·k̄_r) / Z_i   j ∈ Ω_r
      Z_i = Σ_{j∈Ω⁰_i} exp(s·q_i·k_j) + Σ_r exp(s·q_i·k̄_r)
      out_i = Σ_j p(j | i) v_j = Σ_{j∈Ω⁰_i} p(j | i) v_j + Σ_r p(Ω_r | i) v̄_r

  with the region's summary key k̄_r its keys' mean (`key_pool="mean"`) or element-wise max
  (`"max"`), q(j | Ω_r) = 1/|Ω_r| (so v̄_r is the values' mean). The weights sum to one over
  every key: full attention support. Cost O(L·(c + L/c)), O(L√L) for c = √L. Any length:
  the last block is padded internally and the pad masked.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads;
      self-attention (q_len == kv_len).
    mask: optional key-padding mask, boolean, broadcastable to `[batch, heads, 1, kv_len]`
      (masked keys leave the direct part and the summaries; a block with no key left drops
      out). Masks that vary over queries would make every summary per-query (quadratic cost)
      and raise.
    is_causal: direct attention to the current block's keys j ≤ i, summaries of earlier
      blocks only.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    segment_ids: `[batch, seq]` ints of packed sequences: blocks are counted from each
      segment's start and a query sees its own segment's keys and regions only, as each segment
      alone with this `block_size`; computed densely, O(L²).
    block_size: block length c ≥ 1; default ⌈√L⌉, the paper's choice (O(L√L) cost).
    key_pool: "mean" or "max", the summary key k̄_r.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len:
    raise ValueError("combiner is self-attention over one sequence: q_len must equal kv_len, "
                     f"got {dims.q_len} and {dims.kv_len}")
  if block_size is None:
    block_size = math.isqrt(max(dims.q_len, 1) - 1) + 1  # ⌈√L⌉
  block_size = checks.positive_int("block_size", block_size)
  if key_pool not in KEY_POOLS:
    raise ValueError(f"key_pool must be one of {KEY_POOLS}, got {key_pool!r}")
  full = common.make_mask(dims, mask=mask)
  if full is not None and full.shape[2] != 1:
    raise ValueError("combiner takes key-padding masks broadcastable to [batch, heads, 1, "
                     f"kv_len]; got a mask of shape {mask.shape} that varies over queries")
  scale = common.default_scale(dims.head_dim, scale)
  length, c = dims.q_len, int(block_size)
  if segment_ids is not None:
    return _combiner_segments(query, key, value, full, segment_ids, dims, scale, c, key_pool,
                              is_causal)
  num_blocks = -(-length // c)
  pad = num_blocks * c - length

  def blocked(x):  # [b, L, ...] -> [b, S, c, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], num_blocks, c, *x.shape[2:])

  # Valid keys [b|1, k|1, g|1, S, c]: the key-padding mask and the internal pad.
  in_range = jnp.arange(num_blocks * c) < length
  if full is None:
    valid = in_range[None, None, None]
  else:
    valid = common.grouped(full, dims)[:, :, :, 0]  # [b|1, k|1, g|1, L]
    valid = jnp.pad(valid, [(0, 0)] * 3 + [(0, pad)]) & in_range
  valid = valid.reshape(*valid.shape[:3], num_blocks, c)

  q = blocked(query).reshape(dims.batch, num_blocks, c, dims.num_kv_heads, dims.groups,
                             dims.head_dim)
  k = blocked(key).astype(jnp.float32)  # [b, S, c, k, d]
  v = blocked(value).astype(jnp.float32)
  key_valid = jnp.moveaxis(valid, (3, 4), (1, 2))[..., None]  # [b|1, S, c, k|1, g|1, 1]
  k_g, v_g = k[:, :, :, :, None], v[:, :, :, :, None]  # [b, S, c, k, 1, d]

  # Region summaries [b, S, k, g|1, d] over the valid keys; `has_key` [b|1, S, k|1, g|1].
  count = jnp.sum(key_valid, axis=2)
  has_key = count[..., 0] > 0
  if key_pool == "mean":
    k_sum = jnp.sum(jnp.where(key_valid, k_g, 0.0), axis=2) / jnp.maximum(count, 1)
  else:
    k_sum = jnp.max(jnp.where(key_valid, k_g, common.MASKED_LOGIT), axis=2)
    k_sum = jnp.where(has_key[..., None], k_sum, 0.0)
  v_sum = jnp.sum(jnp.where(key_valid, v_g, 0.0), axis=2) / jnp.maximum(count, 1)
  k_sum, v_sum = (jnp.broadcast_to(x, x.shape[:3] + (dims.groups, x.shape[-1]))
                  for x in (k_sum, v_sum))

  direct = jnp.einsum("bSikgd,bSjkd->bSkgij", q, k, preferred_element_type=jnp.float32) * scale
  summary = jnp.einsum("bSikgd,brkgd->bSkgir", q.astype(jnp.float32), k_sum) * scale
  # Masks laid out as the logits: direct [b|1, S, k|1, g|1, 1|c, c], summary [b|1, S|1, ..., r].
  direct_mask = jnp.moveaxis(valid, 3, 1)[..., None, :]
  blocks = np.arange(num_blocks)
  if is_causal:
    direct_mask = direct_mask & np.tril(np.ones((c, c), bool))
    region_seen = blocks[None, :] < blocks[:, None]  # [S_q, S_r]
  else:
    region_seen = blocks[None, :] != blocks[:, None]
  summary_mask = (jnp.moveaxis(has_key, 1, -1)[:, None, :, :, None, :]
                  & region_seen[None, :, None, None, None, :])
  logits = jnp.concatenate(
      [direct, jnp.broadcast_to(summary, direct.shape[:-1] + (num_blocks,))], axis=-1)
  both = jnp.concatenate(
      [jnp.broadcast_to(direct_mask, direct.shape),
       jnp.broadcast_to(summary_mask, direct.shape[:-1] + (num_blocks,))], axis=-1)
  probs = common.masked_softmax(logits, both)
  out = (jnp.einsum("bSkgij,bSjkd->bSikgd", probs[..., :c], v)
         + jnp.einsum("bSkgir,brkgd->bSikgd", probs[..., c:], v_sum))
  out = out.reshape(dims.batch, num_blocks * c, dims.num_heads, dims.value_dim)[:, :length]
  return out.astype(query.dtype)


def _combiner_segments(query, key, value, full, segment_ids, dims, scale, c, key_pool,
                       is_causal):
  """Combiner-Fixed over packed segments, densely: a token's block is its index within its
  segment // c, and each region (segment, block) is represented by its first token p."""
  n = dims.q_len
  same, local = common.segment_layout(segment_ids, dims)  # [b, t, s], [b, n]
  blk = local // c
  same_blk = same & (blk[:, :, None] == blk[:, None, :])
  first = jnp.argmax(same_blk, axis=-1)  # [b, n]: the region's first token
  shape = (dims.batch, dims.num_kv_heads, dims.groups, n, n)
  valid = (jnp.ones((1, 1, 1, n), bool) if full is None
           else common.grouped(full, dims)[:, :, :, 0])
  member = jnp.broadcast_to(  # [b, k, g, p, j]: key j is valid and in the region of token p
      (first[:, None, :] == jnp.arange(n)[None, :, None])[:, None, None]
      & valid[:, :, :, None, :], shape)
  count = jnp.sum(member, axis=-1)  # [b, k, g, p]
  has_key = count > 0
  k, v = key.astype(jnp.float32), value.astype(jnp.float32)
  mean = member / jnp.maximum(count, 1)[..., None]
  if key_pool == "mean":
    k_sum = jnp.einsum("bkgpj,bjkd->bkgpd", mean, k)
  else:
    k_sum = jnp.max(jnp.where(member[..., None], jnp.moveaxis(k, 1, 2)[:, :, None, None],
                              common.MASKED_LOGIT), axis=-2)
    k_sum = jnp.where(has_key[..., None], k_sum, 0.0)
  v_sum = jnp.einsum("bkgpj,bjkd->bkgpd", mean, v)

  q = common.group_query(query, dims.num_kv_heads).astype(jnp.float32)  # [b, t, k, g, d]
  direct = jnp.einsum("btkgd,bskd->bkgts", q, k) * scale
  summary = jnp.einsum("btkgd,bkgpd->bkgtp", q, k_sum) * scale
  before = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  direct_mask = (same_blk & before if is_causal else same_blk)[:, None, None] & valid[
      :, :, :, None, :]
  region_seen = (blk[:, None, :] < blk[:, :, None] if is_causal
                 else blk[:, None, :] != blk[:, :, None])  # [b, t, p]
  summary_mask = (same & region_seen)[:, None, None] & has_key[:, :, :, None, :]
  probs = common.masked_softmax(
      jnp.concatenate([direct, summary], axis=-1),
      jnp.concatenate([jnp.broadcast_to(direct_mask, shape),
                       jnp.broadcast_to(summary_mask, shape)], axis=-1))
  out = (jnp.einsum("bkgts,bskd->btkgd", probs[..., :n], v)
         + jnp.einsum("bkgtp,bkgpd->btkgd", probs[..., n:], v_sum))
  return out.reshape(dims.batch, n, dims.num_heads, dims.value_dim).astype(query.dtype)
