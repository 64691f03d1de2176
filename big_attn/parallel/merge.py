"""Block-merge rules of the softmax family: how the ring and striped schedules combine the
results of one query shard against each key/value block, with exact custom VJPs.

With scores s = scale·QKᵀ (t = cap·tanh(s/cap) under a soft cap, else t = s) and masked keys
left out, an op of the family is out_i = Σ_j W(t_ij; r_i) v_j with a row statistic r_i:

- "softmax": W = exp(t - lse), lse the log-sum-exp of t over the row. Blocks return their
  output normalised within the block and their lse, merged through the lse (`ring._merge`).
- "cog" (Cog attention): W = sign(t)·exp(|t| - lse), lse of |t|: the same merge.
- "sigmoid": W = σ(t + b), no statistic: block outputs add. b is a constant of the whole
  sequence (-log n with n the global number of keys).
- "clipped_softmax": W = clip((ζ-γ)·exp(t - lse) + γ, 0, 1). The clip needs the global lse,
  so a first ring pass merges the blocks' lse and a second sums the blocks' outputs.
- "linear": W = t (the scores of feature maps, scale 1): block outputs add; a form divides by
  a summed normaliser in its output map.
- "moments": no weights of their own: blocks return the sums Σv, Σs'·v, n, Σs', Σs'² of
  their visible keys, with the scores s' = s − c_i about the row's mean c_i = μ_i (a first
  ring pass sums n and Σs), so the sums keep their precision; the sums add, and c_i is
  appended as the last column. A form's output map turns them into the output (normalized
  attention: out_i = g/(σ_i+ε)·Σ_j (s_ij − μ_i) v_j + β Σ v_j), as a function of the sums and
  c whose value does not depend on c (Σs·v = Σs'·v + c·Σv).
- "hard" (hard attention's sample z_i = argmax_j s_ij + g_ij, Gumbel noise g of the pair's
  global positions, or the argmax without noise): blocks return the max of s + g over their
  visible keys with that key's value and global position, and their softmax output and lse;
  the larger max wins (a tie: the earlier key), so the merged z is the whole row's.
  Backward: dV_z = dO, and with noise the score-function gradient of the surrogate
  v_z + (log p_z − sg(log p_z))·sg(v_z − b): dS_ij = c_i([j = z_i] − p_ij), c_i = dO_i·(v_z − b_i).

Scores that are not a dot product (`PairScores`: a function of each block's queries and keys,
as GATv2's aᵀφ(q_i + k_j)) replace scale·QKᵀ in the softmax and linear rules; their gradient
goes back to the queries, keys and the op's arrays through the function's VJP.

Terms of the global positions (`PairTerms`: a bias B_ij, a multiplier M_ij, visible pairs) are
computed per block from the positions of its queries and keys, which the ring and striped
layouts know (`ring.shard_positions`; key positions travel with their block). Softmax then has
W = M ∘ exp(t + B - lse): the numerator carries M, the normaliser lse does not, and the
log-sum-exp merge of block outputs normalised within the block stays exact; linear has
W = M ∘ t.

Backward, from dW_ij = dO_i·v_j (dV = WᵀdO, dQ = scale·dS K, dK = scale·dSᵀQ, dS = dT ∘ t'):
softmax dT = P ∘ (dW - δ); cog dT = sign(t)·P ∘ (sign(t)·dW - δ) with P = exp(|t| - lse);
both with δ_i = dO_i·O_i (FlashAttention-2), so any block's gradient is exact on its own.
With position terms, softmax dT = dB = P ∘ (M ∘ dW - δ) (still δ_i = dO_i·O_i, as O_i =
Σ_j P_ij M_ij v_j) and dM = P ∘ dW; linear dT = M ∘ dW, dM = t ∘ dW; dB and dM go back to the
op's arrays through the position function's VJP, summed over blocks and devices.
moments: the block's sums are a differentiable function of its queries, keys and values (the
center c held fixed, exact as the output does not depend on c), and they add, so each block's
gradient is the VJP of its sums at the output's cotangent.
sigmoid dT = dW ∘ W(1 - W). clipped dT = P ∘ (G - c) with G = (ζ-γ)·[0 < z < 1]·dW and the
row sum c_i = Σ_j P_ij G_ij, which one more ring pass collects before the gradient pass. In
every backward pass dK/dV travel around the ring with their block (`ring.ring_gradients`).

A gate σ(G) (gated attention) multiplies the merged output (`SeqParallel.attention`), and a
form's per-token value and output maps (`BlockForm.value_map`, `output_map`) act before and after
the merge, so their gradients are ordinary autodiff around it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from big_attn.ops import common
from big_attn.ops import hard
from big_attn.ops.registry import BLOCK_MERGES, PairScores, PairTerms
from big_attn.parallel import blockwise
from big_attn.parallel import ring

Array = jax.Array

# The static numbers each rule takes (`BlockForm.params`).
RULE_PARAMS = {"softmax": ("soft_cap",), "sigmoid": ("soft_cap", "logit_bias"), "cog": (),
               "clipped_softmax": ("zeta", "gamma"), "linear": (), "moments": (),
               "hard": ("sampled", "baseline")}
# The rules that take position terms (`Rule.pair`) and pairwise scores (`Rule.score`).
PAIR_MERGES = ("softmax", "linear")


class Rule(NamedTuple):
  """A block-merge rule and its constants (hashable: a static argument of the ring)."""
  merge: str = "softmax"
  soft_cap: float | None = None
  logit_bias: float = 0.0
  zeta: float = 1.0
  gamma: float = 0.0
  pair: PairTerms | None = None
  score: PairScores | None = None
  sampled: float = 0.0
  baseline: float = 0.0


def pair_arrays_spec(rule: Rule | None, head_axis, batch_axes) -> P:
  """How a rule's `pair_arrays` are split: with the heads (their leading axis); the hard
  rule's noise keys `[heads, batch, ...]` also with the batch."""
  if rule is not None and rule.merge == "hard":
    return P(head_axis, batch_axes)
  return P(head_axis)


