"""Tree Cross Attention: each query retrieves O(log N) summaries of a balanced key tree."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register


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


@register("tree_cross_attention", causal=False)
def tree_cross_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         leaf_size=1):
  """Tree Cross Attention (Feng et al., 2024).

  The keys (in sequence order) are the leaves of a balanced binary tree, `leaf_size` tokens
  per leaf; every node holds a summary of its subtree, the mean of its keys and of its values
  (the fixed aggregator of this op; the paper learns one). A query descends from the root,
  at each node moving to the child with the larger score s·q·k̄_child and keeping the other
  child's summary; at the leaf it keeps the leaf's tokens. It then attends over the retrieved
  set R(q) of log₂(N/leaf_size) summaries and `leaf_size` tokens:

      out = Σ_{r∈R(q)} softmax_r(s·q·k̄_r) v̄_r.

  The descent is greedy and carries no gradient (the paper trains it with reinforcement
  learning); the attention over the retrieved set is differentiable in q, k and v. Empty
  subtrees (padding, masked keys) are never chosen nor retrieved; a query with no valid key
  returns zeros. Cost O(q_len·(log N + leaf_size)) after the O(N) tree build. Cross-attention:
  no causal form.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (GQA when fewer heads).
    mask: optional key-padding mask broadcastable to `[batch, 1, 1, kv_len]`.
    is_causal: must be False.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    leaf_size: tokens per leaf (1: a leaf is a token).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("tree_cross_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  leaf_size = checks.positive_int("leaf_size", leaf_size)
  valid = _key_validity(mask, dims)
  scale = common.default_scale(dims.head_dim, scale)
  dtype = jnp.promote_types(jnp.float32, jnp.result_type(query, key, value))
  b, s = dims.batch, dims.kv_len
  depth = max(-(-s // leaf_size) - 1, 0).bit_length()  # ⌈log₂(number of leaves)⌉
  length = leaf_size * 2 ** depth
  token_valid = jnp.ones((b, s), bool) if valid is None else jnp.broadcast_to(valid, (b, s))
  token_valid = jnp.pad(token_valid, [(0, 0), (0, length - s)])[..., None]  # [b, S, 1]
  pad = lambda x: jnp.pad(x.astype(dtype), [(0, 0), (0, length - s), (0, 0), (0, 0)])
  k_tok, v_tok = pad(key), pad(value)  # [b, S, k, d]
  weight = token_valid.astype(dtype)[..., None]

  # Subtree sums and counts, leaves first: level l has 2^l nodes.
  sums = [(jnp.sum((k_tok * weight).reshape(b, 2 ** depth, leaf_size, *k_tok.shape[2:]), 2),
           jnp.sum((v_tok * weight).reshape(b, 2 ** depth, leaf_size, *v_tok.shape[2:]), 2),
           jnp.sum(weight.reshape(b, 2 ** depth, leaf_size, 1, 1), 2))]
  for _ in range(depth):
    sums.append(tuple(x.reshape(b, x.shape[1] // 2, 2, *x.shape[2:]).sum(2) for x in sums[-1]))
  levels = [(ks / jnp.maximum(n, 1), vs / jnp.maximum(n, 1), n[..., 0, 0] > 0)
            for ks, vs, n in sums[::-1]]  # Root first.

  q = common.group_query(query, dims.num_kv_heads).astype(dtype) * scale  # [b, t, k, g, d]
  index = jnp.zeros(q.shape[:-1], jnp.int32)
  keys, values, keep = [], [], []
  score = lambda ks: jnp.einsum("btkgd,btkgd->btkg", q, ks)
  for k_nodes, v_nodes, nonempty in levels[1:]:
    left, right = 2 * index, 2 * index + 1
    nonempty = jnp.broadcast_to(nonempty[..., None], nonempty.shape + (dims.num_kv_heads,))
    left_ok, right_ok = _gather(nonempty, left), _gather(nonempty, right)
    go_right = right_ok & (~left_ok | (jax.lax.stop_gradient(
        score(_gather(k_nodes, right)) > score(_gather(k_nodes, left)))))
    index, sibling = jnp.where(go_right, right, left), jnp.where(go_right, left, right)
    keys.append(_gather(k_nodes, sibling))
    values.append(_gather(v_nodes, sibling))
    keep.append(_gather(nonempty, sibling))
  # The leaf's tokens: token j of leaf i is at i·leaf_size + j.
  tokens = index[..., None] * leaf_size + jnp.arange(leaf_size)  # [b, t, k, g, leaf]
  valid_kv = jnp.broadcast_to(token_valid, (b, length, dims.num_kv_heads))
  for j in range(leaf_size):
    keys.append(_gather(k_tok, tokens[..., j]))
    values.append(_gather(v_tok, tokens[..., j]))
    keep.append(_gather(valid_kv, tokens[..., j]))
  keys, values, keep = jnp.stack(keys, -2), jnp.stack(values, -2), jnp.stack(keep, -1)
  probs = common.masked_softmax(jnp.einsum("btkgd,btkgrd->btkgr", q, keys), keep)
  out = jnp.einsum("btkgr,btkgrd->btkgd", probs, values)
  return out.reshape(b, dims.q_len, dims.num_heads, dims.value_dim).astype(query.dtype)
