"""`lean_decode` (Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers) against float64 softmax attention over the visible cache entries,
written out per query; the reference never calls `big_attn`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import reference as ref


def _reference_decode(q, k, v, *, kv_length, is_causal, mask=None):
  """softmax(QKᵀ/√d, masked)V in float64 with the visible cache entries written out."""
  b, t, n, d = q.shape
  s = k.shape[1]
  q, k, v = ref.f64(q, k, v)
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  logits = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
  lengths = np.broadcast_to(np.asarray(kv_length), (b,))
  visible = np.zeros((b, n, t, s), bool)
  for bi in range(b):
    for i in range(t):
      last = lengths[bi] - t + i if is_causal else lengths[bi] - 1
      visible[bi, :, i, :max(0, min(last + 1, lengths[bi]))] = True
  if mask is not None:
    visible &= np.broadcast_to(mask, visible.shape)
  logits = jnp.where(visible, logits, -jnp.inf)
  p = jnp.exp(logits - jnp.max(jnp.where(visible, logits, -1e30), -1, keepdims=True))
  p = jnp.where(visible, p, 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-300)
  return jnp.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("t,s,n,kvh,block,kv_length,causal", [
    (1, 13, 4, 2, 4, None, False),
    (1, 13, 4, 1, 5, np.array([13, 6, 1]), True),
    (3, 10, 6, 3, 3, np.array([10, 7, 3]), True),
    (2, 9, 2, 2, 16, 9, False),
])
def test_lean_decode_matches_float64_reference(t, s, n, kvh, block, kv_length, causal):
  rng = np.random.default_rng(t * 100 + s)
  q = jnp.asarray(rng.normal(size=(3, t, n, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, s, kvh, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, s, kvh, 8)), jnp.float32)
  kvl = None if kv_length is None else (kv_length if isinstance(kv_length, int)
                                        else jnp.asarray(kv_length, jnp.int32))
  ref_len = s if kv_length is None else kv_length
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def with_cotangent(fn, cot):
    def loss(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out * cot), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  (_, out), grads = with_cotangent(lambda q, k, v: ops.get("lean_decode")(
      q, k, v, is_causal=causal, kv_length=kvl, block_size=block), cot)(q, k, v)
  with ref.x64():
    (_, want), want_grads = with_cotangent(lambda q, k, v: _reference_decode(
        q, k, v, kv_length=ref_len, is_causal=causal), ref.f64(cot))(*ref.f64(q, k, v))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_lean_decode_mask_empty_rows_and_errors():
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 4)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, 2, 7)) < 0.5).at[0, 0, 1].set(False)
  op = ops.get("lean_decode")
  out = op(q, k, v, mask=mask, block_size=2)
  with ref.x64():
    want = _reference_decode(q, k, v, kv_length=7, is_causal=False, mask=np.asarray(mask))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[0, 1], 0.0)  # a row with nothing visible gives zeros
  np.testing.assert_array_equal(op(q, k, v, kv_length=0), 0.0)
  np.testing.assert_allclose(  # equals softmax attention over the whole cache
      op(q, k, v, block_size=3), ops.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="kv_length must be in"):
    op(q, k, v, kv_length=8)
  with pytest.raises(ValueError, match="block_size"):
    op(q, k, v, block_size=0)
  with pytest.raises(TypeError, match="kv_length"):
    op(q, k, v, kv_length=2.5)
