"""Block-sparse attention with a predicted block mask (SpargeAttn's two-stage filter, on
SageAttention's int8 scores)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import quantized as quantized_ops
from big_attn.ops.registry import register

_BLOCK_REFUSAL = (
    "which key blocks a query block keeps is chosen by TopCdf on the softmax of pooled scores "
    "over all its key blocks, a ranking of the whole row that key blocks cannot make alone")


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def safeguard_blocks(q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
  """`[q_blocks, kv_blocks]` blocks always computed: the first key block and the key blocks
  sharing token positions with the query block (the diagonal)."""
  i = np.arange(-(-q_len // block_q))[:, None]
  j = np.arange(-(-kv_len // block_k))[None, :]
  diagonal = (j * block_k < (i + 1) * block_q) & (i * block_q < (j + 1) * block_k)
  return diagonal | (j == 0)


def _block_means(x: jax.Array, block: int, num_blocks: int) -> jax.Array:
  """`[b, t, h, d]` -> `[b, num_blocks, h, d]`: the mean of each block's real tokens."""
  b, t, h, d = x.shape
  sums = _pad_to(x.astype(jnp.float32), 1, num_blocks * block).reshape(
      b, num_blocks, block, h, d).sum(axis=2)
  counts = np.minimum(block, t - block * np.arange(num_blocks)).astype(np.float32)
  return sums / counts[None, :, None, None]


def block_self_similarity(x: jax.Array, block: int, num_blocks: int) -> jax.Array:
  """`[b, t, h, d]` -> `[b, num_blocks, h]`: the mean cosine similarity over all token pairs of
  each block (its real tokens, pairs (i, i) included) = |Σ_i x_i/|x_i||² / count²."""
  b, t, h, d = x.shape
  x = x.astype(jnp.float32)
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  unit = x / jnp.sqrt(jnp.where(squares > 0.0, squares, 1.0))  # finite gradient at x = 0
  sums = _pad_to(unit, 1, num_blocks * block).reshape(b, num_blocks, block, h, d).sum(axis=2)
  counts = np.minimum(block, t - block * np.arange(num_blocks)).astype(np.float32)
  return jnp.sum(sums * sums, axis=-1) / (counts * counts)[None, :, None]


def _index(size: int, full: int, axis: int, ndim: int) -> jax.Array:
  """Index array along `axis` of a `[.., size, ..]` dimension broadcast to `full`."""
  shape = [1] * ndim
  shape[axis] = full
  ix = jnp.arange(full) if size == full else jnp.zeros(full, jnp.int32)
  return ix.reshape(shape)


def skipped_pv_blocks(logits, mask, row_valid, pv_threshold, per_row):
  """SpargeAttn's second stage: `[b, k, g, nq, (block_q,) slots]` True where the online softmax,
  visiting a query block's key-block slots in order, skips the product P̃V of a slot.

  With m_local the row max of the slot's (masked) scores and m the running max over the slots
  so far (m_local included), the product is skipped when max over the block's valid rows of
  (m_local − m) < λ = `pv_threshold` (per row when `per_row`). `logits` and `mask` are
  `[b, k, g, nq, block_q, slots, block_k]`, `row_valid` `[nq, block_q]` the real query rows."""
  local = jnp.max(jnp.where(mask, logits, common.MASKED_LOGIT), axis=-1)
  running = jax.lax.cummax(local, axis=local.ndim - 1)
  counted = jnp.any(mask, axis=-1) & row_valid[:, :, None]  # rows with a visible key
  gap = jnp.where(counted, local - running, common.MASKED_LOGIT)
  if not per_row:
    gap = jnp.max(gap, axis=-2)
  return jax.lax.stop_gradient(gap < pv_threshold)


