"""`gpsa`, `levit_bias`, `decomposed_relpos`, `kernelized_rpe`, `switchhead` and `bottleneck`
against float64 references.

The references are written from the papers' formulas on explicit `[q, kv]` matrices: offsets on
the grid come from loops over token positions, the RPE Toeplitz sum is the quadratic form,
SwitchHead loops over heads and experts, the bottleneck runs its three attentions one by one.
They never call `big_attn`.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (3, 5)


def _qkv(b=2, t=15, s=None, n=4, k=2, d=8, dv=None, dtype=jnp.float32, seed=0):
  s = t if s is None else s
  dv = d if dv is None else dv
  return (ref.normal(seed, (b, t, n, d), dtype), ref.normal(seed + 1, (b, s, k, d), dtype),
          ref.normal(seed + 2, (b, s, k, dv), dtype))


def _key_padding(b, t, seed=5, empty_batch=None):
  valid = np.random.default_rng(seed).random((b, t)) > 0.3
  valid[:, 0] = True
  if empty_batch is not None:
    valid[empty_batch] = False
  return valid[:, None, None, :]


def _positions(grid):
  """`[t, 2]` (y, x) of every token, by a loop over the row-major grid."""
  h, w = grid
  return np.array([(y, x) for y in range(h) for x in range(w)])


def _probs(logits, mask):
  """softmax over the last axis in float64 with a boolean mask; empty rows give zeros."""
  logits = jnp.where(mask, logits, -1e300)
  e = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)


def _content_logits(q, k, scale=None):
  q, k = ref.f64(q, k)
  k = ref.repeat_kv(k, q.shape[2])
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  return jnp.einsum("btnd,bsnd->bnts", q, k) * scale


# ----------------------------------------------------------------------------------------------
# GPSA (ConViT).
# ----------------------------------------------------------------------------------------------
def _gpsa_ref(q, k, v, pos_proj, gating, grid, mask):
  pos = _positions(grid)
  t = len(pos)
  rel = np.zeros((t, t, 3))
  for i in range(t):
    for j in range(t):
      dy, dx = pos[j] - pos[i]
      rel[i, j] = (dx, dy, dx * dx + dy * dy)
  content = _probs(_content_logits(q, k), mask)
  positional = _probs(jnp.einsum("tsc,nc->nts", rel, ref.f64(pos_proj))[None], mask)
  gate = jax.nn.sigmoid(ref.f64(gating))[None, :, None, None]
  attn = (1 - gate) * content + gate * positional
  return jnp.einsum("bnts,bsnd->btnd", attn, ref.repeat_kv(ref.f64(v), q.shape[2]))


@pytest.mark.parametrize("kv_heads,causal,masked", [(1, True, False), (4, False, True)])
def test_gpsa_matches_reference(kv_heads, causal, masked):
  q, k, v = _qkv(k=kv_heads, dv=6)
  pos_proj = ref.normal(3, (4, 3), std=0.5)
  gating = ref.normal(4, (4,))
  mask = _key_padding(2, 15, empty_batch=1) if masked else None
  full = ref.full_mask(2, 4, 15, 15, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("gpsa"), grid=GRID, mask=mask, is_causal=causal)
  out = ref.assert_matches(lambda q, k, v, p, g: op(q, k, v, pos_proj=p, gating=g),
                           lambda q, k, v, p, g: _gpsa_ref(q, k, v, p, g, GRID, full),
                           (q, k, v, pos_proj, gating))
  if masked:
    assert np.all(out[1] == 0.0)


def test_gpsa_gate_limits():
  """σ(λ) → 0 is plain softmax attention; σ(λ) → 1 ignores the content (queries and keys)."""
  q, k, v = _qkv()
  pos_proj = ref.normal(3, (4, 3))
  op = jax.jit(functools.partial(ops.get("gpsa"), grid=GRID, pos_proj=pos_proj))
  content = op(q, k, v, gating=jnp.full((4,), -40.0))
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v))
  np.testing.assert_allclose(content, want, **F32_TOL)
  positional = op(q, k, v, gating=jnp.full((4,), 40.0))
  np.testing.assert_allclose(positional, op(q * 3.0, -k, v, gating=jnp.full((4,), 40.0)),
                             **F32_TOL)


# ----------------------------------------------------------------------------------------------
# LeViT attention bias and MViTv2 decomposed relative positions.
# ----------------------------------------------------------------------------------------------
def _levit_ref(q, k, v, table, grid, mask):
  pos = _positions(grid)
  dy = np.abs(pos[:, None, 0] - pos[None, :, 0])
  dx = np.abs(pos[:, None, 1] - pos[None, :, 1])
  return _probs_out(_content_logits(q, k) + ref.f64(table)[:, dy, dx][None], mask, v, q.shape[2])


def _probs_out(logits, mask, v, n):
  return jnp.einsum("bnts,bsnd->btnd", _probs(logits, mask),
                    ref.repeat_kv(ref.f64(v), n))


@pytest.mark.parametrize("kv_heads,causal", [(2, False), (4, True)])
def test_levit_bias_matches_reference(kv_heads, causal):
  q, k, v = _qkv(k=kv_heads)
  table = ref.normal(3, (4,) + GRID)
  mask = _key_padding(2, 15)
  full = ref.full_mask(2, 4, 15, 15, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("levit_bias"), grid=GRID, mask=mask, is_causal=causal)
  ref.assert_matches(lambda q, k, v, tb: op(q, k, v, attention_bias=tb),
                     lambda q, k, v, tb: _levit_ref(q, k, v, tb, GRID, full), (q, k, v, table))


def _relpos_ref(q, k, v, rel_h, rel_w, grid, mask):
  h, w = grid
  pos = _positions(grid)
  t = len(pos)
  idx_h, idx_w = np.zeros((t, t), int), np.zeros((t, t), int)
  for i in range(t):
    for j in range(t):
      idx_h[i, j] = pos[i][0] - pos[j][0] + h - 1
      idx_w[i, j] = pos[i][1] - pos[j][1] + w - 1
  r = rel_h[idx_h] + rel_w[idx_w]  # [t, s, d]
  bias = jnp.einsum("btnd,tsd->bnts", ref.f64(q), r)
  return _probs_out(_content_logits(q, k) + bias, mask, v, q.shape[2])


@pytest.mark.parametrize("kv_heads,causal", [(2, False), (1, True)])
def test_decomposed_relpos_matches_reference(kv_heads, causal):
  q, k, v = _qkv(k=kv_heads, dv=5)
  rel_h = ref.normal(3, (2 * GRID[0] - 1, 8), std=0.5)
  rel_w = ref.normal(4, (2 * GRID[1] - 1, 8), std=0.5)
  full = ref.full_mask(2, 4, 15, 15, is_causal=causal)
  op = functools.partial(ops.get("decomposed_relpos"), grid=GRID, is_causal=causal)
  ref.assert_matches(lambda q, k, v, a, c: op(q, k, v, rel_h=a, rel_w=c),
                     lambda q, k, v, a, c: _relpos_ref(q, k, v, ref.f64(a), ref.f64(c), GRID,
                                                       full),
                     (q, k, v, rel_h, rel_w))


# ----------------------------------------------------------------------------------------------
# Kernelized attention with RPE: FFT form vs the explicit quadratic form.
# ----------------------------------------------------------------------------------------------
def _krpe_ref(q, k, v, b, w, mask, scale=None):
  """Σ_j e^{b_{i−j}} φ(q_i)·φ(k_j) v_j / Σ_j (same), φ(x) = exp(Wx' − |x'|²/2)/√m."""
  q, k, v, b, w = ref.f64(q, k, v, b, w)
  n, t = q.shape[2], q.shape[1]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  root = (1.0 / np.sqrt(q.shape[-1]) if scale is None else scale) ** 0.5
  phi = lambda x: jnp.exp((x * root) @ w.T - 0.5 * jnp.sum((x * root) ** 2, -1, keepdims=True)
                          ) / np.sqrt(w.shape[0])
  kernel = jnp.einsum("btnm,bsnm->bnts", phi(q), phi(k))
  offset = np.arange(t)[:, None] - np.arange(t)[None, :] + t - 1
  weights = jnp.where(mask, kernel * jnp.exp(b[:, offset])[None], 0.0)
  den = weights.sum(-1, keepdims=True)
  return jnp.einsum("bnts,bsnd->btnd", weights / jnp.where(den > 0, den, 1.0), v)


@pytest.mark.parametrize("t,kv_heads,causal,masked", [(13, 2, False, False), (13, 4, True, True),
                                                      (8, 1, True, False)])
def test_kernelized_rpe_fft_matches_quadratic(t, kv_heads, causal, masked):
  q, k, v = _qkv(t=t, k=kv_heads, dv=6)
  q, k = q * 0.5, k * 0.5
  b = ref.normal(3, (4, 2 * t - 1))
  w = ops.linear.orthogonal_random_features(0, 16, 8)
  mask = _key_padding(2, t, empty_batch=1) if masked else None
  full = ref.full_mask(2, 4, t, t, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("kernelized_rpe"), mask=mask, is_causal=causal)
  out = ref.assert_matches(lambda q, k, v, b, w: op(q, k, v, rpe_bias=b, features=w),
                           lambda q, k, v, b, w: _krpe_ref(q, k, v, b, w, full),
                           (q, k, v, b, w))
  if masked:
    assert np.all(out[1] == 0.0)


def test_kernelized_rpe_causal_ignores_future():
  q, k, v = _qkv(t=11)
  b = ref.normal(3, (4, 21))
  op = jax.jit(functools.partial(ops.get("kernelized_rpe"), rpe_bias=b, feature_key=1,
                                 num_features=8, is_causal=True))
  out = op(q, k, v)
  changed = op(q, k.at[:, 6:].set(5.0), v.at[:, 6:].set(-3.0))
  np.testing.assert_allclose(out[:, :6], changed[:, :6], **F32_TOL)
  assert not np.allclose(out[:, 6:], changed[:, 6:], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Shared: bad arguments, bf16, the layer.
# ----------------------------------------------------------------------------------------------
def _positional_args(t=15, n=4, d=8):
  return {
      "gpsa": dict(grid=GRID, pos_proj=jnp.zeros((n, 3)), gating=jnp.zeros((n,))),
      "levit_bias": dict(grid=GRID, attention_bias=jnp.zeros((n,) + GRID)),
      "decomposed_relpos": dict(grid=GRID, rel_h=jnp.zeros((5, d)), rel_w=jnp.zeros((9, d))),
      "kernelized_rpe": dict(rpe_bias=jnp.zeros((n, 2 * t - 1)), feature_key=0, num_features=8),
  }


@pytest.mark.parametrize("name,bad,match", [
    ("gpsa", dict(grid=(5, 5)), "grid"),
    ("gpsa", dict(grid=None), "grid"),
    ("gpsa", dict(pos_proj=jnp.zeros((4, 2))), "pos_proj"),
    ("gpsa", dict(gating=None), "gating"),
    ("levit_bias", dict(attention_bias=jnp.zeros((4, 5, 3))), "attention_bias"),
    ("decomposed_relpos", dict(rel_w=jnp.zeros((9, 4))), "rel_w"),
    ("decomposed_relpos", dict(rel_h=None), "rel_h"),
    ("kernelized_rpe", dict(rpe_bias=jnp.zeros((4, 15))), "rpe_bias"),
    ("kernelized_rpe", dict(mask=jnp.ones((1, 1, 15, 15), bool)), "key-padding"),
    ("kernelized_rpe", dict(features=jnp.ones((8, 8))), "features"),
])
def test_positional_bad_args(name, bad, match):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    ops.get(name)(q, k, v, **{**_positional_args()[name], **bad})


@pytest.mark.parametrize("name", ["gpsa", "levit_bias", "decomposed_relpos", "kernelized_rpe"])
def test_positional_bf16(name):
  q, k, v = _qkv(k=2)
  args = _positional_args()[name]
  if name == "kernelized_rpe":
    args = {**args, "num_features": 64}
  op = jax.jit(functools.partial(ops.get(name), **args))
  out = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), op(q, k, v), **BF16_TOL)


@pytest.mark.parametrize("name,op_args", [
    ("gpsa", dict(grid=GRID)), ("levit_bias", dict(grid=GRID)),
    ("decomposed_relpos", dict(grid=GRID)), ("kernelized_rpe", dict(feature_key=0)),
])
def test_positional_layers(name, op_args):
  x = ref.normal(0, (2, 15, 32))
  layer = layers.Attention(num_heads=4, op=name, op_args=op_args)
  params = jax.jit(layer.init)(jax.random.key(0), x)
  out = jax.jit(layer.apply)(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  names = set(params["params"]["op_params"])
  assert names == {"gpsa": {"pos_proj", "gating"}, "levit_bias": {"attention_bias"},
                   "decomposed_relpos": {"rel_h", "rel_w"},
                   "kernelized_rpe": {"rpe_bias"}}[name]


def test_gpsa_local_init_centres_heads_on_offsets():
  """The local init: v_h = (2Δx_h, 2Δy_h, −1), the 4 heads centred on the 4 offsets of a 2×2
  square around 0, and gates λ = 1."""
  params = jax.tree.map(np.asarray, flax.linen.unbox(
      ops.positional.GPSAParams(num_heads=4, num_kv_heads=4, head_dim=8).init(
          jax.random.key(0), None, None, None, None)))["params"]
  np.testing.assert_array_equal(params["gating"], 1.0)
  pos_proj = params["pos_proj"]
  np.testing.assert_array_equal(pos_proj[:, 2], -1.0)
  centres = {tuple(np.asarray(p[:2]) / 2) for p in pos_proj}
  assert centres == {(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)}


# ----------------------------------------------------------------------------------------------
# SwitchHead: an explicit loop over heads, tokens and experts.
# ----------------------------------------------------------------------------------------------
def _switchhead_ref(q, k, value_experts, rv, ro, out_experts, pick_v, pick_o, mask):
  """Per head h and token, the experts `pick_v`/`pick_o` (the top-k by router logit, picked
  in NumPy by the caller), then v = Σ σ·V_e, o = softmax attention, y = Σ σ·o W^O_e."""
  q, k, value_experts, rv, ro, out_experts = ref.f64(q, k, value_experts, rv, ro, out_experts)
  n = q.shape[2]
  kv_heads, num = value_experts.shape[2:4]
  values = []
  for h in range(kv_heads):
    v_h = 0.0
    for e in range(num):
      chosen = (pick_v[:, :, h] == e).any(-1)[..., None]  # [b, s, 1]
      v_h = v_h + jnp.where(chosen, jax.nn.sigmoid(rv[:, :, h, e])[..., None]
                            * value_experts[:, :, h, e], 0.0)
    values.append(v_h)
  v = jnp.stack(values, 2)
  heads = jnp.einsum("bnts,bsnd->btnd", _probs(_content_logits(q, k), mask),
                     ref.repeat_kv(v, n))
  outs = []
  for h in range(n):
    y_h = 0.0
    for e in range(num):
      chosen = (pick_o[:, :, h] == e).any(-1)[..., None]
      y_h = y_h + jnp.where(chosen, jax.nn.sigmoid(ro[:, :, h, e])[..., None]
                            * (heads[:, :, h] @ out_experts[h, e]), 0.0)
    outs.append(y_h)
  return jnp.stack(outs, 2)


def _switchhead_inputs(t=9, s=None, n=4, k=2, num=3, dv=6, dout=5, seed=0):
  s = t if s is None else s
  q, key, _ = _qkv(t=t, s=s, n=n, k=k, seed=seed)
  return (q, key, ref.normal(seed + 3, (2, s, k, num, dv)), ref.normal(seed + 4, (2, s, k, num)),
          ref.normal(seed + 5, (2, t, n, num)), ref.normal(seed + 6, (n, num, dv, dout), std=0.4))


@pytest.mark.parametrize("t,s,kv_heads,topk,causal", [(9, 9, 2, 2, True), (7, 11, 1, 3, False)])
def test_switchhead_matches_expert_loop(t, s, kv_heads, topk, causal):
  arrays = _switchhead_inputs(t=t, s=s, k=kv_heads)
  mask = _key_padding(2, s)
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=causal)
  dense_v = jnp.zeros((2, s, kv_heads, 1))

  def op(q, key, ve, rv, ro, oe):
    return ops.get("switchhead")(q, key, dense_v, mask=mask, is_causal=causal, value_experts=ve,
                                 router_logits_v=rv, router_logits_o=ro, out_experts=oe,
                                 topk=topk)

  pick_v, pick_o = (np.argsort(-np.asarray(r), -1)[..., :topk] for r in arrays[3:5])
  ref.assert_matches(op, lambda *a: _switchhead_ref(*a, pick_v, pick_o, full), arrays)


def test_switchhead_causal_ignores_future_and_bf16():
  q, key, ve, rv, ro, oe = _switchhead_inputs()
  op = jax.jit(functools.partial(ops.get("switchhead"), is_causal=True, out_experts=oe,
                                 num_experts=3))
  dense_v = jnp.zeros((2, 9, 2, 1))
  out = op(q, key, dense_v, value_experts=ve, router_logits_v=rv, router_logits_o=ro)
  changed = op(q, key.at[:, 5:].set(2.0), dense_v, value_experts=ve.at[:, 5:].set(-1.0),
               router_logits_v=rv.at[:, 5:].set(3.0), router_logits_o=ro)
  np.testing.assert_allclose(out[:, :5], changed[:, :5], **F32_TOL)
  assert not np.allclose(out[:, 5:], changed[:, 5:], atol=1e-3)
  bf = lambda x: x.astype(jnp.bfloat16)
  low = op(bf(q), bf(key), bf(dense_v), value_experts=bf(ve), router_logits_v=rv,
           router_logits_o=ro)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), out, rtol=5e-2, atol=1e-1)


@pytest.mark.parametrize("change,match", [
    (dict(value_experts=None), "value_experts"),
    (dict(value_experts=jnp.zeros((2, 9, 1, 3, 6))), "value_experts"),
    (dict(router_logits_v=jnp.zeros((2, 9, 2, 4))), "router_logits_v"),
    (dict(router_logits_o=jnp.zeros((2, 9, 2, 3))), "router_logits_o"),
    (dict(out_experts=jnp.zeros((4, 3, 5, 5))), "out_experts"),
    (dict(topk=4), "topk"),
    (dict(topk=0), "topk"),
    (dict(num_experts=2), "num_experts"),
])
def test_switchhead_bad_args(change, match):
  q, key, ve, rv, ro, oe = _switchhead_inputs()
  args = dict(value_experts=ve, router_logits_v=rv, router_logits_o=ro, out_experts=oe)
  with pytest.raises(ValueError, match=match):
    ops.get("switchhead")(q, key, jnp.zeros((2, 9, 2, 1)), **{**args, **change})


def test_switchhead_layer():
  x = ref.normal(0, (2, 9, 32))
  layer = layers.Attention(num_heads=4, num_kv_heads=2, op="switchhead",
                           op_args=dict(num_experts=3, topk=2))
  params = jax.jit(layer.init)(jax.random.key(0), x)
  apply = lambda p: layer.apply(p, x, is_causal=True)
  out, grads = jax.jit(lambda p: (apply(p), jax.grad(lambda p: jnp.sum(apply(p) ** 2))(p)))(
      params)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  assert set(params["params"]["op_params"]) == {"value_expert_kernel", "router_v", "router_o",
                                                "out_experts"}
  assert np.any(np.asarray(flax.linen.unbox(grads)["params"]["op_params"]["router_o"]) != 0)


# ----------------------------------------------------------------------------------------------
# Bottleneck tokens: the three attentions one by one.
# ----------------------------------------------------------------------------------------------
def _bottleneck_ref(q, k, v, bq, mask):
  """gather Z = softmax(B Kᵀ s) V, then Z' = softmax(Z Zᵀ s) Z, then softmax(Q Z'ᵀ s) Z'."""
  q, k, v, bq = ref.f64(q, k, v, bq)
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  scale = 1.0 / np.sqrt(q.shape[-1])

  def attend(a, b, c, m):
    logits = jnp.einsum("btnd,bsnd->bnts", a, b) * scale
    return jnp.einsum("bnts,bsnd->btnd", _probs(logits, m), c)

  every = np.ones((1, 1, 1, 1), bool)
  z = attend(bq, k, v, every if mask is None else mask)
  z = attend(z, z, z, every)
  return attend(q, z, z, every)


