"""Sigmoid, clipped-softmax, gated, Cog and normalized attention vs float64 references.

The references below are written from the papers' formulas: they repeat K/V heads explicitly,
build masks with `tests.reference.full_mask` and evaluate in float64.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference
from tests.reference import f64, full_mask, repeat_kv, x64

B, T, S, N, D = 2, 7, 11, 4, 8
OPS = ("sigmoid", "clipped_softmax", "gated_attention", "cog", "normalized")


# ----------------------------------------------------------------------------- references

def _ref_scores(q, k, scale, bias=None, soft_cap=None):
  """scale·QKᵀ in float64 `[b, n, t, s]` with K repeated per query head."""
  k = repeat_kv(k, q.shape[2])
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * (1.0 / np.sqrt(q.shape[-1]) if scale is None
                                             else scale)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  return s if bias is None else s + bias


def _ref_apply(w, v, n):
  return jnp.einsum("bnts,bsnd->btnd", w, repeat_kv(v, n))


def _ref_masked_softmax(x, m):
  x = jnp.where(m, x, -1e300)
  e = jnp.where(m, jnp.exp(x - x.max(-1, keepdims=True)), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)


def ref_sigmoid(q, k, v, m, *, scale=None, bias=None, logit_bias=None, soft_cap=None):
  b = -np.log(k.shape[1]) if logit_bias is None else logit_bias
  s = _ref_scores(q, k, scale, bias, soft_cap)
  w = jnp.where(m, 1.0 / (1.0 + jnp.exp(-(s + b))), 0.0)
  return _ref_apply(w, v, q.shape[2])


def ref_clipped(q, k, v, m, *, scale=None, bias=None, zeta=1.0, gamma=None):
  gamma = -0.5 / k.shape[1] if gamma is None else gamma  # the documented default α = 1/2
  p = _ref_masked_softmax(_ref_scores(q, k, scale, bias), m)
  w = jnp.where(m, jnp.minimum(jnp.maximum((zeta - gamma) * p + gamma, 0.0), 1.0), 0.0)
  return _ref_apply(w, v, q.shape[2])


def ref_gated(q, k, v, m, *, gate_logits, scale=None, bias=None):
  out = reference.softmax_attention(q, k, v, bias=bias, mask=m, scale=scale)
  return out / (1.0 + jnp.exp(-gate_logits))[..., None]


def ref_cog(q, k, v, m, *, scale=None):
  s = _ref_scores(q, k, scale)
  w = jnp.sign(s) * _ref_masked_softmax(jnp.abs(s), m)
  return _ref_apply(w, v, q.shape[2])


def ref_normalized(q, k, v, m, *, scale=None, gain=1.0, shift=0.0, normalization="standardize",
                   epsilon=1e-3):
  s = _ref_scores(q, k, scale)
  mf = m.astype(np.float64)
  n = np.maximum(mf.sum(-1, keepdims=True), 1.0)
  gain = jnp.reshape(gain, (1, -1, 1, 1)) if np.ndim(gain) else gain
  shift = jnp.reshape(shift, (1, -1, 1, 1)) if np.ndim(shift) else shift
  if normalization == "scale":
    normed = s / np.sqrt(n)
  else:
    mu = (s * mf).sum(-1, keepdims=True) / n
    var = (((s - mu) * mf) ** 2).sum(-1, keepdims=True) / n
    sigma = jnp.sqrt(jnp.where(var > 0, var, 1.0)) * (var > 0)  # finite grads at var == 0
    normed = (s - mu) / (sigma + epsilon)
  w = (gain * normed + shift) * mf
  return _ref_apply(w, v, q.shape[2])


REFS = {"sigmoid": ref_sigmoid, "clipped_softmax": ref_clipped, "gated_attention": ref_gated,
        "cog": ref_cog, "normalized": ref_normalized}


# ----------------------------------------------------------------------------- helpers

def _inputs(seed, *, t=T, s=S, kv_heads=2, dtype=np.float32):
  rng = np.random.RandomState(seed)
  q = rng.randn(B, t, N, D).astype(dtype)
  k = rng.randn(B, s, kv_heads, D).astype(dtype)
  v = rng.randn(B, s, kv_heads, D).astype(dtype)
  return q, k, v


def _gate(seed, t=T):
  return np.random.RandomState(seed + 100).randn(B, t, N).astype(np.float32)


def _scenario(name, t, s, seed=0):
  """(op masking kwargs, dense reference mask `[B, N, t, s]`)."""
  rng = np.random.RandomState(seed + 7)
  if name == "none":
    return {}, full_mask(B, N, t, s)
  if name == "mask":  # random per-head mask with a fully masked row in batch 0 / head 1
    m = rng.rand(B, N, t, s) > 0.3
    m[0, 1, 3] = False
    return {"mask": jnp.asarray(m)}, full_mask(B, N, t, s, mask=m)
  if name == "causal":
    m = rng.rand(B, 1, t, s) > 0.2
    m[1, 0, 2] = False
    return ({"mask": jnp.asarray(m), "is_causal": True},
            full_mask(B, N, t, s, mask=m, is_causal=True))
  if name == "segments_window":
    qs = np.sort(rng.randint(0, 2, (B, t)), axis=1).astype(np.int32)
    ks = np.sort(rng.randint(0, 2, (B, s)), axis=1).astype(np.int32)
    seg = (jnp.asarray(qs), jnp.asarray(ks))
    return ({"segment_ids": seg, "local_window_size": (3, 2)},
            full_mask(B, N, t, s, segment_ids=(qs, ks), window=(3, 2)))
  raise ValueError(name)


def _assert_close(actual, expected, tol, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  atol = tol * max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=atol, err_msg=what)


def _check_against_reference(name, q, k, v, op_kwargs, ref_kwargs, m, arrays=(), tol=2e-4):
  """Forward and grads wrt q, k, v and the named array kwargs, op (f32) vs reference (f64)."""
  op, ref = ops.get(name), REFS[name]
  ct = np.random.RandomState(3).randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
  extra = {a: op_kwargs[a] for a in arrays}

  def op_loss(q, k, v, extra):
    out = op(q, k, v, **{**op_kwargs, **extra})
    return jnp.sum(out * ct.astype(np.float32)), out

  (_, out), grads = jax.value_and_grad(op_loss, argnums=(0, 1, 2, 3), has_aux=True)(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), extra)
  assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)

  with x64():
    def ref_loss(q, k, v, extra):
      out = ref(q, k, v, m, **{**ref_kwargs, **extra})
      return jnp.sum(out * ct), out

    (_, ref_out), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3), has_aux=True)(
        *f64(q, k, v), {a: f64(x) for a, x in extra.items()})
    ref_out = np.asarray(ref_out)
    ref_grads = jax.tree.map(np.asarray, ref_grads)

  _assert_close(out, ref_out, tol, f"{name} forward")
  for label, g, rg in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
    _assert_close(g, rg, tol, f"{name} {label}")
  for a in arrays:
    _assert_close(grads[3][a], ref_grads[3][a], tol, f"{name} d{a}")
  return out, grads


def _default_kwargs(name, t):
  """Array mechanism args an op needs (gate logits, per-head gain/shift)."""
  if name == "gated_attention":
    g = _gate(0, t)
    return {"gate_logits": jnp.asarray(g)}, {"gate_logits": g}, ("gate_logits",)
  if name == "normalized":
    gain = np.array([1.0, 0.5, 2.0, -1.0], np.float32)
    shift = np.array([0.0, 0.1, -0.2, 0.3], np.float32)
    return ({"gain": jnp.asarray(gain), "shift": jnp.asarray(shift)},
            {"gain": gain, "shift": shift}, ("gain", "shift"))
  return {}, {}, ()


# ----------------------------------------------------------------------------- tests

CASES = [(2, "none"), (1, "mask"), (2, "causal"), (1, "segments_window")]


@pytest.mark.parametrize("kv_heads,scenario", CASES)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference(name, kv_heads, scenario):
  t = S if scenario == "causal" else T
  q, k, v = _inputs(1, t=t, kv_heads=kv_heads)
  mask_kwargs, m = _scenario(scenario, t, S)
  op_kwargs, ref_kwargs, arrays = _default_kwargs(name, t)
  op_kwargs.update(mask_kwargs)
  out, _ = _check_against_reference(name, q, k, v, op_kwargs, ref_kwargs, m, arrays)
  if scenario == "mask":
    assert np.all(np.asarray(out)[0, 3, 1] == 0.0)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sigmoid_bias_soft_cap_and_logit_bias(kv_heads):
  q, k, v = _inputs(2, kv_heads=kv_heads)
  bias = np.random.RandomState(5).randn(1, N, T, S).astype(np.float32)
  logit_bias = np.float32(-1.5)
  op_kwargs = {"bias": jnp.asarray(bias), "logit_bias": jnp.asarray(logit_bias),
               "logits_soft_cap": 2.0, "scale": 0.5, "local_window_size": 4}
  ref_kwargs = {"soft_cap": 2.0, "scale": 0.5}
  m = full_mask(B, N, T, S, window=4)
  _check_against_reference("sigmoid", q, k, v, op_kwargs, ref_kwargs, m,
                           arrays=("bias", "logit_bias"))


def test_sigmoid_default_bias_is_minus_log_kv_len():
  q, k, v = (jnp.asarray(x) for x in _inputs(3))
  np.testing.assert_allclose(ops.get("sigmoid")(q, k, v),
                             ops.get("sigmoid")(q, k, v, logit_bias=-np.log(S)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("zeta,gamma", [(1.1, -0.03), (1.0, None)])
def test_clipped_softmax_stretch(zeta, gamma):
  q, k, v = _inputs(4, kv_heads=1)
  bias = np.random.RandomState(6).randn(B, 1, T, S).astype(np.float32)
  mask_kwargs, m = _scenario("mask", T, S)
  op_kwargs = {"zeta": zeta, "gamma": gamma, "bias": jnp.asarray(bias), **mask_kwargs}
  ref_kwargs = {"zeta": zeta, "gamma": gamma}
  _check_against_reference("clipped_softmax", q, k, v, op_kwargs, ref_kwargs, m,
                           arrays=("bias",))


def test_clipped_softmax_alpha_rule_and_softmax_limit():
  q, k, v = (jnp.asarray(x) for x in _inputs(5))
  op = ops.get("clipped_softmax")
  np.testing.assert_allclose(op(q, k, v, alpha=2.0), op(q, k, v, gamma=-2.0 / S), atol=1e-6)
  # zeta = 1, gamma = 0 is plain softmax attention.
  np.testing.assert_allclose(op(q, k, v, gamma=0.0), ops.dot_product_attention(q, k, v),
                             atol=1e-5)


def test_gated_attention_bias_and_layout():
  q, k, v = _inputs(6, kv_heads=2)
  bias = np.random.RandomState(7).randn(B, N, T, S).astype(np.float32)
  g = _gate(1)
  op_kwargs = {"gate_logits": jnp.asarray(g), "bias": jnp.asarray(bias), "scale": 0.3}
  ref_kwargs = {"gate_logits": g, "scale": 0.3}
  _check_against_reference("gated_attention", q, k, v, op_kwargs, ref_kwargs,
                           full_mask(B, N, T, S), arrays=("gate_logits", "bias"))


@pytest.mark.parametrize("normalization", ["standardize", "scale"])
def test_normalized_options(normalization):
  q, k, v = _inputs(8, t=S, kv_heads=1)
  mask_kwargs, m = _scenario("causal", S, S)
  op_kwargs = {"normalization": normalization, "epsilon": 1e-2, "gain": jnp.float32(1.5),
               "shift": jnp.float32(0.25), **mask_kwargs}
  ref_kwargs = {"normalization": normalization, "epsilon": 1e-2}
  _check_against_reference("normalized", q, k, v, op_kwargs, ref_kwargs, m,
                           arrays=("gain", "shift"))


def test_cog_has_negative_weights():
  # With V = identity over keys the output rows are the weights themselves.
  q, k, _ = _inputs(9, kv_heads=1)
  v = np.broadcast_to(np.eye(S, dtype=np.float32)[None, :, None, :], (B, S, 1, S))
  w = np.asarray(ops.get("cog")(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  assert (w < 0).any() and (w > 0).any()
  np.testing.assert_allclose(np.abs(w).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", OPS)
def test_causal_past_ignores_future(name):
  q, k, v = (jnp.asarray(x) for x in _inputs(10, t=S, kv_heads=2))
  kwargs, _, _ = _default_kwargs(name, S)
  op = ops.get(name)
  out = op(q, k, v, is_causal=True, **kwargs)
  k2 = k.at[:, 6:].set(k[:, 6:] * -3.0 + 1.0)
  v2 = v.at[:, 6:].set(v[:, 6:] + 5.0)
  out2 = op(q, k2, v2, is_causal=True, **kwargs)
  np.testing.assert_allclose(np.asarray(out)[:, :6], np.asarray(out2)[:, :6], rtol=0, atol=1e-6)
  assert not np.allclose(np.asarray(out)[:, 6:], np.asarray(out2)[:, 6:])


@pytest.mark.parametrize("name", OPS)
def test_fully_masked_rows_give_zeros_and_finite_grads(name):
  q, k, v = (jnp.asarray(x) for x in _inputs(11, kv_heads=1))
  m = np.ones((B, 1, T, S), bool)
  m[:, :, 2] = False  # row 2 masked in every batch and head
  m[1] = False  # every row of batch 1
  kwargs, _, _ = _default_kwargs(name, T)
  op = ops.get(name)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v, mask=jnp.asarray(m), **kwargs) ** 2)

  out = np.asarray(op(q, k, v, mask=jnp.asarray(m), **kwargs))
  assert np.all(out[:, 2] == 0.0) and np.all(out[1] == 0.0)
  assert np.abs(out[0, 3]).sum() > 0
  for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(jax.grad(loss)(q, k, v))[1] == 0.0)


@pytest.mark.parametrize("name", OPS)
def test_bfloat16(name):
  q, k, v = _inputs(12, kv_heads=2)
  mask_kwargs, m = _scenario("mask", T, S)
  op_kwargs, ref_kwargs, _ = _default_kwargs(name, T)
  def bf(x):
    return jnp.asarray(x, jnp.bfloat16)

  out = ops.get(name)(bf(q), bf(k), bf(v), **op_kwargs, **mask_kwargs)
  assert out.dtype == jnp.bfloat16
  # Reference on the bf16-rounded inputs, in float64.
  rounded = [np.asarray(bf(x), np.float32) for x in (q, k, v)]
  with x64():
    expected = np.asarray(REFS[name](*f64(*rounded), m,
                                     **{a: f64(x) for a, x in ref_kwargs.items()}))
  _assert_close(np.asarray(out, np.float32), expected, 3e-2, f"{name} bf16")


# ----------------------------------------------------------------------------- layer

def test_layer_gated_attention_params_and_gate():
  x = jnp.asarray(np.random.RandomState(13).randn(B, T, 16).astype(np.float32))
  attn = layers.Attention(num_heads=4, op="gated_attention")
  variables = attn.init(jax.random.key(0), x)
  gate = variables["params"]["op_params"]
  assert gate["gate_kernel"].value.shape == (4, 4)
  np.testing.assert_allclose(jax.nn.sigmoid(gate["gate_bias"].value), 0.25, rtol=1e-6)
  out = attn.apply(variables, x, is_causal=True)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  # A closed gate zeroes the layer; a fully open one gives the softmax layer's output.
  def with_gate(bias_value):
    params = dict(variables["params"])
    params["op_params"] = {
        "gate_kernel": gate["gate_kernel"].replace_boxed(jnp.zeros((4, 4))),
        "gate_bias": gate["gate_bias"].replace_boxed(jnp.full((4,), bias_value))}
    return {"params": params}

  np.testing.assert_allclose(np.asarray(attn.apply(with_gate(-1e4), x)), 0.0, atol=1e-6)
  softmax_params = {n: p for n, p in variables["params"].items() if n != "op_params"}
  np.testing.assert_allclose(
      np.asarray(attn.apply(with_gate(1e4), x)),
      np.asarray(layers.Attention(num_heads=4).apply({"params": softmax_params}, x)),
      rtol=1e-5, atol=1e-6)


def test_layer_sigmoid_and_normalized():
  x = jnp.asarray(np.random.RandomState(14).randn(B, T, 16).astype(np.float32))
  for op, n_op_params in (("sigmoid", 0), ("normalized", 2), ("cog", 0),
                          ("clipped_softmax", 0)):
    attn = layers.Attention(num_heads=4, num_kv_heads=2, op=op)
    variables = attn.init(jax.random.key(1), x)
    assert len(variables["params"].get("op_params", {})) == n_op_params, op
    out = attn.apply(variables, x, is_causal=True)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out))), op


def test_gated_params_need_divisible_features():
  x = jnp.ones((B, T, 10))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    layers.Attention(num_heads=4, head_dim=4, op="gated_attention").init(jax.random.key(0), x)
  assert ops.params_module("gated_attention") is ops.scoring.GatedAttentionParams


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise():
  q, k, v = (jnp.asarray(x) for x in _inputs(15))
  with pytest.raises(ValueError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v, gate_logits=jnp.zeros((B, T, N - 1)))
  with pytest.raises(ValueError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v)
  with pytest.raises(TypeError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v, gate_logits=jnp.zeros((B, T, N), jnp.int32))
  with pytest.raises(ValueError, match="gamma"):
    ops.get("clipped_softmax")(q, k, v, gamma=0.1)
  with pytest.raises(ValueError, match="zeta"):
    ops.get("clipped_softmax")(q, k, v, zeta=0.5)
  with pytest.raises(ValueError, match="not both"):
    ops.get("clipped_softmax")(q, k, v, gamma=-0.1, alpha=2.0)
  with pytest.raises(ValueError, match="normalization"):
    ops.get("normalized")(q, k, v, normalization="softmax")
  with pytest.raises(ValueError, match="gain"):
    ops.get("normalized")(q, k, v, gain=jnp.ones((3,)))
  with pytest.raises(ValueError, match="logit_bias"):
    ops.get("sigmoid")(q, k, v, logit_bias=jnp.zeros((N,)))
  with pytest.raises(ValueError, match="logits_soft_cap"):
    ops.get("sigmoid")(q, k, v, logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match="bias"):
    ops.get("sigmoid")(q, k, v, bias=jnp.zeros((B, N, T, S + 1)))
  with pytest.raises(ValueError, match="query heads"):
    ops.get("cog")(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(TypeError, match="mask"):
    ops.get("normalized")(q, k, v, mask=jnp.ones((B, N, T, S), jnp.float32))


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
