"""The `ngpt` op (nGPT: unit-norm q, k scaled by s_qk, softmax scale √d_k) against a float64
reference written from the paper's formula, its errors, and its parameter module."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.layers import Attention
from tests import reference as ref


def _ngpt_ref(q, k, v, s_q, s_k, full_mask):
  """softmax(√d · (s_q ⊙ q/‖q‖)·(s_k ⊙ k/‖k‖)) v, K/V heads repeated, in float64."""
  q, k, v, s_q, s_k = ref.f64(q, k, v, s_q, s_k)
  d = q.shape[3]
  q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True)) * s_q
  k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True)) * s_k
  return ref.softmax_attention(q, k, v, mask=full_mask, scale=np.sqrt(d))


@pytest.mark.parametrize("kv_heads,causal,masked", [(4, True, False), (2, False, True)])
def test_ngpt_matches_reference(kv_heads, causal, masked):
  b, t, n, d = 2, 7, 4, 8
  q = ref.normal(0, (b, t, n, d))
  k = ref.normal(1, (b, t, kv_heads, d))
  v = ref.normal(2, (b, t, kv_heads, 6))
  s_q = 1.0 + ref.normal(3, (n, d), std=0.3)
  s_k = s_q if kv_heads == n else 1.0 + ref.normal(4, (kv_heads, d), std=0.3)
  mask = None
  if masked:  # batch 1 attends to nothing: its output must be 0, not NaN
    mask = np.ones((b, 1, 1, t), bool)
    mask[0, ..., 5:] = False
    mask[1] = False
  full = ref.full_mask(b, n, t, t, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("ngpt"), mask=mask, is_causal=causal)
  if kv_heads == n:
    out = ref.assert_matches(lambda q, k, v, s: op(q, k, v, s_qk=s),
                             lambda q, k, v, s: _ngpt_ref(q, k, v, s, s, full), (q, k, v, s_q))
  else:
    out = ref.assert_matches(lambda q, k, v, s, sk: op(q, k, v, s_qk=s, s_k=sk),
                             lambda q, k, v, s, sk: _ngpt_ref(q, k, v, s, sk, full),
                             (q, k, v, s_q, s_k))
  if masked:
    assert np.all(out[1] == 0.0)


def test_ngpt_is_invariant_to_query_key_norms():
  q, k, v = ref.normal(0, (1, 5, 2, 4)), ref.normal(1, (1, 5, 2, 4)), ref.normal(2, (1, 5, 2, 4))
  op = ops.get("ngpt")
  np.testing.assert_allclose(op(3.0 * q, 0.5 * k, v, is_causal=True), op(q, k, v, is_causal=True),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(s_qk=jnp.ones((3, 4))), "s_qk must have shape"),
    (dict(s_qk=jnp.ones((4, 4)), s_k=jnp.ones((2, 3))), "s_k must have shape"),
    (dict(s_qk=jnp.ones((4, 4))), "pass s_k"),
    (dict(s_qk=jnp.ones((4,), jnp.int32)), "floating"),
])
def test_ngpt_bad_args(kwargs, match):
  q, k = jnp.ones((1, 3, 4, 4)), jnp.ones((1, 3, 2, 4))
  with pytest.raises((ValueError, TypeError), match=match):
    ops.get("ngpt")(q, k, k, **kwargs)


def test_ngpt_layer_owns_restored_s_qk():
  """The parameter module stores s_qk at s_qk_scale = 1/√features and restores it as
  s_qk·(1/s_qk_scale): a stored 2/√features is s_qk = 2 in the op; GQA adds s_k."""
  x = ref.normal(0, (2, 5, 16))
  layer = Attention(num_heads=4, num_kv_heads=2, op="ngpt")
  params = jax.tree.map(lambda a: a.value, layer.init(jax.random.key(0), x, is_causal=True)[
      "params"], is_leaf=lambda a: hasattr(a, "value"))
  assert params["op_params"]["s_qk"].shape == (4, 4)
  assert params["op_params"]["s_k"].shape == (2, 4)
  np.testing.assert_allclose(params["op_params"]["s_qk"], 16 ** -0.5)
  params["op_params"] = {"s_qk": jnp.full((4, 4), 2 / 4.0), "s_k": jnp.full((2, 4), 3 / 4.0)}
  got = layer.apply({"params": params}, x, is_causal=True)
  q, k, v = (jnp.einsum("btf,fnd->btnd", x, params[name]["kernel"])
             for name in ("query", "key", "value"))
  heads = ops.get("ngpt")(q, k, v, is_causal=True, s_qk=jnp.full((4, 4), 2.0),
                          s_k=jnp.full((2, 4), 3.0))
  want = jnp.einsum("btnd,ndf->btf", heads, params["out"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