def _int8_block_logits(query, key, blocks, dims, scale, block_q, block_k, num_q_blocks,
                       is_causal):
  """SageAttention's int8 scores (`quantized.quantize_query_key`: smoothed keys, per-block
  scales) of the gathered key blocks, `[b, k, g, nq, block_q, slots, block_k]` float32; under
  `is_causal` s·q_i·μ_J of each key block's smoothing mean μ_J is added back."""
  b, k, g, d = dims.batch, dims.num_kv_heads, dims.groups, dims.head_dim
  q8, q_scale, k8, k_scale, mean = quantized_ops.quantize_query_key(query, key, block_q,
                                                                    block_k, is_causal)
  q_rows = lambda x: _pad_to(x, 1, num_q_blocks * block_q).reshape(  # noqa: E731
      b, num_q_blocks, block_q, k, g, -1)
  qk = jnp.einsum("bqikgd,bkgqcjd->bkgqicj", q_rows(q8), blocks(k8),
                  preferred_element_type=jnp.int32)
  q_scale = jnp.transpose(q_rows(q_scale[..., None])[..., 0], (0, 3, 4, 1, 2))
  k_scale = blocks(k_scale[..., None])[..., 0]  # [b, k, g, nq, slots, block_k]
  logits = (qk.astype(jnp.float32) * jnp.float32(scale) * q_scale[..., None, None]
            * k_scale[:, :, :, :, None])
  if is_causal:  # μ is constant within a key block: its first token's
    block_mean = blocks(mean)[..., 0, :]  # [b, k, g, nq, slots, d]
    logits = logits + jnp.einsum("bqikgd,bkgqcd->bkgqic", q_rows(query.astype(jnp.float32)),
                                 block_mean)[..., None] * jnp.float32(scale)
  return logits