def _segment_means(q, num):
  """Means of `num` contiguous segments, summed token by token."""
  seg = q.shape[1] // num
  return jnp.stack([sum(q[:, p * seg + i] for i in range(seg)) / seg for p in range(num)], 1)


@pytest.mark.parametrize("t,s,kv_heads,masked", [(9, 13, 2, True)])
def test_bottleneck_pooled_matches_reference(t, s, kv_heads, masked):
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  mask = _key_padding(2, s, empty_batch=1) if masked else None
  op = functools.partial(ops.get("bottleneck"), num_tokens=3, mask=mask)
  out = ref.assert_matches(op, lambda q, k, v: _bottleneck_ref(q, k, v, _segment_means(q, 3),
                                                               mask), (q, k, v))
  if masked:
    assert np.all(out[1] == 0.0)


def test_bottleneck_given_queries_matches_reference():
  q, k, v = _qkv(t=11, s=7, k=2)
  bq = ref.normal(9, (1, 4, 4, 8))
  op = ops.get("bottleneck")
  ref.assert_matches(lambda q, k, v, b: op(q, k, v, bottleneck_queries=b),
                     lambda q, k, v, b: _bottleneck_ref(q, k, v, jnp.broadcast_to(
                         b, (2,) + b.shape[1:]), None), (q, k, v, bq))
  op = jax.jit(op)
  low = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bottleneck_queries=bq)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), op(q, k, v, bottleneck_queries=bq),
                             **BF16_TOL)