def make_rule(merge: str, params: dict | None = None, pair: PairTerms | None = None,
              score: PairScores | None = None) -> Rule:
  """The `Rule` of `merge` (one of `ops.registry.BLOCK_MERGES`) with `params` (None entries
  take the defaults), the position terms `pair` and the pairwise scores `score`; a
  `ValueError` for an unknown rule, a parameter it does not take, or position terms or
  pairwise scores on a rule other than `PAIR_MERGES` (softmax without a soft cap)."""
  if merge not in BLOCK_MERGES:
    raise ValueError(f"merge must be one of {BLOCK_MERGES}, got {merge!r}")
  params = {k: v for k, v in (params or {}).items() if v is not None}
  unknown = sorted(set(params) - set(RULE_PARAMS[merge]))
  if unknown:
    raise ValueError(f"block-merge rule {merge!r} takes parameters {RULE_PARAMS[merge]}, got "
                     f"{unknown}")
  for field, value in (("position terms (pair)", pair), ("pairwise scores (score)", score)):
    if value is not None and (merge not in PAIR_MERGES or params):
      raise ValueError(f"{field} need a rule of {PAIR_MERGES} without parameters, got "
                       f"{merge!r} with {params}")
  return Rule(merge, **{k: float(v) for k, v in params.items()}, pair=pair, score=score)


def _on_pair_core(rule: Rule) -> bool:
  """Whether `rule` runs through `_pair_core` (position terms, pairwise scores, linear)."""
  return rule.pair is not None or rule.score is not None or rule.merge == "linear"


def is_plain_softmax(rule: Rule | None) -> bool:
  """Whether `rule` is softmax without a soft cap (the flash blocks of `blockwise` run it)."""
  return rule is None or rule == Rule()


def _scores(rule: Rule, q, k, dims, scale):
  """Grouped float32 scores t `[b, k, g, t, s]` and dt/ds (None without a soft cap)."""
  s = common.attention_logits(q, k, dims, scale)
  if rule.soft_cap is None:
    return s, None
  th = jnp.tanh(s / rule.soft_cap)
  return rule.soft_cap * th, 1.0 - th * th


def _block(rule: Rule, q, k, v, scale, causal_offset, q_seg, kv_seg):
  dims = common.check_qkv(q, k, v)
  # pylint: disable-next=protected-access
  mask = blockwise._block_mask(dims, causal_offset, 0, q_seg, kv_seg)
  return (dims, mask) + _scores(rule, q, k, dims, scale)


def _exponent(rule: Rule, t, mask):
  """The normalised rules' exponent (|t| for cog, t otherwise), -inf where masked."""
  e = jnp.abs(t) if rule.merge == "cog" else t
  return e if mask is None else jnp.where(mask, e, -jnp.inf)


def _row_lse(e):
  """log Σ_j exp(e_ij) over the last axis; -inf for a row without keys."""
  top = jnp.max(e, axis=-1)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  denom = jnp.sum(jnp.exp(e - top[..., None]), axis=-1)
  return jnp.where(denom > 0.0, top + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), -jnp.inf)


