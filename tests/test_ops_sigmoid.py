"""`sigmoid` (Theory, Analysis, and Best Practices for Sigmoid Self-Attention) against a
float64 reference (`tests/score_checks.py`, written from the paper's formula).
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests.reference import full_mask
from tests.score_checks import (B, CASES, N, S, T, assert_bfloat16_matches_reference,
                                assert_causal_past_ignores_future,
                                assert_fully_masked_rows_give_zeros_and_finite_grads,
                                assert_matches_reference, check_against_reference, inputs)


@pytest.mark.parametrize("kv_heads,scenario", CASES)
def test_matches_reference(kv_heads, scenario):
  assert_matches_reference("sigmoid", kv_heads, scenario)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sigmoid_bias_soft_cap_and_logit_bias(kv_heads):
  q, k, v = inputs(2, kv_heads=kv_heads)
  bias = np.random.RandomState(5).randn(1, N, T, S).astype(np.float32)
  logit_bias = np.float32(-1.5)
  op_kwargs = {"bias": jnp.asarray(bias), "logit_bias": jnp.asarray(logit_bias),
               "logits_soft_cap": 2.0, "scale": 0.5, "local_window_size": 4}
  ref_kwargs = {"soft_cap": 2.0, "scale": 0.5}
  m = full_mask(B, N, T, S, window=4)
  check_against_reference("sigmoid", q, k, v, op_kwargs, ref_kwargs, m,
                          arrays=("bias", "logit_bias"))


def test_sigmoid_default_bias_is_minus_log_kv_len():
  q, k, v = (jnp.asarray(x) for x in inputs(3))
  np.testing.assert_allclose(ops.get("sigmoid")(q, k, v),
                             ops.get("sigmoid")(q, k, v, logit_bias=-np.log(S)),
                             rtol=1e-6, atol=1e-6)


def test_causal_past_ignores_future():
  assert_causal_past_ignores_future("sigmoid")


def test_fully_masked_rows_give_zeros_and_finite_grads():
  assert_fully_masked_rows_give_zeros_and_finite_grads("sigmoid")


def test_bfloat16():
  assert_bfloat16_matches_reference("sigmoid")


def test_layer_sigmoid():
  x = jnp.asarray(np.random.RandomState(14).randn(B, T, 16).astype(np.float32))
  attn = layers.Attention(num_heads=4, num_kv_heads=2, op="sigmoid")
  variables = attn.init(jax.random.key(1), x)
  assert not variables["params"].get("op_params", {})
  out = attn.apply(variables, x, is_causal=True)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_bad_inputs_raise():
  q, k, v = (jnp.asarray(x) for x in inputs(15))
  with pytest.raises(ValueError, match="logit_bias"):
    ops.get("sigmoid")(q, k, v, logit_bias=jnp.zeros((N,)))
  with pytest.raises(ValueError, match="logits_soft_cap"):
    ops.get("sigmoid")(q, k, v, logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match="bias"):
    ops.get("sigmoid")(q, k, v, bias=jnp.zeros((B, N, T, S + 1)))


def test_fresh_import():
  code = ("import jax.numpy as jnp\n"
          "from big_attn import ops\n"
          "q = jnp.ones((1, 5, 2, 4)); k = jnp.ones((1, 3, 1, 4))\n"
          "out = ops.get('sigmoid')(q, k, k)\n"
          "assert out.shape == (1, 5, 2, 4), out.shape\n"
          "assert abs(float(out[0, 0, 0, 0]) - 3 / (1 + 3 * 2.718281828459045 ** -2)) < 1e-5\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr


def test_pallas_implementation_is_the_flash_sigmoid_kernel():
  """implementation="pallas" (the FlashSigmoid kernel, interpreted on CPU) equals the XLA path,
  forward and gradients, with GQA, an odd length, causal + window, segments and a soft cap."""
  q = jax.random.normal(jax.random.key(0), (1, 13, 4, 16))
  k, v = (jax.random.normal(jax.random.key(i), (1, 13, 2, 16)) for i in (1, 2))
  seg = jnp.array([[0] * 6 + [1] * 7])
  op = ops.get("sigmoid")

  def loss(impl, q, k, v):
    out = op(q, k, v, is_causal=True, segment_ids=seg, local_window_size=(5, 0),
             logits_soft_cap=20.0, logit_bias=-1.5, implementation=impl)
    return jnp.sum(out * jnp.cos(out)), out

  (_, want), want_grads = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2),
                                             has_aux=True)(q, k, v)
  (_, got), grads = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas"),
                                               argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  assert ops.spec("sigmoid").implementation
  with pytest.raises(ValueError, match="does not support a mask"):
    op(q, k, v, mask=jnp.ones((1, 1, 13, 13), bool), implementation="pallas")
  with pytest.raises(TypeError, match="logit_bias as a Python number"):
    op(q, k, v, logit_bias=jnp.float32(-1.0), implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    op(q, k, v, implementation="cudnn")
