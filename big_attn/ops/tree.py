"""Tree Cross Attention: each query retrieves O(log N) summaries of a balanced key tree."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import hard
from big_attn.ops.registry import OpParams, register, register_params

RETRIEVALS = ("greedy", "policy")
BASELINES = ("greedy", "none")


def _key_validity(mask, dims: common.Dims):
  """`[b|1, s]` key validity from a key-padding mask `[b|1, 1, 1, s]` (None: all valid)."""
  if mask is None:
    return None
  mask = common.make_mask(dims, mask=mask)  # Validates dtype and shape.
  if mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError("tree_cross_attention's mask must be a key-padding mask broadcastable "
                     f"to [batch, 1, 1, kv_len] (the tree is shared by all queries and heads), "
                     f"got shape {mask.shape}")
  return mask[:, 0, 0]


def _gather(nodes, index):
  """`nodes[b, index[b, t, k, g], k]`: nodes `[b, N, k, ...]`, index `[b, t, k, g]`."""
  b, _, k, _ = index.shape
  return nodes[jnp.arange(b)[:, None, None, None], index, jnp.arange(k)[None, None, :, None]]



def _check_aggregator(aggregator, num_kv_heads, head_dim, value_dim):
  """"mean", or the learned weights `{"key": [k, 2, d, d], "value": [k, 2, dv, dv]}`."""
  if isinstance(aggregator, str) and aggregator == "mean":
    return None
  if not isinstance(aggregator, dict) or set(aggregator) != {"key", "value"}:
    raise ValueError("aggregator must be 'mean' or the learned weights {'key': [num_kv_heads, "
                     "2, head_dim, head_dim], 'value': [num_kv_heads, 2, value_dim, "
                     "value_dim]} (TreeCrossAttentionParams makes them for "
                     f"op_args['aggregator'] = 'learned'), got {aggregator!r}")
  common.check_weight("aggregator['key']", aggregator["key"],
                      (num_kv_heads, 2, head_dim, head_dim), "[num_kv_heads, 2, d, d]")
  common.check_weight("aggregator['value']", aggregator["value"],
                      (num_kv_heads, 2, value_dim, value_dim), "[num_kv_heads, 2, dv, dv]")
  return aggregator


def _learned_parent(children, nonempty, weight):
  """Σ_c [c nonempty]·x_c·W_c · 2/#nonempty children: children `[b, 2N, k, d]` of N parents,
  nonempty `[b, 2N]`, W `[k, 2, d, d]`."""
  b, n2, k, d = children.shape
  pairs = (children * nonempty[..., None, None]).reshape(b, n2 // 2, 2, k, d)
  count = nonempty.reshape(b, n2 // 2, 2).sum(-1)
  mixed = jnp.einsum("bnckd,kcde->bnke", pairs, weight.astype(children.dtype))
  return mixed * (2.0 / jnp.maximum(count, 1))[..., None, None].astype(children.dtype)


def _build_tree(k_tok, v_tok, weight, leaf_size, depth, aggregator):
  """Node summaries `[(keys [b, 2^l, k, d], values, nonempty [b, 2^l])]`, root first: a leaf
  holds the mean of its valid tokens; a parent the mean of its subtree's tokens or, with the
  learned `aggregator`, `_learned_parent` of its children."""
  b = k_tok.shape[0]
  sums = [(jnp.sum((k_tok * weight).reshape(b, 2 ** depth, leaf_size, *k_tok.shape[2:]), 2),
           jnp.sum((v_tok * weight).reshape(b, 2 ** depth, leaf_size, *v_tok.shape[2:]), 2),
           jnp.sum(weight.reshape(b, 2 ** depth, leaf_size, 1, 1), 2))]
  if aggregator is None:  # Subtree sums and counts.
    for _ in range(depth):
      sums.append(tuple(x.reshape(b, x.shape[1] // 2, 2, *x.shape[2:]).sum(2) for x in sums[-1]))
    return [(ks / jnp.maximum(n, 1), vs / jnp.maximum(n, 1), n[..., 0, 0] > 0)
            for ks, vs, n in sums[::-1]]
  ks, vs, n = sums[0]
  levels = [(ks / jnp.maximum(n, 1), vs / jnp.maximum(n, 1), n[..., 0, 0] > 0)]
  for _ in range(depth):
    keys, values, nonempty = levels[-1]
    ok = nonempty.astype(keys.dtype)
    levels.append((_learned_parent(keys, ok, aggregator["key"]),
                   _learned_parent(values, ok, aggregator["value"]),
                   nonempty.reshape(b, -1, 2).any(-1)))
  return levels[::-1]


def _retrieve(q, levels, k_tok, v_tok, token_valid, leaf_size, noise):
  """Descend the tree and attend over the retrieved set: `(out [b, t, k, g, dv], log π of the
  path [b, t, k, g])`. At each level the child is the argmax of the policy logits q·k̄_child
  (+ Gumbel `noise [b, t, k, g, depth, 2]` when given: a sample of π); without noise the
  path carries no gradient and log π is 0."""
  b, length, num_kv = k_tok.shape[:3]
  index = jnp.zeros(q.shape[:-1], jnp.int32)
  keys, values, keep, log_pi = [], [], [], jnp.zeros(q.shape[:-1], q.dtype)
  score = lambda ks: jnp.einsum("btkgd,btkgd->btkg", q, ks)  # noqa: E731
  for level, (k_nodes, v_nodes, nonempty) in enumerate(levels[1:]):
    left, right = 2 * index, 2 * index + 1
    nonempty = jnp.broadcast_to(nonempty[..., None], nonempty.shape + (num_kv,))
    ok = jnp.stack([_gather(nonempty, left), _gather(nonempty, right)], -1)
    logits = jnp.stack([score(_gather(k_nodes, left)), score(_gather(k_nodes, right))], -1)
    if noise is None:
      logits = jax.lax.stop_gradient(logits)
    else:
      log_p = hard.log_probs(logits, ok)
    perturbed = jax.lax.stop_gradient(logits) + (0.0 if noise is None else noise[..., level, :])
    go_right = ok[..., 1] & (~ok[..., 0] | (perturbed[..., 1] > perturbed[..., 0]))
    if noise is not None:
      log_pi = log_pi + jnp.where(go_right, log_p[..., 1], log_p[..., 0])
    index, sibling = jnp.where(go_right, right, left), jnp.where(go_right, left, right)
    keys.append(_gather(k_nodes, sibling))
    values.append(_gather(v_nodes, sibling))
    keep.append(_gather(nonempty, sibling))
  # The leaf's tokens: token j of leaf i is at i·leaf_size + j.
  tokens = index[..., None] * leaf_size + jnp.arange(leaf_size)  # [b, t, k, g, leaf]
  valid_kv = jnp.broadcast_to(token_valid, (b, length, num_kv))
  for j in range(leaf_size):
    keys.append(_gather(k_tok, tokens[..., j]))
    values.append(_gather(v_tok, tokens[..., j]))
    keep.append(_gather(valid_kv, tokens[..., j]))
  keys, values, keep = jnp.stack(keys, -2), jnp.stack(values, -2), jnp.stack(keep, -1)
  probs = common.masked_softmax(jnp.einsum("btkgd,btkgrd->btkgr", q, keys), keep)
  return jnp.einsum("btkgr,btkgrd->btkgd", probs, values), log_pi


@register("tree_cross_attention", causal=False)
def tree_cross_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         leaf_size=1, aggregator="mean", retrieval="greedy", rng=None,
                         baseline="greedy"):
  """Tree Cross Attention (Feng et al., ICLR 2024).

  The keys (in sequence order) are the leaves of a balanced binary tree, `leaf_size` tokens
  per leaf; every node holds a summary (k̄, v̄) of its subtree. A leaf's is the mean of its
  tokens; a parent's is the mean of its subtree's keys and values (`aggregator="mean"`) or a
  learned aggregation of its children (the paper learns its aggregator; this linear form, per
  kv head, is our choice)

      k̄_parent = (2/m)·Σ_{c nonempty} k̄_c W^k_c,   v̄_parent = (2/m)·Σ_{c nonempty} v̄_c W^v_c

  (c = left, right; m the number of nonempty children; `aggregator` the weights
  {"key": W^k, "value": W^v}, which `TreeCrossAttentionParams` owns). A query descends from
  the root, at each node choosing a child by the retrieval policy π(c) = softmax_c(s·q·k̄_c)
  over the nonempty children and keeping the other child's summary; at the leaf it keeps the
  leaf's tokens. It then attends over the retrieved set R(q) of log₂(N/leaf_size) summaries
  and `leaf_size` tokens:

      out = Σ_{r∈R(q)} softmax_r(s·q·k̄_r) v̄_r.

  `retrieval="greedy"` takes argmax π and the descent carries no gradient. `"policy"` with
  `rng` (training) samples each child from π (Gumbel-max, noise `pair_gumbel` of the query and
  the (level, child) pair) and trains π by REINFORCE with reward the negative prediction loss,
  linearised at the output as in `hard_attention`: the surrogate
  out + (log π(path) − sg(log π(path)))·sg(out − b) has the value out and, for the incoming
  cotangent g, the score-function gradient gᵀ(out − b)·∇log π(path) besides the pathwise one;
  b is the greedy path's output (`baseline="greedy"`) or 0 (`"none"`). Without `rng`
  (evaluation) `"policy"` is greedy. The paper's auxiliary loss, full cross-attention over all
  leaves, is `dot_product_attention` on the same keys and values.

  Empty subtrees (padding, masked keys) are never chosen nor retrieved; a query with no valid
  key returns zeros. Cost O(q_len·(log N + leaf_size)) after the O(N) tree build.
  Cross-attention: no causal form.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (GQA when fewer heads).
    mask: optional key-padding mask broadcastable to `[batch, 1, 1, kv_len]`.
    is_causal: must be False.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    leaf_size: tokens per leaf (1: a leaf is a token).
    aggregator: "mean" or the learned weights {"key": `[num_kv_heads, 2, head_dim,
      head_dim]`, "value": `[num_kv_heads, 2, value_dim, value_dim]`} (index 0: left child).
    retrieval: "greedy" or "policy" (sampled and trained by REINFORCE when `rng` is given).
    rng: a `jax.random` key, only with `retrieval="policy"`.
    baseline: "greedy" or "none", the REINFORCE control variate.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("tree_cross_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  leaf_size = checks.positive_int("leaf_size", leaf_size)
  aggregator = _check_aggregator(aggregator, dims.num_kv_heads, dims.head_dim, dims.value_dim)
  if retrieval not in RETRIEVALS:
    raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
  if rng is not None:
    if retrieval != "policy":
      raise ValueError(f"rng samples the retrieval policy: it needs retrieval='policy', got "
                       f"retrieval={retrieval!r}")
    hard.check_rng(rng)
  valid = _key_validity(mask, dims)
  scale = common.default_scale(dims.head_dim, scale)
  dtype = jnp.promote_types(jnp.float32, jnp.result_type(query, key, value))
  b, s = dims.batch, dims.kv_len
  depth = max(-(-s // leaf_size) - 1, 0).bit_length()  # ⌈log₂(number of leaves)⌉
  length = leaf_size * 2 ** depth
  token_valid = jnp.ones((b, s), bool) if valid is None else jnp.broadcast_to(valid, (b, s))
  token_valid = jnp.pad(token_valid, [(0, 0), (0, length - s)])[..., None]  # [b, S, 1]
  pad = lambda x: jnp.pad(x.astype(dtype), [(0, 0), (0, length - s), (0, 0), (0, 0)])  # noqa: E731
  k_tok, v_tok = pad(key), pad(value)  # [b, S, k, d]
  levels = _build_tree(k_tok, v_tok, token_valid.astype(dtype)[..., None], leaf_size, depth,
                       aggregator)
  q = common.group_query(query, dims.num_kv_heads).astype(dtype) * scale  # [b, t, k, g, d]

  def retrieve(noise):
    return _retrieve(q, levels, k_tok, v_tok, token_valid, leaf_size, noise)

  if rng is None:
    out, _ = retrieve(None)
  else:
    noise = hard.pair_gumbel(hard.head_keys(rng, dims.num_heads, b),
                             jnp.arange(dims.q_len, dtype=jnp.int32),
                             jnp.arange(2 * depth, dtype=jnp.int32))  # [b, n, t, 2·depth]
    noise = jnp.moveaxis(noise, 1, 2).reshape(*q.shape[:-1], depth, 2).astype(dtype)
    out, log_pi = retrieve(noise)
    base = jax.lax.stop_gradient(retrieve(None)[0]) if baseline == "greedy" else 0.0
    score_term = (log_pi - jax.lax.stop_gradient(log_pi))[..., None]
    out = out + score_term * jax.lax.stop_gradient(out - base)
  return out.reshape(b, dims.q_len, dims.num_heads, dims.value_dim).astype(query.dtype)


def _half_identity(rng, shape, dtype):
  """I/2 `[..., d, d]`: the aggregator weights whose parent is the mean of its two children."""
  del rng
  return jnp.broadcast_to(0.5 * jnp.eye(shape[-1], dtype=dtype), shape)


@register_params("tree_cross_attention")
class TreeCrossAttentionParams(OpParams):
  """Tree Cross Attention's learned parts, both off by default. `op_args["aggregator"] =
  "learned"`: the aggregator weights W^k `[num_kv_heads, 2, head_dim, head_dim]` and W^v
  `[num_kv_heads, 2, value_dim, value_dim]`, initialised to I/2 (the mean of two full
  children). `op_args["retrieval"] = "policy"`: the layer's "dropout" random stream as `rng`
  when the model is applied with one (training: sampled retrieval), none at evaluation."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query
    op_args = self.op_args or {}
    args = {}
    if op_args.get("aggregator", "mean") == "learned":
      init = nn.with_logical_partitioning(_half_identity, ("kv_heads", None, "head_dim", None))
      args["aggregator"] = {
          name: self.param(f"{name}_aggregator", init,
                           (self.num_kv_heads, 2, x.shape[-1], x.shape[-1]), self.param_dtype)
          for name, x in (("key", key), ("value", value))}
    if op_args.get("retrieval") == "policy" and self.has_rng("dropout"):
      args["rng"] = self.make_rng("dropout")
    return args