@pytest.mark.parametrize("args,match,error", [
    (dict(num_tokens=2.0), "num_tokens", ValueError),
    (dict(num_tokens=5), "num_tokens", ValueError),
    (dict(num_tokens=0), "num_tokens", ValueError),
    (dict(bottleneck_queries=jnp.zeros((2, 3, 4, 4))), "bottleneck_queries", ValueError),
    (dict(num_tokens=2, bottleneck_queries=jnp.zeros((2, 3, 4, 8))), "bottleneck_queries",
     ValueError),
    (dict(num_tokens=3, mask=jnp.ones((2, 1, 12, 12), bool)), "key-padding", ValueError),
    (dict(num_tokens=3, is_causal=True), "causal", NotImplementedError),
])
def test_bottleneck_bad_args(args, match, error):
  q, k, v = _qkv(t=12)
  with pytest.raises(error, match=match):
    ops.get("bottleneck")(q, k, v, **args)
  with pytest.raises(ValueError, match="value"):
    ops.get("bottleneck")(q, k, v[..., :4], num_tokens=3)


def test_bottleneck_layer():
  x = ref.normal(0, (2, 12, 32))
  layer = layers.Attention(num_heads=4, op="bottleneck", op_args=dict(num_tokens=4))
  out = jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.key(0), x), x)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_gpsa_local_init_attends_around_each_heads_offset():
  """Purely positional heads (σ(λ) → 1) with the local init: at an interior token of a 5×5
  image, head h's 4 largest weights sit on the offsets {0, 1}² shifted to its centre Δ_h."""
  grid, t = (5, 5), 25
  params = flax.linen.unbox(ops.positional.GPSAParams(
      num_heads=4, num_kv_heads=4, head_dim=8).init(jax.random.key(0), None, None, None, None))
  pos_proj = params["params"]["pos_proj"]
  q, k, _ = _qkv(b=1, t=t, k=4)
  eye = jnp.eye(t)[None, :, None, :] * jnp.ones((1, 1, 4, 1))  # value j = one-hot(j)
  weights = ops.get("gpsa")(q, k, eye, grid=grid, pos_proj=pos_proj,
                            gating=jnp.full((4,), 40.0))[0, 12]  # token (2, 2): [heads, t]
  for h in range(4):
    centre = np.asarray(pos_proj[h, :2]) / 2  # (Δx, Δy)
    want = {(2 + int(np.floor(centre[1])) + a) * 5 + 2 + int(np.floor(centre[0])) + c
            for a in (0, 1) for c in (0, 1)}
    assert set(np.argsort(-np.asarray(weights[h]))[:4]) == want, h


def test_kernelized_rpe_estimates_softmax_with_rpe():
  """With many random features the estimate approaches softmax(s·QKᵀ + b_{i−j}) V."""
  t = 8
  q, k, v = _qkv(b=1, t=t, k=4)
  q, k = q * 0.3, k * 0.3
  b = ref.normal(3, (4, 2 * t - 1))
  out = jax.jit(functools.partial(ops.get("kernelized_rpe"), rpe_bias=b, feature_key=0,
                                  num_features=4096))(q, k, v)
  offset = np.arange(t)[:, None] - np.arange(t)[None, :] + t - 1
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v, bias=ref.f64(b)[:, offset][None]))
  np.testing.assert_allclose(out, want, atol=0.05)
