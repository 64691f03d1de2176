"""`gpsa` (ConViT), `levit_bias` (LeViT), `decomposed_relpos` (MViTv2) and
`kernelized_rpe` (Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding) against float64 references.

The references are written from the papers' formulas on explicit `[q, kv]` matrices: offsets on
the grid come from loops over token positions and the RPE Toeplitz sum is the quadratic form.
They never call `big_attn`.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (3, 5)
_qkv = functools.partial(ref.qkv, t=15)


def _positions(grid):
  """`[t, 2]` (y, x) of every token, by a loop over the row-major grid."""
  h, w = grid
  return np.array([(y, x) for y in range(h) for x in range(w)])


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
  content = ref.masked_softmax(ref.attention_logits(q, k), mask)
  positional = ref.masked_softmax(jnp.einsum("tsc,nc->nts", rel, ref.f64(pos_proj))[None], mask)
  gate = jax.nn.sigmoid(ref.f64(gating))[None, :, None, None]
  attn = (1 - gate) * content + gate * positional
  return jnp.einsum("bnts,bsnd->btnd", attn, ref.repeat_kv(ref.f64(v), q.shape[2]))


@pytest.mark.parametrize("kv_heads,causal,masked", [(1, True, False), (4, False, True)])
def test_gpsa_matches_reference(kv_heads, causal, masked):
  q, k, v = _qkv(k=kv_heads, dv=6)
  pos_proj = ref.normal(3, (4, 3), std=0.5)
  gating = ref.normal(4, (4,))
  mask = ref.key_padding(2, 15, first_valid=True, invalid=1) if masked else None
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
  return _probs_out(ref.attention_logits(q, k) + ref.f64(table)[:, dy, dx][None], mask, v,
                    q.shape[2])


def _probs_out(logits, mask, v, n):
  return jnp.einsum("bnts,bsnd->btnd", ref.masked_softmax(logits, mask),
                    ref.repeat_kv(ref.f64(v), n))


@pytest.mark.parametrize("kv_heads,causal", [(2, False), (4, True)])
def test_levit_bias_matches_reference(kv_heads, causal):
  q, k, v = _qkv(k=kv_heads)
  table = ref.normal(3, (4,) + GRID)
  mask = ref.key_padding(2, 15, first_valid=True)
  full = ref.full_mask(2, 4, 15, 15, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("levit_bias"), grid=GRID, mask=mask, is_causal=causal)
  ref.assert_matches(lambda q, k, v, tb: op(q, k, v, attention_bias=tb),
                     lambda q, k, v, tb: _levit_ref(q, k, v, tb, GRID, full), (q, k, v, table))


def _relpos_ref(q, k, v, rel_h, rel_w, grid, mask, kv_grid=None):
  """MViTv2's offsets: positions on the finer of the query and key grids (per axis), shifted
  by the key side; on one grid y_i − y_j + h − 1."""
  kv_grid = kv_grid or grid
  q_pos, k_pos = _positions(grid), _positions(kv_grid)
  t, s = len(q_pos), len(k_pos)
  idx = np.zeros((2, t, s), int)
  for a in range(2):
    q_ratio, k_ratio = max(kv_grid[a] / grid[a], 1.0), max(grid[a] / kv_grid[a], 1.0)
    for i in range(t):
      for j in range(s):
        idx[a, i, j] = int(q_pos[i][a] * q_ratio - k_pos[j][a] * k_ratio
                           + (kv_grid[a] - 1) * k_ratio)
  r = rel_h[idx[0]] + rel_w[idx[1]]  # [t, s, d]
  bias = jnp.einsum("btnd,tsd->bnts", ref.f64(q), r)
  return _probs_out(ref.attention_logits(q, k) + bias, mask, v, q.shape[2])


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


@pytest.mark.parametrize("grid,kv_grid", [
    ((2, 3), (3, 5)), pytest.param((3, 5), (2, 2), marks=pytest.mark.extended)])
def test_decomposed_relpos_keys_on_another_grid(grid, kv_grid):
  t, s = grid[0] * grid[1], kv_grid[0] * kv_grid[1]
  q, k, v = ref.qkv(t=t, s=s, k=2, dv=5)
  rows = [2 * max(a, b) - 1 for a, b in zip(grid, kv_grid)]
  rel_h, rel_w = ref.normal(3, (rows[0], 8), std=0.5), ref.normal(4, (rows[1], 8), std=0.5)
  mask = ref.key_padding(2, s, first_valid=True)
  full = ref.full_mask(2, 4, t, s, mask=mask)
  op = functools.partial(ops.get("decomposed_relpos"), grid=grid, kv_grid=kv_grid, mask=mask)
  ref.assert_matches(lambda q, k, v, a, c: op(q, k, v, rel_h=a, rel_w=c),
                     lambda q, k, v, a, c: _relpos_ref(q, k, v, ref.f64(a), ref.f64(c), grid,
                                                       full, kv_grid),
                     (q, k, v, rel_h, rel_w))
  with pytest.raises(ValueError, match="kv_grid"):
    ops.get("decomposed_relpos")(q, k, v, grid=grid, kv_grid=grid, rel_h=rel_h, rel_w=rel_w)
  params = ops.params_module("decomposed_relpos")(
      num_heads=4, num_kv_heads=2, head_dim=8, op_args=dict(grid=grid, kv_grid=kv_grid))
  shapes = jax.eval_shape(lambda: params.init(jax.random.key(0), None, q, k, v))["params"]
  assert shapes["rel_h"].value.shape == (rows[0], 8) and shapes["rel_w"].value.shape[0] == rows[1]


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
                                                      (8, 1, True, False), (37, 2, True, True)])
def test_kernelized_rpe_fft_matches_quadratic(t, kv_heads, causal, masked):
  q, k, v = _qkv(t=t, k=kv_heads, dv=6)
  q, k = q * 0.5, k * 0.5
  b = ref.normal(3, (4, 2 * t - 1))
  w = ops.linear.orthogonal_random_features(0, 16, 8)
  mask = ref.key_padding(2, t, first_valid=True, invalid=1) if masked else None
  full = ref.full_mask(2, 4, t, t, mask=mask, is_causal=causal)
  op = functools.partial(ops.get("kernelized_rpe"), mask=mask, is_causal=causal)
  out = ref.assert_matches(lambda q, k, v, b, w: op(q, k, v, rpe_bias=b, features=w),
                           lambda q, k, v, b, w: _krpe_ref(q, k, v, b, w, full),
                           (q, k, v, b, w))
  if masked:
    assert np.all(out[1] == 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_kernelized_rpe_packed_rows(causal):
  """With `segment_ids`: the quadratic reference with the segment (and key-padding) mask, and
  each segment run alone with its offsets' biases (forward and gradients)."""
  t = 12
  q, k, v = _qkv(t=t, k=2, dv=6)
  b = ref.normal(3, (4, 2 * t - 1))
  w = ops.linear.orthogonal_random_features(0, 16, 8)
  seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 2 + [1] * 6 + [2] * 4])
  mask = ref.key_padding(2, t, first_valid=True, invalid=1)
  full = ref.full_mask(2, 4, t, t, mask=mask, is_causal=causal, segment_ids=seg)
  op = functools.partial(ops.get("kernelized_rpe"), mask=mask, is_causal=causal,
                         segment_ids=seg)
  ref.assert_matches(lambda q, k, v, b, w: op(q, k, v, rpe_bias=b, features=w),
                     lambda q, k, v, b, w: _krpe_ref(q, k, v, b, w, full), (q, k, v, b, w))
  op_checks.assert_packed_rows_match_segments(
      ops.get("kernelized_rpe"), dict(rpe_bias=b, features=w),
      lambda m: dict(rpe_bias=b[:, t - m:t + m - 1], features=w), is_causal=causal,
      atol=5e-5)  # the segments alone run through the FFT, whose round-off is ~1e-5 here


