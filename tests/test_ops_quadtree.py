"""`quadtree` (QuadTree Attention for Vision Transformers, QuadTree-B) against a float64
reference.

The reference runs the levels one by one with dense `[patches, patches]` candidate and selection
masks and pooling matrices built by loops over token positions; it never calls `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import reference as ref

F32_TOL = ref.F32_TOL
_qkv = functools.partial(ref.qkv, t=11)


def _patch_of(grid, factor):
  """Level patch of every token (by a loop over positions) and the level's grid."""
  h, w = grid
  return np.array([(y // factor) * (w // factor) + x // factor
                   for y in range(h) for x in range(w)]), (h // factor, w // factor)


def _quadtree_ref(q, k, v, *, grid, levels, topk):
  """Levels one by one on dense `[patches, patches]` matrices, float64."""
  q, k, v = ref.f64(q, k, v)
  n, d = q.shape[2], q.shape[3]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  t = grid[0] * grid[1]
  out = 0.0
  prev = None  # (weights, selected, patch grid) of the previous level
  for l in range(levels):
    factor = 2 ** (levels - 1 - l)
    patch, (ph, pw) = _patch_of(grid, factor)
    num = ph * pw
    pool = np.zeros((num, t))
    pool[patch, np.arange(t)] = 1.0 / factor ** 2
    ql, kl, vl = (jnp.einsum("pt,btnd->bnpd", pool, x) for x in (q, k, v))
    logits = jnp.einsum("bnpd,bnrd->bnpr", ql, kl) / np.sqrt(d)
    if prev is None:
      weights = jax.nn.softmax(logits, axis=-1)
      candidate = np.ones((1, 1, num, num), bool)
    else:
      prev_w, prev_sel, prev_w_side = prev
      parent = np.array([(p // pw // 2) * prev_w_side + (p % pw) // 2 for p in range(num)])
      candidate = prev_sel[:, :, parent][:, :, :, parent]
      sibling = (parent[:, None] == parent[None, :]).astype(np.float64)
      e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      share = e / (e @ sibling)  # softmax over the 4 children of the key's parent
      weights = jnp.where(candidate, prev_w[:, :, parent][:, :, :, parent] * share, 0.0)
    if l < levels - 1:
      ranked = jnp.argsort(-jnp.where(candidate, jax.lax.stop_gradient(weights), -1.0), -1)
      selected = jnp.sum(jax.nn.one_hot(ranked[..., :topk], num), -2) > 0
      kept = jnp.where(selected, 0.0, weights)
      prev = (weights, selected, pw)
    else:
      kept = weights
    message = jnp.einsum("bnpr,bnrd->bnpd", kept, vl)
    out = out + jnp.einsum("tp,bnpd->btnd", pool.T * factor ** 2, message)
  return out


@pytest.mark.parametrize("grid,levels,topk,kv_heads", [
    ((4, 4), 2, 2, 2),    # GQA
    ((8, 8), 3, 3, 2),    # three levels, K = 3 of 4 coarse patches
    ((2, 6), 2, 1, 1),    # MQA, K = 1
    ((3, 5), 1, None, 2),  # one level: plain softmax attention over an odd grid
])
def test_quadtree_matches_reference(grid, levels, topk, kv_heads):
  q, k, v = _qkv(t=grid[0] * grid[1], k=kv_heads, dv=6, std=2.0)
  op = lambda q, k, v: ops.get("quadtree")(q, k, v, grid=grid, levels=levels, topk=topk)
  refn = lambda q, k, v: _quadtree_ref(q, k, v, grid=grid, levels=levels, topk=topk)
  out = ref.assert_matches(op, refn, [q, k, v])
  if levels == 1:
    with ref.x64():
      np.testing.assert_allclose(out, ref.softmax_attention(q, k, v), **F32_TOL)


def test_quadtree_weights_partition_and_full_topk():
  """The weights over the unrefined patches of all levels sum to one (values of ones give
  ones); with zero queries every level is uniform, so K = all coarse patches gives the mean
  of all values."""
  grid = (4, 4)
  q, k, v = _qkv(t=16, k=2, std=2.0)
  ones = jnp.ones_like(v)
  for levels, topk in ((2, 1), (3, 1)):
    out = ops.get("quadtree")(q, k, ones, grid=grid, levels=levels, topk=topk)
    np.testing.assert_allclose(out, 1.0, rtol=1e-5)  # the weights sum to one per query
  zero_q = jnp.zeros_like(q)  # uniform weights at every level: the mean of all values
  out = ops.get("quadtree")(zero_q, k, v, grid=grid, levels=2, topk=4)
  want = jnp.broadcast_to(ref.repeat_kv(v, 4).mean(1, keepdims=True), out.shape)
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_quadtree_bf16_jit_and_bad_input():
  q, k, v = _qkv(t=16, k=2, dtype=jnp.bfloat16)
  out = jax.jit(lambda q, k, v: ops.get("quadtree")(q, k, v, grid=(4, 4), levels=2, topk=2))(
      q, k, v)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 16, 4, 8)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  op = ops.get("quadtree")
  q, k, v = _qkv(t=12, k=2)
  with pytest.raises(ValueError, match="divisible by 2"):
    op(q, k, v, grid=(3, 4), levels=2, topk=1)
  with pytest.raises(ValueError, match="grid"):
    op(q, k, v, grid=(4, 4), levels=2, topk=1)
  with pytest.raises(ValueError, match="grid"):
    op(q, k, v, levels=2, topk=1)
  with pytest.raises(ValueError, match="levels"):
    op(q, k, v, grid=(2, 6), levels=0, topk=1)
  with pytest.raises(ValueError, match="topk"):
    op(q, k, v, grid=(2, 6), levels=2, topk=4)  # 3 coarse patches
  with pytest.raises(ValueError, match="mask"):
    op(q, k, v, grid=(2, 6), levels=2, topk=1, mask=jnp.ones((1, 1, 12, 12), bool))
  with pytest.raises(NotImplementedError, match="causal"):
    op(q, k, v, grid=(2, 6), levels=2, topk=1, is_causal=True)
