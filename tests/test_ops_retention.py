"""`retention` (Retentive Network: A Successor to Transformer for Large Language Models;
RMT: Retentive Networks Meet Vision Transformers) against float64 references.

The references build the decay matrices by explicit loops over token pairs (1-D distances and
2-D Manhattan distances) and evaluate full `[q, kv]` matrices in float64; they never call
`big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
_qkv = functools.partial(ref.qkv, t=13)


def _retention_ref(q, k, v, gamma, *, is_causal=False, mask=None):
  """RetNet's parallel retention with D̃ = D/sqrt(rowsum D) and R/max(|rowsum R|, 1)."""
  b, t, n, d = q.shape
  s_len = k.shape[1]
  allowed = np.ones((b, n, t, s_len), bool) if mask is None else np.broadcast_to(
      np.asarray(mask), (b, n, t, s_len)).copy()
  expo = np.zeros((t, s_len))
  for i in range(t):
    for j in range(s_len):
      expo[i, j] = abs(i - j)
      if is_causal and j > i:
        allowed[:, :, i, j] = False
  decay = jnp.where(allowed, gamma[None, :, None, None] ** expo, 0.0)
  decay = decay / jnp.sqrt(jnp.maximum(decay.sum(-1, keepdims=True), 1e-300))
  r = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d) * decay
  r = r / jnp.maximum(jnp.abs(r.sum(-1, keepdims=True)), 1.0)
  return jnp.einsum("bnts,bsnd->btnd", r, ref.repeat_kv(v, n))


def _manhattan_ref(q, k, v, gamma, h, w, *, renormalize=True, mask=None):
  b, t, n, d = q.shape
  dist = np.zeros((t, t))
  for p in range(t):
    for r in range(t):
      dist[p, r] = abs(p // w - r // w) + abs(p % w - r % w)
  decay = gamma[:, None, None] ** dist  # [n, t, t]
  logits = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d)
  full = np.ones((b, n, t, t), bool) if mask is None else np.broadcast_to(mask, (b, n, t, t))
  if renormalize:
    weights = ref.masked_softmax(logits + jnp.log(decay), full)
  else:
    weights = ref.masked_softmax(logits, full) * decay
  return jnp.einsum("bnts,bsnd->btnd", weights, ref.repeat_kv(v, n))


@pytest.mark.parametrize("kv_heads,is_causal,t,s", [(2, True, 13, 13), (1, False, 13, 13),
                                                   (2, False, 9, 13)])
def test_retention_1d_matches_reference(kv_heads, is_causal, t, s):
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  op = ops.get("retention")
  gamma = jnp.asarray([0.5, 0.7, 0.9, 1.0], jnp.float32)
  ref.assert_matches(lambda q, k, v, g: op(q, k, v, is_causal=is_causal, gamma=g),
                  lambda q, k, v, g: _retention_ref(q, k, v, g, is_causal=is_causal),
                  [q, k, v, gamma])


def test_retention_chunkwise_matches_reference():
  q, k, v = _qkv(t=13, k=1)
  gamma = jnp.asarray([0.5, 0.7, 0.9, 1.0], jnp.float32)
  op = ops.get("retention")
  ref.assert_matches(lambda q, k, v, g: op(q, k, v, is_causal=True, gamma=g, chunk_size=4),
                  lambda q, k, v, g: _retention_ref(q, k, v, g, is_causal=True),
                  [q, k, v, gamma])


def test_retention_1d_mask_and_empty_rows():
  q, k, v = _qkv(t=13, k=2)
  m = np.random.default_rng(4).random((2, 1, 13, 13)) > 0.3
  m[1, 0, 4] = False
  mask = jnp.asarray(m)
  op = ops.get("retention")
  out = ref.assert_matches(
      lambda q, k, v: op(q, k, v, gamma=0.8, is_causal=True, mask=mask),
      lambda q, k, v: _retention_ref(q, k, v, jnp.full((4,), 0.8), is_causal=True, mask=mask),
      [q, k, v])
  assert np.all(out[1, 4] == 0.0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_retention_2d_manhattan_matches_reference(renormalize):
  q, k, v = _qkv(t=35, k=2)
  gamma = jnp.asarray([0.6, 0.75, 0.85, 0.95], jnp.float32)
  m = np.random.default_rng(4).random((2, 1, 35, 35)) > 0.2
  m[0, 0, 3] = False
  mask = jnp.asarray(m)
  op = ops.get("retention")
  out = ref.assert_matches(
      lambda q, k, v, g: op(q, k, v, gamma=g, grid=(5, 7), renormalize=renormalize, mask=mask),
      lambda q, k, v, g: _manhattan_ref(q, k, v, g, 5, 7, renormalize=renormalize, mask=m),
      [q, k, v, gamma])
  assert np.all(out[0, 3] == 0.0)


def test_retention_bad_args():
  q, k, v = _qkv(t=35, k=2)
  op = ops.get("retention")
  with pytest.raises(NotImplementedError, match="causal"):
    op(q, k, v, grid=(5, 7), is_causal=True)
  with pytest.raises(ValueError, match="gamma"):
    op(q, k, v, gamma=1.5)
  with pytest.raises(ValueError, match="gamma"):
    op(q, k, v, gamma=jnp.ones((3,)))
  with pytest.raises(ValueError, match="grid"):
    op(q, k, v, grid=(5, 6))
  with pytest.raises(ValueError, match="chunk_size"):
    op(q, k, v, is_causal=True, chunk_size=4, mask=jnp.ones((1, 1, 35, 35), bool))
  with pytest.raises(ValueError, match="chunk_size"):
    op(q, k, v, chunk_size=4)


def test_retention_causal_ignores_the_future():
  op = jax.jit(functools.partial(ops.get("retention"), is_causal=True))
  op_checks.assert_causal_ignores_future(op, _qkv(t=13, k=2), cut=7)


@pytest.mark.parametrize("name", ["retention", "manhattan"])
def test_bfloat16_inputs(name):
  """bfloat16 inputs, the default decays."""
  t = 35 if name == "manhattan" else 13
  q, k, v = _qkv(t=t, k=2, dtype=jnp.bfloat16)
  g = jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(4)))  # the defaults: RetNet's
  g2 = jnp.asarray(1.0 - 2.0 ** (-2.0 - np.arange(4)))  # and RMT's (heads_range 4, 4 heads)
  cases = {
      "retention": (lambda q, k, v: ops.get("retention")(q, k, v, is_causal=True),
                    lambda q, k, v: _retention_ref(q, k, v, g, is_causal=True)),
      "manhattan": (lambda q, k, v: ops.get("retention")(q, k, v, grid=(5, 7)),
                    lambda q, k, v: _manhattan_ref(q, k, v, g2, 5, 7)),
  }
  op_fn, ref_fn = cases[name]
  ref.assert_matches(op_fn, ref_fn, [q, k, v], tol=BF16_TOL)