def _weights(rule: Rule, t, mask, lse):
  """`(W, P)`: the weights and (normalised rules) P = exp(e - lse); both 0 where masked."""
  if rule.merge == "sigmoid":
    w = jax.nn.sigmoid(t + rule.logit_bias)
    return (w if mask is None else jnp.where(mask, w, 0.0)), None
  p = jnp.exp(_exponent(rule, t, mask) - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  if rule.merge == "softmax":
    return p, p
  if rule.merge == "cog":
    return jnp.sign(t) * p, p
  w = jnp.clip((rule.zeta - rule.gamma) * p + rule.gamma, 0.0, 1.0)
  return (w if mask is None else jnp.where(mask, w, 0.0)), p


def _clip_grad(rule: Rule, p, dw):
  """G = dW·∂W/∂P of clipped softmax: (ζ-γ)·dW where the clip is not active."""
  z = (rule.zeta - rule.gamma) * p + rule.gamma
  return jnp.where((z > 0.0) & (z < 1.0), (rule.zeta - rule.gamma) * dw, 0.0)


def _score_grad(rule: Rule, t, w, p, dw, row):
  """dT from dW; `row` is δ (softmax, cog) or c (clipped_softmax) per row, grouped."""
  if rule.merge == "sigmoid":
    return dw * w * (1.0 - w)
  if rule.merge == "softmax":
    return p * (dw - row[..., None])
  if rule.merge == "cog":
    sign = jnp.sign(t)
    return sign * p * (sign * dw - row[..., None])
  return p * (_clip_grad(rule, p, dw) - row[..., None])


def _value_grads(dims, v, dout):
  """`(dout grouped [b, t, k, g, dv], dW [b, k, g, t, s])` in float32."""
  dout_g = common.group_query(dout, dims.num_kv_heads).astype(jnp.float32)
  return dout_g, jnp.einsum("btkgd,bskd->bkgts", dout_g, v.astype(jnp.float32))


def block_grads(rule: Rule, q, k, v, dout, lse, row, *, scale, causal_offset=None,
                q_segment_ids=None, kv_segment_ids=None):
  """Float32 `(dq, dk, dv)` of one block from the global grouped statistics `lse` (None for
  sigmoid) and `row` (δ or c; None for sigmoid)."""
  dims, mask, t, dt = _block(rule, q, k, v, scale, causal_offset, q_segment_ids,
                             kv_segment_ids)
  w, p = _weights(rule, t, mask, lse)
  dout_g, dw = _value_grads(dims, v, dout)
  ds = _score_grad(rule, t, w, p, dw, row)
  if dt is not None:
    ds = ds * dt
  return _input_grads(dims, q, k, w, ds * scale, dout_g)


def _value_grad(w, dout_g):
  """dV `[b, s, k, dv]` of a block from its weights `w` and grouped dO."""
  return jnp.einsum("bkgts,btkgd->bskd", w, dout_g)


def _input_grads(dims, q, k, w, ds, dout_g):
  """Float32 `(dq, dk, dv)` of a block from its weights `w`, the scaled dS and grouped dO."""
  dv = _value_grad(w, dout_g)
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(jnp.float32))
  q_g = common.group_query(q, dims.num_kv_heads).astype(jnp.float32)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, q_g)
  return dq.reshape(q.shape), dk, dv


# The log-sum-exp rules (softmax with a soft cap, cog) as `blockwise.BlockImpl`s: the ring of
# `ring.py` runs them as it runs softmax.

def _lse_block_forward(rule: Rule, query, key, value, *, scale, causal_offset=None,
                       q_segment_ids=None, kv_segment_ids=None):
  dims, mask, t, _ = _block(rule, query, key, value, scale, causal_offset, q_segment_ids,
                            kv_segment_ids)
  lse = _row_lse(_exponent(rule, t, mask))
  w, _ = _weights(rule, t, mask, lse)
  out = common.weighted_values(w, value.astype(jnp.float32), dims)
  return out, blockwise._heads_last(lse, dims)  # pylint: disable=protected-access


def _lse_block_backward(rule: Rule, query, key, value, dout, lse, delta, *, scale,
                        causal_offset=None, q_segment_ids=None, kv_segment_ids=None):
  dims = common.check_qkv(query, key, value)
  rows = blockwise._grouped_rows  # pylint: disable=protected-access
  return block_grads(rule, query, key, value, dout, rows(lse, dims), rows(delta, dims),
                     scale=scale, causal_offset=causal_offset, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids)


@functools.lru_cache(maxsize=None)
def lse_block_impl(rule: Rule) -> blockwise.BlockImpl:
  """The XLA `BlockImpl` of a log-sum-exp rule (one object per rule, so compiles are shared)."""
  if rule.merge not in ("softmax", "cog"):
    raise ValueError(f"rule {rule.merge!r} is not merged through the log-sum-exp")
  return blockwise.BlockImpl(f"xla_{rule.merge}", functools.partial(_lse_block_forward, rule),
                             functools.partial(_lse_block_backward, rule))


# The additive rules (sigmoid, clipped softmax): block outputs add.

def _sum_forward(cfg: ring.RingConfig, rule: Rule, q, k, v, q_seg, kv_seg):
  def lse_of(offset, kv):
    k, v, kv_seg = kv
    dims, mask, t, _ = _block(rule, q, k, v, cfg.scale, offset, q_seg, kv_seg)
    return _row_lse(_exponent(rule, t, mask))

  lse = None
  if rule.merge == "clipped_softmax":
    lse = ring.ring_reduce(cfg, lse_of, jnp.logaddexp, (k, v, kv_seg))

  def out_of(offset, kv):
    k, v, kv_seg = kv
    dims, mask, t, _ = _block(rule, q, k, v, cfg.scale, offset, q_seg, kv_seg)
    return common.weighted_values(_weights(rule, t, mask, lse)[0], v.astype(jnp.float32), dims)

  out = ring.ring_reduce(cfg, out_of, jnp.add, (k, v, kv_seg))
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sum_core(cfg: ring.RingConfig, rule: Rule, q, k, v, q_seg, kv_seg):
  return _sum_forward(cfg, rule, q, k, v, q_seg, kv_seg)[0]