@register("sparse_blocks", segment_ids=True, head_args={}, block_refusal=_BLOCK_REFUSAL)
def sparse_blocks_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                            block_q=64, block_k=64, cdf_threshold=0.95, topk_blocks=None,
                            similarity_threshold=None, segment_ids=None,
                            local_window_size=None, pv_threshold=None, quantized=False):
  """Predicted block-sparse attention (SpargeAttn: Accurate Sparse Attention Accelerating Any
  Model Inference, Zhang et al. 2025), its first-stage filter with exact attention in the kept
  blocks.

  1. Pool: q̄_I = mean of query block I, k̄_J = mean of key block J (real tokens only).
  2. Predict: P̃_I = softmax_J(s·q̄_I·k̄_J) over the allowed key blocks J (those with at least
     one (i, j) pair the masks allow), leaving out the key blocks that are not self-similar
     (below). With `is_causal` the prediction uses only what the block's first query i₀
     sees, so no output depends on a later token: q̄_I = q_{i₀} and J ranges over the key
     blocks ending at or before i₀ (the others are diagonal safeguards, always kept); query blocks
     are not tested for self-similarity. A NaN in the pooled scores gives NaN rows.
  3. Select (TopCdf): sort P̃_I descending and keep the shortest prefix whose mass reaches
     `cdf_threshold` (block J is kept when the mass ranked before it is < τ; τ = 1 keeps every
     allowed block); with `topk_blocks` at most that many of them. The first key block and the
     diagonal blocks (sharing positions with query block I) are always kept, as safeguards for
     attention sinks and local attention.
     Self-similarity (with `similarity_threshold` θ, the paper's fix for blocks a mean does not
     summarise): a block's similarity is the mean cosine similarity of its token pairs; a
     query block with similarity ≤ θ keeps every allowed key block, and a key block with
     similarity ≤ θ is kept by every query block (the authors' code uses θ = 0.1).
  4. Attend: out_i = softmax_j(s·q_i·k_j, masked, j in kept blocks of I) V, computed on the kept
     key/value blocks gathered per query block, `[q_blocks, slots, block_q, block_k]` scores;
     slots = all key blocks, or `topk_blocks` + the safeguards when it is given: O(n·k·block).

  5. Second stage (with `pv_threshold` λ ≤ 0, `skipped_pv_blocks`): the online softmax visits
     the kept key blocks of query block I in index order with running row max m; the product
     P̃_IJ·V_J of block J is skipped when max over the block's rows of (rowmax S_IJ − m) < λ
     (its weights are all below e^λ times the row's running max weight); the normaliser
     still counts the block, as in the paper's kernel. The result is the softmax above with
     the skipped blocks' weights set to 0. The paper decides per GPU warp (a slice of the
     block's rows); here per query block, and per row under `is_causal` (so no output
     depends on a later query of its block).
  `quantized`: the scores of step 4 are SageAttention's (`sage_int8`: int8 Q̂K̂ᵀ of smoothed
  keys with one scale per `block_q` / `block_k` tokens, `quantized.quantize_query_key`), as
  SpargeAttn builds on it; the gradient is straight-through, that of the op with float scores
  (as `sage_int8`'s).
  Differences from the authors' code: it keeps the blocks whose inclusive cumulative mass is ≤ τ (at least one),
  here the mass is reached; its `topk` is a fraction of the blocks, here a count; its sink block
  is optional and it has no diagonal safeguard. The block selection has no gradient.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids, local_window_size: as `dot_product_attention`.
    block_q, block_k: query and key block sizes (any sequence length: the last block may be
      partial).
    cdf_threshold: τ in (0, 1]: cumulative pooled mass kept per query block.
    topk_blocks: optional cap on the selected key blocks per query block (safeguards extra).
    similarity_threshold: θ of the self-similarity rule; None turns it off. With θ set, the
      slots are all key blocks (a dense row or column has no bound).
    pv_threshold: λ ≤ 0 of the second stage; None turns it off.
    quantized: SageAttention's int8 scores in the kept blocks.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  checks.positive_int("block_q", block_q)
  checks.positive_int("block_k", block_k)
  checks.positive_int("topk_blocks", topk_blocks, optional=True)
  checks.unit_interval("cdf_threshold", cdf_threshold)
  if pv_threshold is not None and not (isinstance(pv_threshold, (int, float, np.floating))
                                       and not isinstance(pv_threshold, bool)
                                       and pv_threshold <= 0):
    raise ValueError(f"pv_threshold must be a number <= 0 or None, got {pv_threshold!r}")
  if not isinstance(quantized, bool):
    raise ValueError(f"quantized must be a bool, got {quantized!r}")
  if similarity_threshold is not None and (
      not isinstance(similarity_threshold, (int, float, np.floating))
      or isinstance(similarity_threshold, bool)):
    raise ValueError(f"similarity_threshold must be a number or None, got "
                     f"{similarity_threshold!r}")
  attend = functools.partial(
      _sparse_blocks, dims=dims, is_causal=is_causal, scale=scale, block_q=block_q,
      block_k=block_k, cdf_threshold=cdf_threshold, topk_blocks=topk_blocks,
      similarity_threshold=similarity_threshold, local_window_size=local_window_size,
      pv_threshold=pv_threshold)
  if not quantized or not dims.q_len or not dims.kv_len:  # nothing to quantise
    return attend(query, key, value, mask=mask, segment_ids=segment_ids, quantized=False)

  # The mask and segment ids are arguments, not closed over: a custom_vjp may not capture
  # tracers of an enclosing transformation (jit, shard_map).
  @jax.custom_vjp
  def int8_forward(q, k, v, mask, segment_ids):
    return attend(q, k, v, mask=mask, segment_ids=segment_ids, quantized=True)

  def int8_forward_fwd(q, k, v, mask, segment_ids):
    return int8_forward(q, k, v, mask, segment_ids), (q, k, v, mask, segment_ids)

  def float_backward(residuals, cotangent):
    *arrays, mask, segment_ids = residuals
    float_fn = functools.partial(attend, mask=mask, segment_ids=segment_ids, quantized=False)
    return (*jax.vjp(float_fn, *arrays)[1](cotangent), None, None)

  int8_forward.defvjp(int8_forward_fwd, float_backward)
  return int8_forward(query, key, value, mask, segment_ids)


def _sparse_blocks(query, key, value, *, dims, mask, is_causal, scale, block_q, block_k,
                   cdf_threshold, topk_blocks, similarity_threshold, segment_ids,
                   local_window_size, pv_threshold, quantized):
  """`sparse_blocks` on checked arguments."""
  scale = common.default_scale(dims.head_dim, scale)
  b, t, s = dims.batch, dims.q_len, dims.kv_len
  k, g, dv = dims.num_kv_heads, dims.groups, dims.value_dim
  nq, nk = -(-t // block_q), -(-s // block_k)
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                               local_window_size=local_window_size)

  # Token mask in blocks `[b|1, k|1, g|1, nq, nk, block_q, block_k]` (padding is masked) and
  # the blocks it allows.
  if full_mask is None:
    token_blocks = None
    allowed = jnp.ones((1, 1, 1, nq, nk), bool)
  else:
    padded = jnp.broadcast_to(full_mask, (*full_mask.shape[:2], t, s))
    padded = _pad_to(_pad_to(padded, 2, nq * block_q), 3, nk * block_k)
    grouped = common.grouped(padded, dims)
    token_blocks = grouped.reshape(*grouped.shape[:3], nq, block_q, nk, block_k)
    token_blocks = jnp.swapaxes(token_blocks, 4, 5)
    allowed = jnp.any(token_blocks, axis=(-2, -1))

  # Predict and select the blocks. Causal: from what the block's first query sees.
  safe = safeguard_blocks(t, s, block_q, block_k)
  if is_causal:
    pooled_q = _pad_to(query.astype(jnp.float32), 1, nq * block_q)[:, ::block_q]
    last_key = (np.arange(nk) + 1) * block_k - 1
    allowed_pred = allowed & (last_key[None, :] <= np.arange(nq)[:, None] * block_q)
  else:
    pooled_q = _block_means(query, block_q, nq)
    allowed_pred = allowed
  pooled_q = common.group_query(pooled_q, k)
  pooled_k = _block_means(key, block_k, nk)
  pooled = jnp.einsum("bqkgd,bckd->bkgqc", pooled_q, pooled_k) * jnp.float32(scale)
  dense = jnp.zeros((1, 1, 1, nq, nk), bool)
  if similarity_threshold is not None:
    k_sim = block_self_similarity(key, block_k, nk)
    dense_cols = jnp.transpose(k_sim, (0, 2, 1))[:, :, None, None, :] <= similarity_threshold
    dense = dense_cols
    if not is_causal:
      q_sim = block_self_similarity(query, block_q, nq).reshape(b, nq, k, g)
      dense = dense | (jnp.transpose(q_sim, (0, 2, 3, 1))[..., None] <= similarity_threshold)
    dense = jax.lax.stop_gradient(dense)
    predicted = allowed_pred & ~dense_cols
  else:
    predicted = allowed_pred
  probs = jax.lax.stop_gradient(common.masked_softmax(pooled, predicted))
  # A NaN in the pooled blocks leaves the selection undefined: the block's rows give NaN.
  undefined = jnp.where(jnp.isnan(pooled).any(-1), jnp.nan, 0.0)  # [b, k, g, nq]
  order = jnp.argsort(-probs, axis=-1, stable=True)
  ranked = jnp.take_along_axis(probs, order, axis=-1)
  keep_ranked = jnp.ones(ranked.shape, bool)
  if cdf_threshold < 1.0:
    keep_ranked = jnp.cumsum(ranked, axis=-1) - ranked < cdf_threshold
  if topk_blocks is not None:
    keep_ranked &= jnp.arange(nk) < topk_blocks
  rank = jnp.argsort(order, axis=-1)
  keep = ((jnp.take_along_axis(keep_ranked, rank, axis=-1) & predicted) | safe | dense) & allowed

  # Gather the kept key/value blocks per query block: slots in order of predicted mass.
  slots = nk
  if topk_blocks is not None and similarity_threshold is None:
    slots = min(nk, topk_blocks + int(safe.sum(-1).max()))
  keep = jnp.broadcast_to(keep, (b, k, g, nq, nk))
  slot_block = jnp.argsort(jnp.where(keep, rank, rank + nk), axis=-1)[..., :slots]
  slot_block = jnp.sort(slot_block, axis=-1)  # the online softmax visits key blocks in order
  slot_on = jnp.take_along_axis(keep, slot_block, axis=-1)  # [b, k, g, nq, slots]
  bi, ki = _index(b, b, 0, 5), _index(k, k, 1, 5)

  def blocks(x):  # [b, s, k, d] -> [b, k, g, nq, slots, block_k, d]
    x = _pad_to(x, 1, nk * block_k).reshape(b, nk, block_k, k, x.shape[-1])
    return jnp.transpose(x, (0, 3, 1, 2, 4))[bi, ki, slot_block]

  if token_blocks is None:
    key_pos = slot_block[..., None] * block_k + jnp.arange(block_k)
    slot_mask = jnp.broadcast_to((key_pos < s)[:, :, :, :, None],
                                 (b, k, g, nq, block_q, slots, block_k))
  else:
    shape = token_blocks.shape
    gathered = token_blocks[_index(shape[0], b, 0, 5), _index(shape[1], k, 1, 5),
                            _index(shape[2], g, 2, 5), _index(nq, nq, 3, 5), slot_block]
    slot_mask = jnp.swapaxes(gathered, 4, 5)  # [b, k, g, nq, block_q, slots, block_k]
  slot_mask &= slot_on[:, :, :, :, None, :, None]

  q = _pad_to(query, 1, nq * block_q).reshape(b, nq, block_q, k, g, dims.head_dim)
  logits = jnp.einsum("bqikgd,bkgqcjd->bkgqicj", q, blocks(key),
                      preferred_element_type=jnp.float32) * jnp.float32(scale)
  if quantized:
    int8_logits = _int8_block_logits(query, key, blocks, dims, scale, block_q, block_k, nq,
                                     is_causal)
    logits = int8_logits
  logits = logits + undefined[:, :, :, :, None, None, None]
  flat = (b, k, g, nq, block_q, slots * block_k)
  weights = common.masked_softmax(logits.reshape(flat), slot_mask.reshape(flat))
  weights = weights.reshape(logits.shape)
  if pv_threshold is not None:
    row_valid = (np.arange(nq * block_q) < t).reshape(nq, block_q)
    skipped = skipped_pv_blocks(logits, slot_mask, row_valid, pv_threshold, per_row=is_causal)
    skipped = skipped[..., None] if is_causal else skipped[:, :, :, :, None, :, None]
    weights = jnp.where(skipped, 0.0, weights)
  out = jnp.einsum("bkgqicj,bkgqcjd->bqikgd", weights.astype(value.dtype), blocks(value),
                   preferred_element_type=jnp.float32)
  return out.reshape(b, nq * block_q, dims.num_heads, dv)[:, :t].astype(query.dtype)


@register("sparge_attention", segment_ids=True, head_args={},
          block_refusal=_BLOCK_REFUSAL)
def sparge_attention(query, key, value, *, mask=None, is_causal=False, scale=None, block_q=128,
                     block_k=64, cdf_threshold=0.95, topk_blocks=None,
                     similarity_threshold=None, segment_ids=None, local_window_size=None,
                     pv_threshold=-10.0):
  """SpargeAttn (SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference, Zhang
  et al. 2025) with both stages of its filter on SageAttention's quantised scores:
  `sparse_blocks` with `quantized=True` and the second stage on (`pv_threshold` λ), at the
  paper's 128-query / 64-key blocks. λ = −10 skips a block's PV product when all its weights
  are below e^−10 of the running row max (the paper tunes λ per model).

  Args and returns: as `sparse_blocks`.
  """
  return sparse_blocks_attention(
      query, key, value, mask=mask, is_causal=is_causal, scale=scale, block_q=block_q,
      block_k=block_k, cdf_threshold=cdf_threshold, topk_blocks=topk_blocks,
      similarity_threshold=similarity_threshold, segment_ids=segment_ids,
      local_window_size=local_window_size, pv_threshold=pv_threshold, quantized=True)
