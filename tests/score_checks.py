"""The harness that the tests of `sigmoid` and of the `scoring` ops share.

Float64 references written from the papers' formulas (they repeat K/V heads explicitly, build
masks with `tests.reference.full_mask` and never call `big_attn`), the inputs and masking
scenarios, and the checks every op of the family runs: forward and gradients against the
reference, causality, fully masked rows, bfloat16.
"""
import jax
import jax.numpy as jnp
import numpy as np

from big_attn import ops
from tests import reference
from tests.reference import f64, full_mask, repeat_kv, x64

B, T, S, N, D = 2, 7, 11, 4, 8
CASES = [(2, "none"), (1, "mask"), (2, "causal"), (1, "segments_window")]


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


def ref_sigmoid(q, k, v, m, *, scale=None, bias=None, logit_bias=None, soft_cap=None):
  b = -np.log(k.shape[1]) if logit_bias is None else logit_bias
  s = _ref_scores(q, k, scale, bias, soft_cap)
  w = jnp.where(m, 1.0 / (1.0 + jnp.exp(-(s + b))), 0.0)
  return _ref_apply(w, v, q.shape[2])


def ref_clipped(q, k, v, m, *, scale=None, bias=None, zeta=1.0, gamma=None):
  gamma = -0.5 / k.shape[1] if gamma is None else gamma  # the documented default α = 1/2
  p = reference.masked_softmax(_ref_scores(q, k, scale, bias), m)
  w = jnp.where(m, jnp.minimum(jnp.maximum((zeta - gamma) * p + gamma, 0.0), 1.0), 0.0)
  return _ref_apply(w, v, q.shape[2])


def ref_gated(q, k, v, m, *, gate_logits, scale=None, bias=None):
  out = reference.softmax_attention(q, k, v, bias=bias, mask=m, scale=scale)
  return out / (1.0 + jnp.exp(-gate_logits))[..., None]


def ref_cog(q, k, v, m, *, scale=None):
  s = _ref_scores(q, k, scale)
  w = jnp.sign(s) * reference.masked_softmax(jnp.abs(s), m)
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


def inputs(seed, *, t=T, s=S, kv_heads=2, dtype=np.float32):
  rng = np.random.RandomState(seed)
  q = rng.randn(B, t, N, D).astype(dtype)
  k = rng.randn(B, s, kv_heads, D).astype(dtype)
  v = rng.randn(B, s, kv_heads, D).astype(dtype)
  return q, k, v


def random_gate(seed, t=T):
  return np.random.RandomState(seed + 100).randn(B, t, N).astype(np.float32)


def mask_scenario(name, t, s, seed=0):
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


def assert_close(actual, expected, tol, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  atol = tol * max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=atol, err_msg=what)


def check_against_reference(name, q, k, v, op_kwargs, ref_kwargs, m, arrays=(), tol=2e-4):
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

  assert_close(out, ref_out, tol, f"{name} forward")
  for label, g, rg in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
    assert_close(g, rg, tol, f"{name} {label}")
  for a in arrays:
    assert_close(grads[3][a], ref_grads[3][a], tol, f"{name} d{a}")
  return out, grads


def default_kwargs(name, t):
  """Array mechanism args an op needs (gate logits, per-head gain/shift)."""
  if name == "gated_attention":
    g = random_gate(0, t)
    return {"gate_logits": jnp.asarray(g)}, {"gate_logits": g}, ("gate_logits",)
  if name == "normalized":
    gain = np.array([1.0, 0.5, 2.0, -1.0], np.float32)
    shift = np.array([0.0, 0.1, -0.2, 0.3], np.float32)
    return ({"gain": jnp.asarray(gain), "shift": jnp.asarray(shift)},
            {"gain": gain, "shift": shift}, ("gain", "shift"))
  return {}, {}, ()


def assert_matches_reference(name, kv_heads, scenario):
  """Forward and gradients against the reference under one of `CASES`."""
  t = S if scenario == "causal" else T
  q, k, v = inputs(1, t=t, kv_heads=kv_heads)
  mask_kwargs, m = mask_scenario(scenario, t, S)
  op_kwargs, ref_kwargs, arrays = default_kwargs(name, t)
  op_kwargs.update(mask_kwargs)
  out, _ = check_against_reference(name, q, k, v, op_kwargs, ref_kwargs, m, arrays)
  if scenario == "mask":
    assert np.all(np.asarray(out)[0, 3, 1] == 0.0)


def assert_causal_past_ignores_future(name):
  """Changing the keys and values from token 6 on leaves the causal outputs before it."""
  q, k, v = (jnp.asarray(x) for x in inputs(10, t=S, kv_heads=2))
  kwargs, _, _ = default_kwargs(name, S)
  op = ops.get(name)
  out = op(q, k, v, is_causal=True, **kwargs)
  k2 = k.at[:, 6:].set(k[:, 6:] * -3.0 + 1.0)
  v2 = v.at[:, 6:].set(v[:, 6:] + 5.0)
  out2 = op(q, k2, v2, is_causal=True, **kwargs)
  np.testing.assert_allclose(np.asarray(out)[:, :6], np.asarray(out2)[:, :6], rtol=0, atol=1e-6)
  assert not np.allclose(np.asarray(out)[:, 6:], np.asarray(out2)[:, 6:])


def assert_fully_masked_rows_give_zeros_and_finite_grads(name):
  """Fully masked rows give zeros, with finite gradients (zero for an empty example)."""
  q, k, v = (jnp.asarray(x) for x in inputs(11, kv_heads=1))
  m = np.ones((B, 1, T, S), bool)
  m[:, :, 2] = False  # row 2 masked in every batch and head
  m[1] = False  # every row of batch 1
  kwargs, _, _ = default_kwargs(name, T)
  op = ops.get(name)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v, mask=jnp.asarray(m), **kwargs) ** 2)

  out = np.asarray(op(q, k, v, mask=jnp.asarray(m), **kwargs))
  assert np.all(out[:, 2] == 0.0) and np.all(out[1] == 0.0)
  assert np.abs(out[0, 3]).sum() > 0
  for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(jax.grad(loss)(q, k, v))[1] == 0.0)


def assert_bfloat16_matches_reference(name):
  """bfloat16 inputs against the reference on the bf16-rounded inputs."""
  q, k, v = inputs(12, kv_heads=2)
  mask_kwargs, m = mask_scenario("mask", T, S)
  op_kwargs, ref_kwargs, _ = default_kwargs(name, T)
  def bf(x):
    return jnp.asarray(x, jnp.bfloat16)

  out = ops.get(name)(bf(q), bf(k), bf(v), **op_kwargs, **mask_kwargs)
  assert out.dtype == jnp.bfloat16
  # Reference on the bf16-rounded inputs, in float64.
  rounded = [np.asarray(bf(x), np.float32) for x in (q, k, v)]
  with x64():
    expected = np.asarray(REFS[name](*f64(*rounded), m,
                                     **{a: f64(x) for a, x in ref_kwargs.items()}))
  assert_close(np.asarray(out, np.float32), expected, 3e-2, f"{name} bf16")
