"""`combiner` and `quadtree` against float64 references.

The references are written from the papers' formulas on explicit dense matrices: Combiner's
`[q, kv]` attention matrix p(j|i) = p(Ω_r|i)·q(j|Ω_r) built from block-membership masks, and
QuadTree-B's levels one by one with dense `[patches, patches]` candidate and selection masks and
pooling matrices built by loops over token positions. They never call `big_attn`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import reference as ref

F32_TOL = ref.F32_TOL


def _qkv(b=2, t=11, n=4, k=2, d=8, dv=None, dtype=jnp.float32, seed=0, std=1.0):
  dv = d if dv is None else dv
  return (ref.normal(seed, (b, t, n, d), dtype, std),
          ref.normal(seed + 1, (b, t, k, d), dtype, std),
          ref.normal(seed + 2, (b, t, k, dv), dtype, std))


# ----------------------------------------------------------------------------------------------
# Combiner.
# ----------------------------------------------------------------------------------------------
def _combiner_ref(q, k, v, *, block_size, is_causal, key_valid, key_pool):
  """Dense p(j|i) of Combiner-Fixed; key_valid `[b, n, s]` (NumPy bool)."""
  q, k, v = ref.f64(q, k, v)
  b, t, n, d = q.shape
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  blk = np.arange(t) // block_size
  num_blocks = blk[-1] + 1
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  same = blk[:, None] == blk[None, :]
  direct = same & (j <= i) if is_causal else same  # [t, s]
  seen = blk[None, :] < blk[:, None] if is_causal else ~same  # query i sees key j's region
  kv_valid = jnp.asarray(key_valid)  # [b, n, s]
  s_direct = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
  member = (blk[None, :] == np.arange(num_blocks)[:, None])[None, None] & key_valid[:, :, None]
  count = member.sum(-1)  # [b, n, S]
  if key_pool == "mean":
    k_bar = jnp.einsum("bnrs,bsnd->bnrd", member / np.maximum(count, 1)[..., None], k)
  else:
    k_bar = jnp.max(jnp.where(member[..., None], jnp.moveaxis(k, 1, 2)[:, :, None], -1e300),
                    axis=3)
  s_region = jnp.einsum("btnd,bnrd->bntr", q, k_bar) / np.sqrt(d)  # [b, n, t, S]
  region_ok = (count > 0)[:, :, None, :]
  seen_region = np.stack([seen[:, blk == r].any(-1) if (blk == r).any() else
                          np.zeros(t, bool) for r in range(num_blocks)], -1)  # [t, S]
  region_ok = region_ok & seen_region[None, None]
  direct_ok = direct[None, None] & kv_valid[:, :, None, :]
  m = jnp.maximum(jnp.max(jnp.where(direct_ok, s_direct, -1e300), -1, keepdims=True),
                  jnp.max(jnp.where(region_ok, s_region, -1e300), -1, keepdims=True))
  m = jax.lax.stop_gradient(jnp.where(m > -1e299, m, 0.0))
  e_direct = jnp.where(direct_ok, jnp.exp(s_direct - m), 0.0)
  e_region = jnp.where(region_ok, jnp.exp(s_region - m), 0.0)
  z = e_direct.sum(-1, keepdims=True) + e_region.sum(-1, keepdims=True)
  # q(j | Ω_r) = 1/|Ω_r| over the region's valid keys; spread p(Ω_r | i) onto them.
  q_in_region = jnp.where(kv_valid, 1.0 / np.maximum(count, 1)[..., blk], 0.0)  # [b, n, s]
  p = e_direct + jnp.take_along_axis(
      e_region, jnp.broadcast_to(jnp.asarray(blk), e_region.shape[:-1] + (t,)), -1
  ) * q_in_region[:, :, None, :] * seen[None, None]
  p = p / jnp.maximum(z, 1e-300)
  return jnp.einsum("bnts,bsnd->btnd", p, v), p


@pytest.mark.parametrize("t,block,causal,kv_heads,masked,pool", [
    (11, 4, False, 2, False, "mean"),   # odd length, padded last block, GQA
    (13, 3, True, 4, True, "mean"),     # causal, key padding
    (9, 3, False, 1, True, "max"),      # MQA, max-pooled summary keys, padding
    (7, 2, True, 2, False, "max"),
])
def test_combiner_matches_reference(t, block, causal, kv_heads, masked, pool):
  q, k, v = _qkv(t=t, k=kv_heads, dv=6)
  b, n = q.shape[0], q.shape[2]
  valid = np.ones((b, 1, t), bool)
  mask = None
  if masked:
    valid = np.random.default_rng(3).random((b, 1, t)) > 0.3
    valid[:, :, 0] = True
    mask = jnp.asarray(valid[:, :, None, :])
  key_valid = np.broadcast_to(valid, (b, n, t))
  op = lambda q, k, v: ops.get("combiner")(q, k, v, mask=mask, is_causal=causal,
                                           block_size=block, key_pool=pool)
  refn = lambda q, k, v: _combiner_ref(q, k, v, block_size=block, is_causal=causal,
                                       key_valid=key_valid, key_pool=pool)[0]
  ref.assert_matches(op, refn, [q, k, v])


def test_combiner_full_support_and_exact_limits():
  """Every visible key has weight > 0 and rows sum to 1; block ≥ seq is softmax attention."""
  q, k, v = _qkv(t=10, k=2)
  key_valid = np.ones((2, 4, 10), bool)
  with ref.x64():
    _, p = _combiner_ref(q, k, v, block_size=3, is_causal=True, key_valid=key_valid,
                         key_pool="mean")
    p = np.asarray(p)
  causal = np.tril(np.ones((10, 10), bool))
  assert np.all(p[..., causal] > 0) and np.all(p[..., ~causal] == 0)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
  for causal in (False, True):
    out = ops.get("combiner")(q, k, v, is_causal=causal, block_size=10)
    want = ops.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(out, want, **F32_TOL)
  # Block size 1, causal: each earlier key is its own region, summary = the key itself.
  out = ops.get("combiner")(q, k, v, is_causal=True, block_size=1)
  np.testing.assert_allclose(out, ops.dot_product_attention(q, k, v, is_causal=True), **F32_TOL)


def test_combiner_masked_rows_bf16_and_jit():
  q, k, v = _qkv(t=8, k=2, dtype=jnp.bfloat16)
  mask = np.ones((2, 1, 1, 8), bool)
  mask[1] = False  # batch 1: no key at all -> zeros
  fn = jax.jit(lambda q, k, v: ops.get("combiner")(q, k, v, mask=jnp.asarray(mask),
                                                   block_size=3))
  out = fn(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert np.all(np.asarray(out[1], np.float32) == 0)
  with ref.x64():
    want = _combiner_ref(q, k, v, block_size=3, is_causal=False,
                         key_valid=np.broadcast_to(mask[:, :, 0], (2, 4, 8)), key_pool="mean")[0]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), **ref.BF16_TOL)


def test_combiner_bad_input():
  q, k, v = _qkv(t=8)
  op = ops.get("combiner")
  with pytest.raises(ValueError, match="block_size"):
    op(q, k, v, block_size=True)
  with pytest.raises(ValueError, match="block_size"):
    op(q, k, v, block_size=0)
  with pytest.raises(ValueError, match="key_pool"):
    op(q, k, v, block_size=2, key_pool="median")
  with pytest.raises(ValueError, match="key-padding"):
    op(q, k, v, block_size=2, mask=jnp.ones((1, 1, 8, 8), bool))
  with pytest.raises(ValueError, match="q_len must equal kv_len"):
    op(q[:, :5], k, v, block_size=2)
  with pytest.raises(TypeError, match="query"):
    op(q.astype(jnp.int32), k, v, block_size=2)


# ----------------------------------------------------------------------------------------------
# QuadTree-B.
# ----------------------------------------------------------------------------------------------
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
