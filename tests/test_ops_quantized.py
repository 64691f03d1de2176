"""`sage_int8` (SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
Acceleration) against its int8 formula and float64 softmax attention.

The reference is written from the paper: smoothing of K and per-block int8 rounding in NumPy,
the dequantised scores evaluated in float64; it never calls `big_attn`.
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
_qkv = functools.partial(ref.qkv, t=21)


def _rel_err_and_cosine(out, want):
  out, want = np.asarray(out, np.float64).ravel(), np.asarray(want, np.float64).ravel()
  cosine = out @ want / np.linalg.norm(out) / np.linalg.norm(want)
  return np.linalg.norm(out - want) / np.linalg.norm(want), cosine


@pytest.mark.parametrize("is_causal", [False, True])
def test_sage_int8_matches_int8_formula_and_is_close_to_softmax(is_causal):
  q, k, v = _qkv(t=45, s=45, d=32)
  k = k + 2.0  # a common key offset, which the smoothing removes
  full = ref.full_mask(2, 4, 45, 45, is_causal=is_causal)
  op = jax.jit(functools.partial(ops.get("sage_int8"), block_q=16, block_k=8,
                                 is_causal=is_causal), static_argnames="pv_dtype")
  exact = ref.sage_attention(q, k, v, 16, 8, full, is_causal)
  out32 = op(q, k, v, pv_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(out32, np.float64), exact, rtol=2e-3, atol=2e-3)
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v, mask=full))
  for pv_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    err, cosine = _rel_err_and_cosine(op(q, k, v, pv_dtype=pv_dtype), want)
    print(f"sage_int8 vs softmax, pv {jnp.dtype(pv_dtype).name}, causal {is_causal}: "
          f"relative L2 error {err:.2e}, cosine similarity {cosine:.6f}")
    assert err < 2e-2 and cosine > 0.9998, (pv_dtype, err, cosine)


def _dot_operand_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((tuple(str(x.aval.dtype) for x in eqn.invars),
                    str(eqn.params.get("preferred_element_type"))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dot_operand_dtypes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dot_operand_dtypes(sub)
  return found


def test_sage_int8_scores_are_an_int8_matmul():
  q, k, v = _qkv()
  fn = lambda q, k, v: ops.get("sage_int8")(q, k, v, is_causal=True)
  for jaxpr in (jax.make_jaxpr(fn)(q, k, v),
                jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum()))(q, k, v)):
    dots = _dot_operand_dtypes(jaxpr.jaxpr)
    assert (("int8", "int8"), "int32") in dots, dots


def test_sage_int8_gradients_are_float_attention_gradients():
  q, k, v = _qkv(t=19, s=23)
  padding = ref.key_padding(2, 23, invalid=0)
  segments = (jnp.asarray(np.arange(19)[None].repeat(2, 0) // 10, jnp.int32),
              jnp.asarray(np.arange(23)[None].repeat(2, 0) // 12, jnp.int32))
  full = ref.full_mask(2, 4, 19, 23, mask=padding, segment_ids=segments)
  bias = ref.normal(8, (1, 4, 19, 23))
  op = lambda q, k, v, bias: ops.get("sage_int8")(
      q, k, v, bias=bias, mask=jnp.asarray(padding), segment_ids=segments, block_q=8,
      block_k=8)
  out, grads = ref.out_and_grads(op, (q, k, v, bias))
  with ref.x64():
    want, want_grads = ref.out_and_grads(
        lambda q, k, v, bias: ref.softmax_attention(q, k, v, bias=bias, mask=full),
        ref.f64(q, k, v, bias))
  assert np.all(np.asarray(out)[0] == 0.0)  # batch 0 has no keys: zeros, no NaN
  np.testing.assert_allclose(out, want, rtol=3e-2, atol=3e-2)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, **F32_TOL)


OP_ARGS = dict(block_q=8, block_k=4)


def test_sage_int8_causal_ignores_future_keys():
  q, k, v = _qkv(t=17)
  op = jax.jit(functools.partial(ops.get("sage_int8"), is_causal=True, **OP_ARGS))
  op_checks.assert_causal_ignores_future_keys(op, q, k, v, cut=9)


def test_sage_int8_bfloat16_close_to_float32():
  op = functools.partial(ops.get("sage_int8"), **OP_ARGS)
  op_checks.assert_bfloat16_close_to_float32(op, *_qkv())


@pytest.mark.parametrize("name,op_args,param_shapes", [
    ("sage_int8", dict(block_q=4, block_k=4), None)])
def test_layer_runs(name, op_args, param_shapes):
  op_checks.assert_layer_runs(name, op_args, param_shapes)


@pytest.mark.parametrize("name,kwargs,match", [
    ("sage_int8", dict(block_q=0), "block_q"),
    ("sage_int8", dict(block_k=2.5), "block_k"),
    ("sage_int8", dict(pv_dtype=jnp.int8), "pv_dtype"),
    ("sage_int8", dict(pv_dtype="half-ish"), "pv_dtype")])
def test_bad_arguments(name, kwargs, match):
  q, k, v = _qkv(t=8)
  args = {**OP_ARGS, **kwargs}
  with pytest.raises(ValueError, match=match):
    ops.get(name)(q, k, v, **args)
