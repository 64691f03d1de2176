"""Decode-phase attention over a key/value cache, split along the cache length (Lean Attention).

Lean Attention (Sanovar et al. 2024, "Lean Attention: Hardware-Aware Scalable Attention
Mechanism for the Decode-Phase of Transformers") observes that in decoding the few queries
attend a long cache, so the work must be split along the key/value length: each split c of the
cache computes a partial, locally normalised softmax state

    m_c = max_j s_j,   l_c = Σ_{j∈c} e^(s_j - m_c),   O_c = Σ_{j∈c} e^(s_j - m_c) v_j / l_c,
    lse_c = m_c + log l_c,

and the states are merged through the log-sum-exp (an associative "softmax rescaling" reduction):

    lse = log Σ_c e^(lse_c),   O = Σ_c e^(lse_c - lse) O_c.

Here the splits are computed side by side (one batched computation over `[splits, block]`) and
reduced once; on an accelerator XLA maps the splits to separate cores, as Lean Attention's
stream-K partition does, instead of one core walking the whole cache.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, register

Array = jax.Array


def _valid_lengths(kv_length, dims: common.Dims) -> Array:
  """`kv_length` (None, int or `[batch]` ints) as int32 `[batch]`, checked where concrete."""
  if kv_length is None:
    return jnp.full((dims.batch,), dims.kv_len, jnp.int32)
  if isinstance(kv_length, int) and not isinstance(kv_length, bool):
    if not 0 <= kv_length <= dims.kv_len:
      raise ValueError(f"kv_length must be in [0, {dims.kv_len}] (the cache length), got "
                       f"{kv_length}")
    return jnp.full((dims.batch,), kv_length, jnp.int32)
  if not hasattr(kv_length, "dtype") or not jnp.issubdtype(kv_length.dtype, jnp.integer):
    raise TypeError(f"kv_length must be None, an int or an integer array, got "
                    f"{type(kv_length).__name__}")
  if kv_length.ndim not in (0, 1) or (kv_length.ndim == 1
                                      and kv_length.shape[0] not in (1, dims.batch)):
    raise ValueError(f"kv_length must be a scalar or have shape [batch] = [{dims.batch}], got "
                     f"shape {kv_length.shape}")
  return jnp.broadcast_to(kv_length.astype(jnp.int32), (dims.batch,))


def _lean_block_form(query, key, scale, *, kv_length=None, block_size=256) -> BlockForm:
  """Lean attention is softmax attention merged through the log-sum-exp: its sequence-parallel
  form is the ring's softmax blocks (the shards are its splits, so `block_size` only checked).
  The sequence is the whole cache: `kv_length` must be None."""
  checks.positive_int("block_size", block_size)
  if kv_length is not None:
    raise ValueError("lean_decode's sequence-parallel form attends the whole sequence: "
                     f"kv_length must be None, got {kv_length!r}")
  return BlockForm("softmax", query, key, scale)


@register("lean_decode", block_form=_lean_block_form)
def lean_decode_attention(query: Array, key: Array, value: Array, *, mask: Array | None = None,
                          is_causal: bool = False, scale: float | None = None,
                          kv_length=None, block_size: int = 256) -> Array:
  """Softmax attention of a few queries over a long cache, split along the cache (Lean Attention).

  out = softmax(s·QKᵀ, masked) V, computed as `ceil(kv_len / block_size)` partial softmax states
  `(O_c, lse_c)` merged by lse = log Σ_c e^(lse_c), O = Σ_c e^(lse_c - lse) O_c
  (Sanovar et al. 2024). Equal to `dot_product_attention` with the same mask.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`: the newest `q_len` tokens (1 in decoding).
    key: `[batch, cache_len, num_kv_heads, head_dim]` (GQA: num_heads % num_kv_heads == 0).
    value: `[batch, cache_len, num_kv_heads, value_dim]`.
    mask: optional boolean, broadcastable to `[batch, num_heads, q_len, cache_len]`.
    is_causal: the queries are the last `q_len` of the valid cache: query i (position
      `kv_length - q_len + i`) attends cache entries j <= that position.
    scale: logit scale; `1/sqrt(head_dim)` when None.
    kv_length: valid cache entries per sequence (None: all; an int; or int `[batch]`); entries
      at and after it are ignored (the unfilled part of a preallocated cache).
    block_size: cache entries per split (the cache is padded to a whole number of splits).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; a query with no visible
    entry gives zeros.
  """
  dims = common.check_qkv(query, key, value)
  block_size = checks.positive_int("block_size", block_size)
  if mask is not None:
    common.make_mask(dims, mask=mask)  # type and shape checks
  lengths = _valid_lengths(kv_length, dims)
  scale = common.default_scale(dims.head_dim, scale)
  block = min(block_size, max(dims.kv_len, 1))
  splits = math.ceil(dims.kv_len / block) if dims.kv_len else 1
  pad = splits * block - dims.kv_len

  # Visibility of every (query, cache entry): [b, 1|n, t, s_padded].
  cols = jnp.arange(splits * block)
  visible = (cols[None, :] < lengths[:, None])[:, None, None, :]
  if is_causal:
    q_pos = lengths[:, None] - dims.q_len + jnp.arange(dims.q_len)[None, :]  # [b, t]
    visible = visible & (cols[None, None, :] <= q_pos[:, :, None])[:, None]
  if mask is not None:
    visible = visible & jnp.pad(mask, [(0, 0)] * 3 + [(0, pad)])
  key = jnp.pad(key, [(0, 0), (0, pad), (0, 0), (0, 0)])
  value = jnp.pad(value, [(0, 0), (0, pad), (0, 0), (0, 0)])

  logits = common.attention_logits(query, key, dims._replace(kv_len=splits * block), scale)
  b, k, g, t = logits.shape[:4]
  logits = logits.reshape(b, k, g, t, splits, block)  # [b, k, g, t, c, block]
  visible = common.grouped(visible, dims)
  visible = jnp.broadcast_to(visible, visible.shape[:4] + (splits * block,)).reshape(
      visible.shape[:4] + (splits, block))

  # Partial states of every split.
  logits = jnp.where(visible, logits, common.MASKED_LOGIT)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(m > common.MASKED_LOGIT, m, 0.0))
  p = jnp.where(visible, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1)  # [b, k, g, t, c]
  v = value.reshape(b, splits, block, k, dims.value_dim)
  o = jnp.einsum("bkgtcs,bcskd->bkgtcd", p.astype(value.dtype), v,
                 preferred_element_type=jnp.float32)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), common.MASKED_LOGIT)

  # Log-sum-exp merge of the splits.
  top = jax.lax.stop_gradient(jnp.max(lse, axis=-1, keepdims=True))
  top = jnp.where(top > common.MASKED_LOGIT, top, 0.0)
  w = jnp.exp(lse - top)  # 0 for empty splits
  total = jnp.sum(w, axis=-1, keepdims=True)
  w = w / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgtc,bkgtcd->btkgd", w, o)
  return out.reshape(b, t, dims.num_heads, dims.value_dim).astype(query.dtype)