def _sum_core_fwd(cfg, rule, q, k, v, q_seg, kv_seg):
  out, lse = _sum_forward(cfg, rule, q, k, v, q_seg, kv_seg)
  return out, (q, k, v, q_seg, kv_seg, lse)


def _sum_core_bwd(cfg, rule, residuals, dout):
  q, k, v, q_seg, kv_seg, lse = residuals

  def rowsum_of(offset, kv):  # c_i = Σ_j P_ij G_ij of clipped softmax
    k, v, kv_seg = kv
    dims, mask, t, _ = _block(rule, q, k, v, cfg.scale, offset, q_seg, kv_seg)
    _, p = _weights(rule, t, mask, lse)
    return jnp.sum(p * _clip_grad(rule, p, _value_grads(dims, v, dout)[1]), axis=-1)

  row = None
  if rule.merge == "clipped_softmax":
    row = ring.ring_reduce(cfg, rowsum_of, jnp.add, (k, v, kv_seg))

  def grads(offset, kv):
    k, v, kv_seg = kv
    return block_grads(rule, q, k, v, dout, lse, row, scale=cfg.scale, causal_offset=offset,
                       q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  dq, dk, dv = ring.ring_gradients(cfg, grads, (k, v, kv_seg))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_sum_core.defvjp(_sum_core_fwd, _sum_core_bwd)


# The moments rule: blocks return sums of their visible keys, which add.

def _moment_scores(q, k, v, scale, offset, q_seg, kv_seg, center=None):
  """`(dims, keep, s)` of a block: the float32 visible pairs (1 or 0) and the scores
  s = scale·q·k − center (`center` None or grouped `[b, k, g, t]`), grouped."""
  dims, mask, s, _ = _block(Rule("moments"), q, k, v, scale, offset, q_seg, kv_seg)
  keep = jnp.ones_like(s) if mask is None else jnp.broadcast_to(mask, s.shape).astype(s.dtype)
  return dims, keep, s if center is None else s - center[..., None]


def _count_and_sum(q, k, v, scale, offset, q_seg, kv_seg):
  """Grouped float32 `[2, b, k, g, t]`: n and Σs of one block over its visible keys."""
  _, keep, s = _moment_scores(q, k, v, scale, offset, q_seg, kv_seg)
  return jnp.stack([keep.sum(axis=-1), (keep * s).sum(axis=-1)])


def _row_mean(sums):
  """μ = Σs/n of `_count_and_sum`'s sums (0 in a row without keys)."""
  return sums[1] / jnp.maximum(sums[0], 1.0)


def _moment_block(q, k, v, scale, offset, q_seg, kv_seg, center):
  """Float32 `[b, t, n, 2·dv + 3]`: Σv, Σs·v, n, Σs, Σs² of one block over its visible keys,
  with s = scale·q·k − center (the row's mean: the sums about it keep their precision; the
  output map's standardisation does not depend on the center)."""
  dims, keep, s = _moment_scores(q, k, v, scale, offset, q_seg, kv_seg, center)
  ks = keep * s
  v = v.astype(jnp.float32)
  sums = jnp.stack([keep, ks, ks * s], axis=-1).sum(axis=-2)  # [b, k, g, t, 3]
  sums = jnp.moveaxis(sums, 3, 1).reshape(dims.batch, dims.q_len, dims.num_heads, 3)
  return jnp.concatenate([common.weighted_values(keep, v, dims),
                          common.weighted_values(ks, v, dims), sums], axis=-1)


def _with_center(sums, center):
  """The sums `[b, t, n, ·]` and the center (grouped `[b, k, g, t]`) as their last column."""
  center = jnp.moveaxis(center, 3, 1).reshape(sums.shape[:3] + (1,))
  return jnp.concatenate([sums, center], axis=-1)


def _moment_forward(cfg: ring.RingConfig, q, k, v, q_seg, kv_seg):
  """`(sums and center, center)`: a first ring pass for the rows' means, a second for the
  sums about them."""
  kv = (k, v, kv_seg)
  center = _row_mean(ring.ring_reduce(
      cfg, lambda offset, kv: _count_and_sum(q, *kv[:2], cfg.scale, offset, q_seg, kv[2]),
      jnp.add, kv))
  block = lambda offset, kv: _moment_block(q, kv[0], kv[1], cfg.scale, offset, q_seg, kv[2],
                                           center)
  return _with_center(ring.ring_reduce(cfg, block, jnp.add, kv), center), center


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moment_core(cfg: ring.RingConfig, q, k, v, q_seg, kv_seg):
  return _moment_forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _moment_core_fwd(cfg, q, k, v, q_seg, kv_seg):
  sums, center = _moment_forward(cfg, q, k, v, q_seg, kv_seg)
  return sums, (q, k, v, q_seg, kv_seg, center)


def _moment_core_bwd(cfg, residuals, dout):
  q, k, v, q_seg, kv_seg, center = residuals
  as_float = lambda x: x.astype(jnp.float32)

  def grads(offset, kv):  # the center is held fixed: the output does not depend on it
    k, v, kv_seg = kv
    sums = lambda q, k, v: _moment_block(q, k, v, cfg.scale, offset, q_seg, kv_seg, center)
    return jax.vjp(sums, as_float(q), as_float(k), as_float(v))[1](dout[..., :-1])

  dq, dk, dv = ring.ring_gradients(cfg, grads, (k, v, kv_seg))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_moment_core.defvjp(_moment_core_fwd, _moment_core_bwd)


# Rules with terms of the global positions (`Rule.pair`): softmax (lse merge) and linear (sum).

def _position_terms(rule: Rule, dims, q_pos, k_pos, is_causal: bool, arrays):
  """`((bias, multiplier), visible)` of a block, each None or float32 (bool) grouped
  `[k, g, t, s]`: the rule's `PairTerms` at query positions `q_pos` and key positions `k_pos`
  (differentiable in `arrays`)."""
  if rule.pair is None:
    return (None, None), None
  terms = rule.pair.fn(arrays, q_pos, k_pos, is_causal=is_causal, **dict(rule.pair.static))
  shape = (dims.num_kv_heads, dims.groups, dims.q_len, dims.kv_len)
  grouped = lambda x: None if x is None else jnp.broadcast_to(  # pylint: disable=g-long-lambda
      x, (dims.num_heads,) + shape[2:]).reshape(shape)
  bias, multiplier, visible = (grouped(x) for x in terms)
  if bias is not None and rule.merge == "linear":
    raise ValueError("the linear rule's weights are the scores themselves: its position terms "
                     "take a multiplier and visible pairs, not a logit bias")
  as_float = lambda x: None if x is None else x.astype(jnp.float32)
  return (as_float(bias), as_float(multiplier)), visible


def _rule_scores(rule: Rule, dims, arrays, q, k):
  """The rule's pairwise scores of a block, float32 grouped `[b, k, g, t, s]` (before the
  scale), or None for scores q·k."""
  if rule.score is None:
    return None
  scores = rule.score.fn(arrays, q, k, **dict(rule.score.static))
  return scores.astype(jnp.float32).reshape(dims.batch, dims.num_kv_heads, dims.groups,
                                            dims.q_len, dims.kv_len)


def _pair_scores(rule: Rule, q, k, v, scale, offset, q_seg, kv_seg, bias, visible,
                 scores=None):
  """`(dims, mask, t)` of a block: scores (scale·QKᵀ, or scale·`scores`, the rule's pairwise
  scores) with the position bias, mask with visible pairs."""
  if scores is None:
    dims, mask, t, _ = _block(rule, q, k, v, scale, offset, q_seg, kv_seg)
  else:
    dims = common.check_qkv(q, k, v)
    # pylint: disable-next=protected-access
    mask = blockwise._block_mask(dims, offset, 0, q_seg, kv_seg)
    t = scores * jnp.float32(scale)
  if visible is not None:
    mask = visible if mask is None else jnp.logical_and(mask, visible)
  return dims, mask, (t if bias is None else t + bias)


def _pair_weights(rule: Rule, t, mask, lse):
  """The weights before the multiplier: softmax exp(t - lse), linear t; 0 where masked."""
  if rule.merge == "linear":
    return t if mask is None else jnp.where(mask, t, 0.0)
  return _weights(rule, t, mask, lse)[1]


def _pair_block(rule: Rule, scale, is_causal, arrays, q, q_pos, q_seg, offset, kv):
  """One block's float32 output (softmax: normalised within the block, with its lse); `kv`
  is `(key, value, kv_segment_ids, key_positions)`."""
  k, v, kv_seg, k_pos = kv
  dims = common.check_qkv(q, k, v)
  (bias, multiplier), visible = _position_terms(rule, dims, q_pos, k_pos, is_causal, arrays)
  scores = _rule_scores(rule, dims, arrays, q.astype(jnp.float32), k.astype(jnp.float32))
  dims, mask, t = _pair_scores(rule, q, k, v, scale, offset, q_seg, kv_seg, bias, visible,
                               scores)
  lse = None if rule.merge == "linear" else _row_lse(_exponent(rule, t, mask))
  w = _pair_weights(rule, t, mask, lse)
  w = w if multiplier is None else w * multiplier
  out = common.weighted_values(w, v.astype(jnp.float32), dims)
  if lse is None:
    return out
  return out, blockwise._heads_last(lse, dims)  # pylint: disable=protected-access


def _pair_kv(cfg: ring.RingConfig, q, k, v, kv_seg):
  """`(q_pos, kv)`: the local query positions and the travelling key block with its
  positions."""
  shard = lax.axis_index(cfg.axis_name)
  return (ring.shard_positions(cfg, shard, q.shape[1]),
          (k, v, kv_seg, ring.shard_positions(cfg, shard, k.shape[1])))


def _pair_forward(cfg: ring.RingConfig, rule: Rule, arrays, q, k, v, q_seg, kv_seg):
  q_pos, kv = _pair_kv(cfg, q, k, v, kv_seg)
  block = lambda offset, kv: _pair_block(rule, cfg.scale, cfg.is_causal, arrays, q, q_pos,
                                         q_seg, offset, kv)
  if rule.merge == "linear":
    return ring.ring_reduce(cfg, block, jnp.add, kv), None
  return ring.ring_reduce(cfg, block, ring._merge, kv)  # pylint: disable=protected-access


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pair_core(cfg: ring.RingConfig, rule: Rule, arrays, q, k, v, q_seg, kv_seg):
  return _pair_forward(cfg, rule, arrays, q, k, v, q_seg, kv_seg)[0].astype(q.dtype)


def _pair_core_fwd(cfg, rule, arrays, q, k, v, q_seg, kv_seg):
  out, lse = _pair_forward(cfg, rule, arrays, q, k, v, q_seg, kv_seg)
  return out.astype(q.dtype), (arrays, q, k, v, q_seg, kv_seg, out, lse)


def _pair_core_bwd(cfg, rule, residuals, dout):
  arrays, q, k, v, q_seg, kv_seg, out, lse = residuals
  dims = common.check_qkv(q, k, v)
  q_pos, kv = _pair_kv(cfg, q, k, v, kv_seg)
  rows = blockwise._grouped_rows  # pylint: disable=protected-access
  delta = None
  if lse is not None:
    lse = rows(lse, dims)
    delta = rows(jnp.einsum("btnd,btnd->bnt", dout.astype(jnp.float32), out), dims)

  def grads(offset, kv):
    k, v, kv_seg, k_pos = kv
    dims = common.check_qkv(q, k, v)
    terms = lambda a: _position_terms(rule, dims, q_pos, k_pos, cfg.is_causal, a)
    (bias, multiplier), pull, visible = jax.vjp(terms, arrays, has_aux=True)
    scores = pull_scores = None
    if rule.score is not None:
      scores, pull_scores = jax.vjp(lambda q, k, a: _rule_scores(rule, dims, a, q, k),
                                    q.astype(jnp.float32), k.astype(jnp.float32), arrays)
    dims, mask, t = _pair_scores(rule, q, k, v, cfg.scale, offset, q_seg, kv_seg, bias,
                                 visible, scores)
    p = _pair_weights(rule, t, mask, lse)
    dout_g, dw = _value_grads(dims, v, dout)
    w, dp = (p, dw) if multiplier is None else (p * multiplier, dw * multiplier)
    if rule.merge == "linear":
      ds = dp if mask is None else jnp.where(mask, dp, 0.0)
    else:
      ds = p * (dp - delta[..., None])
    (darrays,) = pull((None if bias is None else jnp.sum(ds, axis=0),
                       None if multiplier is None else jnp.sum(p * dw, axis=0)))
    if pull_scores is None:
      dq, dk, dv = _input_grads(dims, q, k, w, ds * cfg.scale, dout_g)
    else:
      dq, dk, dscores = pull_scores(ds * cfg.scale)
      dv, darrays = _value_grad(w, dout_g), jax.tree.map(jnp.add, darrays, dscores)
    return (dq, darrays), dk, dv

  (dq, darrays), dk, dv = ring.ring_gradients(cfg, grads, kv)
  return (darrays, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_pair_core.defvjp(_pair_core_fwd, _pair_core_bwd)


# The hard rule (hard attention's sample): the blocks' max of s + g merges exactly.

def _hard_block(rule: Rule, scale, keys, q, q_pos, q_seg, offset, kv):
  """One block's `(max of s + g [b, t, n], chosen value [b, t, n, dv], its global key position
  [b, t, n], (softmax output, lse))` over its visible keys (max −inf, value 0 without any)."""
  k, v, kv_seg, k_pos = kv
  dims, mask, t, _ = _block(rule, q, k, v, scale, offset, q_seg, kv_seg)
  e = t
  if keys is not None:
    e = t + hard.pair_gumbel(keys, q_pos, k_pos).reshape(t.shape)
  e = e if mask is None else jnp.where(mask, e, -jnp.inf)
  top = jnp.max(e, axis=-1)
  choice = jax.nn.one_hot(jnp.argmax(e, axis=-1), e.shape[-1], dtype=jnp.float32)
  choice = choice * jnp.isfinite(top)[..., None]
  heads = lambda x: blockwise._heads_last(x, dims)  # pylint: disable=protected-access  # noqa: E731
  position = jnp.sum(choice * k_pos.astype(jnp.float32), axis=-1)
  lse = _row_lse(_exponent(rule, t, mask))
  soft = common.weighted_values(_weights(Rule(), t, mask, lse)[0], v.astype(jnp.float32), dims)
  return (heads(top), common.weighted_values(choice, v.astype(jnp.float32), dims),
          heads(position), (soft, heads(lse)))


def _hard_merge(acc, block):
  """The larger max (on a tie the earlier key, as an argmax over the row) with its value and
  position; the softmax parts merged through the log-sum-exp."""
  top_a, value_a, pos_a, soft_a = acc
  top_b, value_b, pos_b, soft_b = block
  take = (top_b > top_a) | ((top_b == top_a) & (pos_b < pos_a))
  as_rows = lambda x: jnp.transpose(x, (0, 2, 1))  # noqa: E731  [b, n, t] -> [b, t, n]
  soft = ring._merge(soft_a, soft_b)  # pylint: disable=protected-access
  return (jnp.where(take, top_b, top_a), jnp.where(as_rows(take)[..., None], value_b, value_a),
          jnp.where(take, pos_b, pos_a), soft)


def _hard_rows(rule: Rule, scale, keys, q, q_pos, q_seg, offset, kv):
  """The hard rule on whole rows in one block (plain JAX, differentiated by autodiff through
  the surrogate v_z + (log p_z − sg(log p_z))·sg(v_z − b))."""
  k, v, kv_seg, _ = kv
  _, value, position, (soft, _) = _hard_block(rule, scale, keys, q, q_pos, q_seg, offset, kv)
  if not rule.sampled:
    return value.astype(q.dtype)
  dims, mask, t, _ = _block(rule, q, k, v, scale, offset, q_seg, kv_seg)
  rows = blockwise._grouped_rows  # pylint: disable=protected-access
  chosen = kv[3].astype(jnp.float32) == lax.stop_gradient(rows(position, dims))[..., None]
  chosen = chosen if mask is None else chosen & mask
  log_p_z = jnp.sum(jnp.where(chosen, t - _row_lse(_exponent(rule, t, mask))[..., None], 0.0),
                    axis=-1)
  log_p_z = blockwise._heads_last(log_p_z, dims)  # pylint: disable=protected-access
  log_p_z = jnp.transpose(log_p_z, (0, 2, 1))[..., None]
  base = soft if rule.baseline else jnp.zeros_like(value)
  surrogate = (log_p_z - lax.stop_gradient(log_p_z)) * lax.stop_gradient(value - base)
  return (value + surrogate).astype(q.dtype)


def _hard_forward(cfg: ring.RingConfig, rule: Rule, keys, q, k, v, q_seg, kv_seg):
  q_pos, kv = _pair_kv(cfg, q, k, v, kv_seg)
  block = lambda offset, kv: _hard_block(rule, cfg.scale, keys, q, q_pos, q_seg, offset, kv)
  return ring.ring_reduce(cfg, block, _hard_merge, kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _hard_core(cfg: ring.RingConfig, rule: Rule, keys, q, k, v, q_seg, kv_seg):
  return _hard_forward(cfg, rule, keys, q, k, v, q_seg, kv_seg)[1].astype(q.dtype)


def _hard_core_fwd(cfg, rule, keys, q, k, v, q_seg, kv_seg):
  _, value, position, (soft, lse) = _hard_forward(cfg, rule, keys, q, k, v, q_seg, kv_seg)
  return value.astype(q.dtype), (keys, q, k, v, q_seg, kv_seg, value, position, soft, lse)


def _hard_core_bwd(cfg, rule, residuals, dout):
  """dV_z = g (the chosen value); sampled: the score-function gradient of the surrogate
  v_z + (log p_z − sg(log p_z))·sg(v_z − b), dS_ij = c_i([j = z_i] − p_ij) with
  c_i = g_i·(v_z − b_i), b the softmax output (baseline) or 0."""
  keys, q, k, v, q_seg, kv_seg, value, position, soft, lse = residuals
  dims = common.check_qkv(q, k, v)
  rows = blockwise._grouped_rows  # pylint: disable=protected-access
  dout = dout.astype(jnp.float32)
  base = soft if rule.baseline else jnp.zeros_like(value)
  coef = rows(jnp.einsum("btnd,btnd->bnt", dout, value - base), dims)
  lse, position = rows(lse, dims), rows(position, dims)
  q_pos, kv = _pair_kv(cfg, q, k, v, kv_seg)

  def grads(offset, kv):
    k, v, kv_seg, k_pos = kv
    dims, mask, t, _ = _block(rule, q, k, v, cfg.scale, offset, q_seg, kv_seg)
    chosen = (k_pos.astype(jnp.float32) == position[..., None]).astype(jnp.float32)
    chosen = chosen if mask is None else jnp.where(mask, chosen, 0.0)
    dout_g = common.group_query(dout, dims.num_kv_heads)
    ds = jnp.zeros_like(t)
    if rule.sampled:
      ds = coef[..., None] * (chosen - _weights(Rule(), t, mask, lse)[0])
    return _input_grads(dims, q, k, chosen, ds * cfg.scale, dout_g)

  dq, dk, dv = ring.ring_gradients(cfg, grads, kv)
  return (None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_hard_core.defvjp(_hard_core_fwd, _hard_core_bwd)


def _varying_like(tree, like):
  """`tree` cast to vary over the manual mesh axes `like` varies over, so that its gradient
  (different on every device) is summed over them by the cast's transpose."""
  def axes(x):
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))

  def cast(x):
    missing = tuple(sorted(axes(like) - axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def rule_ring_attention(schedule: str, query: Array, key: Array, value: Array, *, axis_name,
                        rule: Rule, is_causal: bool = False, segment_ids=None,
                        scale: float | None = None, pair_arrays=None) -> Array:
  """Per-shard attention of the family op `rule` over the `schedule` ("ring": contiguous
  shards, "striped": striped token order) inside `jax.shard_map` over `axis_name`; arguments
  and result as `ring.ring_attention` ("moments": the float32 sums of `_moment_block` and the
  center); `pair_arrays`: the arrays of the rule's position terms and pairwise scores
  (replicated over `axis_name`). The blocks are computed in XLA."""
  caller = f"{schedule}_attention"
  if rule.merge in ("softmax", "cog") and not _on_pair_core(rule):
    return ring.attention_over_ring(schedule, query, key, value, axis_name=axis_name,
                                    is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                                    block_impl=lse_block_impl(rule), caller=caller)
  cfg, q_seg, kv_seg = ring.ring_config(schedule, query, key, value, axis_name=axis_name,
                                        is_causal=is_causal, segment_ids=segment_ids,
                                        scale=scale, block_impl="xla", caller=caller)
  if rule.merge == "moments":
    return _moment_core(cfg, query, key, value, q_seg, kv_seg)
  if rule.merge == "hard":
    return _hard_core(cfg, rule, _varying_like(pair_arrays, query), query, key, value, q_seg,
                      kv_seg)
  if _on_pair_core(rule):
    return _pair_core(cfg, rule, _varying_like(pair_arrays, query), query, key, value, q_seg,
                      kv_seg)
  return _sum_core(cfg, rule, query, key, value, q_seg, kv_seg)


def rule_attention(rule: Rule, query: Array, key: Array, value: Array, *, scale: float,
                   causal_offset=None, q_segment_ids=None, kv_segment_ids=None) -> Array:
  """The family op `rule` on whole rows in one block (plain JAX, differentiated by autodiff):
  key j is visible to query i iff j <= i + causal_offset (None: all) and segments match."""
  dims, mask, t, _ = _block(rule, query, key, value, scale, causal_offset, q_segment_ids,
                            kv_segment_ids)
  lse = None if rule.merge == "sigmoid" else _row_lse(_exponent(rule, t, mask))
  w, _ = _weights(rule, t, mask, lse)
  return common.weighted_values(w, value, dims).astype(query.dtype)


def rule_all_gather_attention(query: Array, key: Array, value: Array, *, axis_name, rule: Rule,
                              is_causal: bool = False, segment_ids=None,
                              scale: float | None = None, pair_arrays=None) -> Array:
  """Per-shard attention of the family op `rule`: the local queries against all keys/values
  gathered over `axis_name` (contiguous shards; inside `jax.shard_map`). `segment_ids`: None
  or the local `(q_segment_ids, kv_segment_ids)`; `pair_arrays`: the arrays of the rule's
  position terms and pairwise scores."""
  dims = common.check_qkv(query, key, value)
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
  q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
  scale = common.default_scale(dims.head_dim, scale)
  shard = lax.axis_index(axis_name)
  offset = shard * dims.q_len if is_causal else None
  key, value, kv_seg = gather(key), gather(value), gather(kv_seg)
  if rule.merge == "hard":
    q_pos = shard * dims.q_len + jnp.arange(dims.q_len, dtype=jnp.int32)
    kv = (key, value, kv_seg, jnp.arange(key.shape[1], dtype=jnp.int32))
    return _hard_rows(rule, scale, pair_arrays, query, q_pos, q_seg, offset, kv)
  if rule.merge == "moments":
    args = (query, key, value, scale, offset, q_seg, kv_seg)
    center = lax.stop_gradient(_row_mean(_count_and_sum(*args)))
    return _with_center(_moment_block(*args, center), center)
  if _on_pair_core(rule):
    q_pos = shard * dims.q_len + jnp.arange(dims.q_len, dtype=jnp.int32)
    kv = (key, value, kv_seg, jnp.arange(key.shape[1], dtype=jnp.int32))
    out = _pair_block(rule, scale, is_causal, pair_arrays, query, q_pos, q_seg, offset, kv)
    return (out if rule.merge == "linear" else out[0]).astype(query.dtype)
  return rule_attention(rule, query, key, value, scale=scale, causal_offset=offset,
                        q_segment_ids=q_seg, kv_segment_ids=kv_seg)