def test_kernelized_rpe_causal_ignores_future():
  q, k, v = _qkv(t=11)
  b = ref.normal(3, (4, 21))
  op = jax.jit(functools.partial(ops.get("kernelized_rpe"), rpe_bias=b, feature_key=1,
                                 num_features=8, is_causal=True))
  out = op(q, k, v)
  changed = op(q, k.at[:, 6:].set(5.0), v.at[:, 6:].set(-3.0))
  np.testing.assert_allclose(out[:, :6], changed[:, :6], **F32_TOL)
  assert not np.allclose(out[:, 6:], changed[:, 6:], atol=1e-3)


@pytest.mark.parametrize("t", [1, 37, 64])
def test_kernelized_rpe_causal_outputs_exact_before_later_tokens(t):
  """Later keys and values, even 30 times larger (exponents far above the past's), NaN or inf,
  leave the earlier outputs bitwise unchanged; 37 and 64 tokens run the divide and conquer's
  FFT levels."""
  q, k, v = _qkv(t=t, k=2)
  b = ref.normal(3, (4, 2 * t - 1))
  op = jax.jit(functools.partial(ops.get("kernelized_rpe"), rpe_bias=b, feature_key=1,
                                 num_features=8, is_causal=True))
  op_checks.assert_causal_exact_before_later_tokens(op, (q, k, v), cut=(t + 1) // 2)


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
