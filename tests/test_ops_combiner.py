"""`combiner` (Combiner: Full Attention Transformer with Sparse Computation Cost) against a
float64 reference.

The reference is written from the paper's formula on the dense `[q, kv]` attention matrix
p(j|i) = p(Ω_r|i)·q(j|Ω_r), built from block-membership masks; it never calls `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

F32_TOL = ref.F32_TOL
_qkv = functools.partial(ref.qkv, t=11)


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


@pytest.mark.parametrize("causal,pool", [(True, "mean"), (False, "max")])
def test_combiner_packed_rows_equal_each_segment_alone(causal, pool):
  """With `segment_ids`, blocks start at each segment's start and regions stay within it."""
  args = dict(block_size=2, key_pool=pool)
  op_checks.assert_packed_rows_match_segments(ops.get("combiner"), args, lambda m: args,
                                              is_causal=causal)


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
