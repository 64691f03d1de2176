"""Sparsifiner: attention restricted to the top-k keys of a learned low-rank attention map."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import HeadArg, OpParams, register, register_params

DENSITY = 0.25  # fraction of the keys each query keeps


def default_rank(head_dim: int) -> int:
  """Rank of the connectivity predictor: a quarter of the head dimension (at least 1)."""
  return max(1, head_dim // 4)


def _kept_keys(approx, mask, topk: int):
  """`mask` restricted to each row's `topk` largest entries of `approx` (ties kept)."""
  if topk >= approx.shape[-1]:
    return mask
  candidates = approx if mask is None else jnp.where(mask, approx, -1.0)
  threshold = jax.lax.top_k(candidates, topk)[0][..., -1:]
  kept = candidates >= threshold
  return kept if mask is None else kept & mask


@register("sparsifiner", segment_ids=True,
          head_args={"predictor_q": HeadArg(), "predictor_k": HeadArg(kv=True)},
          block_refusal=(
              "each query keeps the top-k keys of its predicted map Â over all its keys: a top-k "
              "over the whole row is a selection that key blocks cannot make alone"))
def sparsifiner_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                          predictor_q=None, predictor_k=None, rank=None, density=DENSITY,
                          topk=None, segment_ids=None):
  """Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
  Transformers (Wei et al., 2023).

  A low-rank connectivity predictor approximates the attention map, its top-k entries per
  query give an instance-dependent binary mask M, and attention runs over the kept keys only:

      Â = softmax(Q W_q (K W_k)ᵀ / √r),   M_ij = [Â_ij among the k largest of row i],
      out_i = Σ_{j: M_ij} softmax_{j∈M_i}(s·q_i·k_j) (1 + Â_ij − sg(Â_ij)) v_j.

  The factor (1 + Â − sg(Â)) is 1 in the forward pass and hands the predictor W_q, W_k
  (`SparsifinerParams`) a straight-through gradient from the task loss; the paper's
  additional distillation of Â towards the dense map is a training loss, not part of the op.
  The top-k also respects `mask`, `is_causal` and `segment_ids` (rows with fewer allowed
  keys keep them all; ties at the threshold are kept).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (GQA when fewer heads).
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query t attends keys s <= t (top-k among them).
    scale: logit scale s of the sparse attention; `1/sqrt(head_dim)` when None.
    predictor_q: `[num_heads, head_dim, rank]`, W_q of the predictor.
    predictor_k: `[num_kv_heads, head_dim, rank]`, W_k of the predictor.
    rank: if given, must equal the predictors' rank r (set by the layer).
    density: kept fraction, k = ⌈density·kv_len⌉ when `topk` is None (0.25).
    topk: keys kept per query (overrides `density`).
    segment_ids: as in `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  if predictor_q is None or predictor_k is None:
    raise ValueError("sparsifiner needs predictor_q [num_heads, head_dim, rank] and "
                     "predictor_k [num_kv_heads, head_dim, rank] (SparsifinerParams)")
  given_rank = checks.positive_int("rank", rank, optional=True)
  rank = predictor_q.shape[-1] if getattr(predictor_q, "ndim", 0) == 3 else 0
  if given_rank is not None and given_rank != rank:
    raise ValueError(f"rank={given_rank} differs from the predictors' rank {rank}")
  common.check_weight("predictor_q", predictor_q, (dims.num_heads, dims.head_dim, rank),
                      "[num_heads, head_dim, rank]")
  common.check_weight("predictor_k", predictor_k, (dims.num_kv_heads, dims.head_dim, rank),
                      "[num_kv_heads, head_dim, rank]")
  if rank < 1:
    raise ValueError(f"predictor_q must have a rank >= 1, got shape {predictor_q.shape}")
  if topk is None:
    topk = max(1, math.ceil(checks.unit_interval("density", density) * dims.kv_len))
  else:
    topk = checks.positive_int("topk", topk)
  w_q = predictor_q.astype(jnp.float32).reshape(dims.num_kv_heads, dims.groups,
                                                dims.head_dim, rank)
  low_q = jnp.einsum("btkgd,kgdr->btkgr",
                     common.group_query(query, dims.num_kv_heads).astype(jnp.float32), w_q)
  low_k = jnp.einsum("bskd,kdr->bskr", key.astype(jnp.float32),
                     predictor_k.astype(jnp.float32))
  approx = common.masked_softmax(
      jnp.einsum("btkgr,bskr->bkgts", low_q, low_k) / math.sqrt(rank), full_mask)
  kept = _kept_keys(jax.lax.stop_gradient(approx), full_mask, topk)
  probs = common.masked_softmax(logits, kept)
  weights = probs * (1.0 + approx - jax.lax.stop_gradient(approx))
  return common.weighted_values(weights, value.astype(jnp.float32), dims).astype(query.dtype)


@register_params("sparsifiner")
class SparsifinerParams(OpParams):
  """The connectivity predictor of `sparsifiner`: `predictor_q [num_heads, head_dim, rank]`
  and `predictor_k [num_kv_heads, head_dim, rank]`, rank `op_args["rank"]` (a quarter of
  head_dim by default), normal init with std head_dim^(−1/2)."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    op_args = dict(self.op_args or {})
    rank = checks.positive_int("op_args['rank']",
                               op_args.get("rank", default_rank(self.head_dim)))
    init = nn.initializers.normal(stddev=self.head_dim ** -0.5)
    param = lambda name, heads, axis: self.param(
        name, nn.with_logical_partitioning(init, (axis, "head_dim", None)),
        (heads, self.head_dim, rank), self.param_dtype)
    predictor_q, predictor_k = nn.dtypes.promote_dtype(
        param("predictor_q", self.num_heads, "heads"),
        param("predictor_k", self.num_kv_heads, "kv_heads"), dtype=self.dtype)
    return {"predictor_q": predictor_q, "predictor_k": predictor_k}
