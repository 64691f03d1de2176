"""Linear / kernelised attention ops against float64 quadratic references.

Each reference builds φ_q(Q), φ_k(K) from the paper's formula, the full kernel matrix
φ_q(Q)φ_k(K)ᵀ with explicit masks (and decay), and normalises rows directly.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from big_attn.ops import linear
from tests import reference as ref

# The linear fit of the log-normal attention paper's code: σ²_sm ≈ A·σ²_lln + B.
LLN_A, LLN_B = 0.14855178144710912, -0.35487039130661086


def rand(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.RandomState(seed).randn(*shape), jnp.float32)


def value_and_grad(loss):
  """Jitted `(loss, aux), grads` of `loss(q, k, v, arrays)` wrt all four arguments."""
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def bound(name, **kwargs):
  """Op `name` with its non-array arguments bound, jitted over `(q, k, v, arrays, mask)`."""
  op = ops.get(name)
  return jax.jit(lambda q, k, v, arrays, mask=None: op(q, k, v, mask=mask, **kwargs, **arrays))


def assert_close(actual, expected, tol):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  assert np.all(np.isfinite(actual))
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
  assert err <= tol, f"relative error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------------------
# float64 references.
# ------------------------------------------------------------------------------------------
def kernel_attention(phi_q, phi_k, v, mask, *, decay=None, normalize=True):
  """phi_q `[b,t,n,m]`, phi_k `[b,s,k,m]`, v `[b,s,k,d]`, mask `[b,n,t,s]` bool (or None)."""
  n = phi_q.shape[2]
  phi_k, v = ref.repeat_kv(phi_k, n), ref.repeat_kv(v, n)
  a = jnp.einsum("btnm,bsnm->bnts", phi_q, phi_k)
  if decay is not None:
    dist = np.maximum(np.arange(a.shape[2])[:, None] - np.arange(a.shape[3])[None, :], 0)
    a = a * jnp.power(decay[None, :, None, None], dist)
  if mask is not None:
    a = jnp.where(mask, a, 0.0)
  num = jnp.einsum("bnts,bsnd->btnd", a, v)
  if not normalize:
    return num
  den = jnp.transpose(a.sum(-1), (0, 2, 1))[..., None]
  return num / jnp.where(den == 0, 1.0, den)


def fast_reference(q, k, v, mask, *, scale=1.0, order=2):
  """FASTMax from the paper's formula: w_ij = Σ_{n≤p} (s·q̂_i·k̂_j)^n / n! on unit q̂, k̂,
  masked, rows normalised (the quadratic form, no factorisation)."""
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  n = q.shape[2]
  x = scale * jnp.einsum("btnd,bsnd->bnts", unit(q), ref.repeat_kv(unit(k), n))
  w = sum(x ** i / math.factorial(i) for i in range(order + 1))
  w = jnp.where(mask, w, 0.0)
  den = w.sum(-1)[..., None]
  out = jnp.einsum("bnts,bsnd->bntd", w / jnp.where(den == 0, 1.0, den), ref.repeat_kv(v, n))
  return jnp.transpose(out, (0, 2, 1, 3))


def performer_features(x, w, scale):
  x = x * math.sqrt(scale)
  return jnp.exp(x @ w.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(w.shape[0])


def focused_features(x, s, power=3.0, eps=1e-6):
  """s broadcastable to `[heads, d]` of x's heads axis."""
  x = (jax.nn.relu(x) + eps) / s
  xp = x ** power
  return jnp.linalg.norm(x, axis=-1, keepdims=True) * xp / jnp.linalg.norm(xp, axis=-1,
                                                                            keepdims=True)


def depthwise_conv(v, w, bias, *, causal=False, grid=None):
  """Cross-correlation of `[b,s,k,d]` with `[kw,k|1,d]` or `[kh,kw,k|1,d]`, 'SAME' padding."""
  b, s, k, d = v.shape
  if grid is None:
    size = w.shape[0]
    lo = size - 1 if causal else (size - 1) // 2
    vp = jnp.pad(v, [(0, 0), (lo, size - 1 - lo), (0, 0), (0, 0)])
    out = sum(w[u] * vp[:, u:u + s] for u in range(size))
  else:
    hh, ww = grid
    kh, kw = w.shape[:2]
    img = v.reshape(b, hh, ww, k, d)
    img = jnp.pad(img, [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0),
                        (0, 0)])
    out = sum(w[i, j] * img[:, i:i + hh, j:j + ww] for i in range(kh) for j in range(kw))
    out = out.reshape(b, s, k, d)
  return out + bias


def lognormal_alpha_beta(q, k, scale, is_causal=False):
  """α `[b, t|1, 1, 1]`, β `[b, s|1, 1, 1]`: per example; causal: from tokens 0..i only."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)

  def matched(qs, ks):  # The statistics of one example's (prefix of) queries and keys.
    sq, sk = np.std(qs), np.std(ks)
    sigma = math.sqrt((scale ** 2 * q.shape[-1] * sq ** 2 * sk ** 2 - LLN_B) / (2 * LLN_A))
    return sigma / sq, sigma / sk

  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  if not is_causal:
    alpha, beta = np.array([matched(q[i], k[i]) for i in range(b)]).T
    return alpha.reshape(b, 1, 1, 1), beta.reshape(b, 1, 1, 1)
  alpha = np.array([[matched(q[i, :p + 1], k[i, :min(p, s - 1) + 1])[0] for p in range(t)]
                    for i in range(b)])
  beta = np.array([[matched(q[i, :min(p, t - 1) + 1], k[i, :p + 1])[1] for p in range(s)]
                   for i in range(b)])
  return alpha.reshape(b, t, 1, 1), beta.reshape(b, s, 1, 1)


def reference(name, q, k, v, arrays, mask, *, is_causal=False, segment_ids=None,
              value_valid=None, scale=None, **kwargs):
  """The float64 reference of op `name`; `arrays` are its array arguments (differentiated)."""
  b, t, n, d = q.shape
  s = k.shape[1]
  full = ref.full_mask(b, n, t, s, mask=mask, is_causal=is_causal, segment_ids=segment_ids)
  scale_d = 1 / math.sqrt(d) if scale is None else scale
  if name == "performer":
    w = arrays["features"]
    return kernel_attention(performer_features(q, w, scale_d), performer_features(k, w, scale_d),
                            v, full)
  if name == "lognormal_linear":
    alpha, beta = kwargs.get("alpha"), kwargs.get("beta")
    if alpha is None:
      alpha, beta = lognormal_alpha_beta(q, k, scale_d, is_causal)
    return kernel_attention(jnp.exp(alpha * q), jnp.exp(beta * k), v, full)
  if name == "lightning":
    qs = q if scale is None else q * scale
    out = kernel_attention(qs, k, v, full, decay=arrays.get("decay"), normalize=False)
    if kwargs.get("output_norm"):
      out = out / jnp.sqrt(jnp.mean(out ** 2, axis=(2, 3), keepdims=True) + 1e-6)
    return out
  if name == "fast":
    return fast_reference(q, k, v, full, scale=1.0 if scale is None else scale)
  assert name == "focused_linear"
  fs = arrays.get("feature_scale", jnp.ones(()))
  fs_k = jnp.broadcast_to(fs, (k.shape[2], d))
  fs_q = jnp.repeat(fs_k, n // k.shape[2], axis=0)
  out = kernel_attention(focused_features(q, fs_q), focused_features(k, fs_k), v, full)
  if "dwc_kernel" in arrays:
    vv = v if value_valid is None else jnp.where(value_valid[..., None], v, 0.0)
    conv = depthwise_conv(vv, arrays["dwc_kernel"], arrays["dwc_bias"], causal=is_causal,
                          grid=kwargs.get("grid"))
    out = out + ref.repeat_kv(conv, n)
    has_key = np.transpose(full.any(-1), (0, 2, 1))[..., None]
    out = jnp.where(has_key, out, 0.0)
  return out


def op_arrays(name, config, key=7):
  """Array arguments of op `name` for a test configuration (all differentiated)."""
  n, kv, d = config["heads"], config["kv_heads"], config["dim"]
  if name == "performer":
    return {"features": linear.orthogonal_random_features(jax.random.key(key), 16, d)}
  if name == "focused_linear":
    arrays = {"feature_scale": 0.5 + jax.nn.sigmoid(rand(key, (kv, d)))}
    if config["t"] == config["s"]:
      arrays["dwc_kernel"] = rand(key + 1, (3, 1 if kv == 1 else kv, d), 0.3)
      arrays["dwc_bias"] = rand(key + 2, (d,), 0.1)
    return arrays
  if name == "lightning" and config["causal"]:
    return {"decay": jnp.linspace(0.6, 0.95, n)}
  return {}


def chunk_arg(name, size):
  return {"block_size": size} if name == "lightning" else {"chunk_size": size}


OPS = ["performer", "focused_linear", "lognormal_linear", "lightning", "fast"]

# b, lengths, heads, masking; "mask" is a callable (b, heads, t, s) -> bool mask.
CONFIGS = {
    # Non-causal cross-attention, GQA (4 query, 2 kv heads), key padding per query head.
    "noncausal_gqa_head_padding": dict(
        b=2, t=7, s=11, heads=4, kv_heads=2, dim=8, causal=False,
        mask=lambda b, n, t, s: np.random.RandomState(0).rand(b, n, 1, s) * np.arange(b)[
            :, None, None, None] > 0.4),  # Batch 0 has no key: rows of zeros.
    # Causal, length 13 in chunks of 4, MQA (1 kv head), key padding [b, 1, 1, s].
    "causal_mqa_padding": dict(
        b=2, t=13, s=13, heads=4, kv_heads=1, dim=8, causal=True,
        mask=lambda b, n, t, s: (np.arange(s) < np.array([[13], [9]]))[:, None, None, :]),
    # The quadratic fallback: causal, segment ids and a general [b, 1, q, kv] mask.
    "causal_segments_general_mask": dict(
        b=2, t=13, s=13, heads=4, kv_heads=2, dim=8, causal=True,
        segments=np.array([[0] * 5 + [1] * 8, [0] * 13]),
        mask=lambda b, n, t, s: (np.random.RandomState(1).rand(b, 1, t, s) > 0.3)
        & (np.arange(t) != 4)[None, None, :, None]),  # Row 4 sees nothing.
}


def make_inputs(config, seed=0, scale=0.7):
  b, t, s, n, kv, d = (config[x] for x in ("b", "t", "s", "heads", "kv_heads", "dim"))
  q = rand(seed, (b, t, n, d), scale)
  k = rand(seed + 1, (b, s, kv, d), scale)
  v = rand(seed + 2, (b, s, kv, d))
  mask = config["mask"](b, n, t, s) if "mask" in config else None
  return q, k, v, (None if mask is None else jnp.asarray(mask))


def value_valid(mask, config):
  """Key validity per kv head `[b, s, kv]` for a key-padding mask (None otherwise)."""
  if mask is None or mask.shape[2] != 1:
    return None
  m = np.broadcast_to(np.asarray(mask)[:, :, 0], (mask.shape[0], config["heads"], config["s"]))
  m = m.reshape(m.shape[0], config["kv_heads"], -1, config["s"]).any(2)
  return jnp.asarray(np.transpose(m, (0, 2, 1)))


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", OPS)
def test_forward_and_grad_match_reference(name, config_name):
  config = CONFIGS[config_name]
  q, k, v, mask = make_inputs(config)
  arrays = op_arrays(name, config)
  segments = config.get("segments")
  kwargs = dict(is_causal=config["causal"], **chunk_arg(name, 4))
  if segments is not None:
    kwargs["segment_ids"] = jnp.asarray(segments)
  ct = rand(9, (config["b"], config["t"], config["heads"], config["dim"]))

  def op_loss(q, k, v, arrays):
    out = ops.get(name)(q, k, v, mask=mask, **kwargs, **arrays)
    return jnp.sum(out * ct), out

  (_, out), grads = value_and_grad(op_loss)(q, k, v, arrays)
  with ref.x64():
    # Moment-matched α, β carry no gradient: fix them from the float32 inputs.
    fixed = dict(zip(("alpha", "beta"), lognormal_alpha_beta(q, k, 1 / math.sqrt(q.shape[-1]),
                                                             config["causal"])))
    fixed = fixed if name == "lognormal_linear" else {}

    def ref_loss(q, k, v, arrays):
      out = reference(name, q, k, v, arrays, None if mask is None else np.asarray(mask),
                      is_causal=config["causal"], segment_ids=segments,
                      value_valid=value_valid(mask, config), **fixed)
      return jnp.sum(out * ref.f64(ct)), out

    (_, expected), ref_grads = value_and_grad(ref_loss)(*ref.f64(q, k, v),
                                                        jax.tree.map(ref.f64, arrays))
  assert out.dtype == jnp.float32
  assert_close(out, expected, 1e-4)
  if mask is not None:  # The first and last configurations have empty rows.
    check_empty_rows_are_zero(out, ref.full_mask(
        config["b"], config["heads"], config["t"], config["s"], mask=np.asarray(mask),
        is_causal=config["causal"], segment_ids=segments))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_close(got, want, 2e-4)


@pytest.mark.parametrize("name", OPS)
def test_causal_chunks_future_tokens_and_bfloat16(name):
  """Chunked causal form == quadratic form for any chunk size; the past ignores the future;
  bfloat16 inputs give bfloat16 outputs computed in float32."""
  config = dict(CONFIGS["causal_mqa_padding"], kv_heads=2)
  q, k, v, _ = make_inputs(config, seed=3)
  arrays = op_arrays(name, config)
  causal_mask = jnp.asarray(np.tril(np.ones((13, 13), bool)))[None, None]
  # A general [q, kv] mask takes the quadratic form of the same kernel.
  quadratic = bound(name, is_causal=True)(q, k, v, arrays, causal_mask)
  op = bound(name, is_causal=True, **chunk_arg(name, 5))
  out = op(q, k, v, arrays)
  assert_close(out, quadratic, 2e-5)

  later = jnp.arange(13)[None, :, None, None] >= 6
  changed = op(jnp.where(later, 3.0 * q[:, ::-1], q), jnp.where(later, -k[:, ::-1], k),
               jnp.where(later, 5.0, v), arrays)
  assert_close(changed[:, :6], out[:, :6], 1e-5)
  assert not np.allclose(changed[:, 6:], out[:, 6:], atol=1e-3)

  out = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)), arrays)
  assert out.dtype == jnp.bfloat16
  as_f32 = op(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), arrays)
  assert_close(out, as_f32, 1e-2)


def check_empty_rows_are_zero(out, full_mask):
  """Rows with no key in the `[b, n, t, s]` mask are exactly zero, the others are not."""
  out = np.asarray(out)
  has_key = full_mask.any(-1).transpose(0, 2, 1)
  assert np.all(np.isfinite(out))
  assert np.all(out[~has_key] == 0)
  assert np.all(np.any(out[has_key] != 0, axis=-1))


@pytest.mark.parametrize("name", OPS)
def test_fully_masked_rows_are_zero_without_nan(name):
  config = dict(b=2, t=9, s=9, heads=4, kv_heads=2, dim=8, causal=True)
  q, k, v, _ = make_inputs(config, seed=5)
  arrays = op_arrays(name, config)
  # Batch 0: no valid key. Batch 1: the first three keys are padding (left padding).
  padding = jnp.asarray(np.arange(9)[None, :] >= np.array([[9], [3]]))[:, None, None, :]
  op = ops.get(name)

  def loss(q, k, v, arrays):
    out = op(q, k, v, mask=padding, is_causal=True, **chunk_arg(name, 4), **arrays)
    return jnp.sum(out ** 2), out

  (_, out), grads = value_and_grad(loss)(q, k, v, arrays)
  full = ref.full_mask(2, 4, 9, 9, mask=np.asarray(padding), is_causal=True)
  assert np.sum(~full.any(-1)) == 4 * (9 + 3)
  check_empty_rows_are_zero(out, full)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------
# Performer.
# ------------------------------------------------------------------------------------------
def test_performer_approximates_softmax_with_many_features():
  # The estimator's variance grows like exp(‖q'+k'‖²)/m: moderate norms, many features.
  q, k, v = rand(0, (1, 12, 2, 4), 0.5), rand(1, (1, 20, 2, 4), 0.5), rand(2, (1, 20, 2, 4))
  w = linear.orthogonal_random_features(jax.random.key(3), 16386, 4)
  performer = bound("performer")
  with ref.x64():
    expected = np.asarray(ref.softmax_attention(q, k, v))
  err = lambda x: np.max(np.abs(np.asarray(x) - expected)) / np.max(np.abs(v))
  uniform = np.broadcast_to(np.mean(np.asarray(v), axis=1, keepdims=True), expected.shape)
  many = err(performer(q, k, v, {"features": w}))
  assert many < 0.05
  assert many < 0.2 * err(uniform)
  assert many < err(performer(q, k, v, {"features": w[:8]}))


def test_orthogonal_random_features_structure():
  d = 4
  w = np.asarray(linear.orthogonal_random_features(jax.random.key(0), 16386, d), np.float64)
  assert w.shape == (16386, d)
  directions = w / np.linalg.norm(w, axis=1, keepdims=True)
  for start in (0, d, 16384):  # Full blocks and the truncated last block (2 rows).
    block = directions[start:start + d]
    np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)
  # Row norms are chi(d): E‖w‖² = d, and not all equal.
  assert abs(np.mean(np.sum(w ** 2, axis=1)) - d) < 0.3
  assert np.std(np.linalg.norm(w, axis=1)) > 0.3
  # Directions across blocks are not orthogonal.
  assert np.max(np.abs(directions[:d] @ directions[d:2 * d].T)) > 1e-3


def test_performer_feature_key_and_num_features():
  assert linear.default_num_features(64) == math.ceil(64 * math.log(64)) == 267
  assert linear.default_num_features(2) == 2
  w = linear.orthogonal_random_features(jax.random.key(5), 32, 8)
  np.testing.assert_array_equal(linear.orthogonal_random_features(5, 32, 8), w)  # Int seed.
  q, k, v = rand(0, (1, 6, 2, 8)), rand(1, (1, 6, 2, 8)), rand(2, (1, 6, 2, 8))
  drawn = bound("performer", num_features=32)
  out = drawn(q, k, v, {"feature_key": jax.random.key(5)})
  assert_close(out, bound("performer")(q, k, v, {"features": w}), 1e-6)
  assert not np.allclose(out, drawn(q, k, v, {"feature_key": jax.random.key(6)}), atol=1e-3)


# ------------------------------------------------------------------------------------------
# Lightning and focused linear specifics.
# ------------------------------------------------------------------------------------------
def test_lightning_scalar_decay_scale_and_output_norm():
  config = dict(b=2, t=13, s=13, heads=4, kv_heads=2, dim=8, causal=True)
  q, k, v, _ = make_inputs(config, seed=8)
  out = bound("lightning", is_causal=True, decay=0.8, scale=0.5, block_size=4,
              output_norm=True)(q, k, v, {})
  with ref.x64():
    expected = reference("lightning", *ref.f64(q, k, v), {"decay": jnp.full((4,), 0.8)}, None,
                         is_causal=True, scale=0.5, output_norm=True)
  assert_close(out, expected, 1e-4)
  np.testing.assert_allclose(np.mean(np.asarray(out) ** 2, axis=(2, 3)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("grid", [None, (3, 4)])
def test_focused_linear_noncausal_dwc_1d_and_2d(grid):
  config = dict(b=2, t=12, s=12, heads=2, kv_heads=2, dim=4, causal=False)
  q, k, v, _ = make_inputs(config, seed=10)
  spatial = (3,) if grid is None else (3, 3)
  heads = 2 if grid is None else 1  # Per-head and shared kernels.
  arrays = {"dwc_kernel": rand(11, spatial + (heads, 4), 0.3), "dwc_bias": rand(12, (1, 4), 0.1)}

  def op_loss(q, k, v, arrays):
    out = ops.get("focused_linear")(q, k, v, grid=grid, power=2.0, **arrays)
    return jnp.sum(out ** 2), out

  (_, out), grads = value_and_grad(op_loss)(q, k, v, arrays)
  with ref.x64():
    def ref_loss(q, k, v, arrays):
      full = ref.full_mask(2, 2, 12, 12)
      fq, fk = focused_features(q, 1.0, 2.0), focused_features(k, 1.0, 2.0)
      conv = depthwise_conv(v, arrays["dwc_kernel"], arrays["dwc_bias"], grid=grid)
      out = kernel_attention(fq, fk, v, full) + conv
      return jnp.sum(out ** 2), out

    (_, expected), ref_grads = value_and_grad(ref_loss)(*ref.f64(q, k, v),
                                                        jax.tree.map(ref.f64, arrays))
  assert_close(out, expected, 1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_close(got, want, 2e-4)


def test_attention_layer_focused_linear_owns_dwc():
  x = rand(0, (2, 16, 32))
  make = lambda op_args: layers.Attention(num_heads=4, num_kv_heads=2, op="focused_linear",
                                          op_args=op_args)
  # Over the sequence: a 1-D kernel, 5 taps by default.
  shapes = jax.eval_shape(make({}).init, jax.random.key(1), x)["params"]["op_params"]
  assert shapes["dwc_kernel"].value.shape == (5, 1, 8)
  assert shapes["dwc_kernel"].names == ("conv_width", None, "head_dim")
  # Image tokens: a 2-D kernel.
  layer = make({"dwc_kernel_size": 3, "grid": (4, 4)})
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  params = variables["params"]["op_params"]
  assert params["dwc_kernel"].value.shape == (3, 3, 1, 8)
  assert params["dwc_kernel"].names == ("conv_height", "conv_width", None, "head_dim")
  assert params["dwc_bias"].value.shape == (1, 8)
  assert params["feature_scale"].value.shape == (2, 8)
  np.testing.assert_allclose(params["feature_scale"].value, 0.0)  # softplus(0) = ln 2.

  def loss(variables):
    out = layer.apply(variables, x)
    return jnp.sum(out ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  g = grads["params"]["op_params"]
  assert np.all(np.isfinite(g["dwc_kernel"].value)) and np.any(g["dwc_kernel"].value != 0)
  assert np.any(g["feature_scale"].value != 0)


def test_registered_names():
  assert {"performer", "focused_linear", "lognormal_linear", "lightning", "fast"} <= set(
      ops.names())


def test_lightning_default_decay_is_transnormer_alibi():
  """λ_h = exp(−m_h) with ALiBi's slopes (the authors' values for 8 and 6 heads) when causal;
  no decay without is_causal; a wrong name raises."""
  np.testing.assert_allclose(linear.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(linear.alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4)
  op = ops.get("lightning")
  explicit = jnp.asarray(np.exp(-linear.alibi_slopes(4)), jnp.float32)
  np.testing.assert_allclose(op(q, k, v, is_causal=True, block_size=3),
                             op(q, k, v, is_causal=True, block_size=3, decay=explicit),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(op(q, k, v), op(q, k, v, decay=None))
  with pytest.raises(ValueError, match="decay"):
    op(q, k, v, is_causal=True, decay="retnet")


def test_fast_order_and_scale_match_reference(order=3):
  """Another Taylor order and a temperature s, causal with GQA, against the quadratic form."""
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4, seed=order)
  op = lambda q, k, v: ops.get("fast")(q, k, v, is_causal=True, scale=0.8, order=order,
                                       chunk_size=3)
  ref.assert_matches(op, lambda q, k, v: fast_reference(
      q, k, v, ref.full_mask(2, 4, 7, 7, is_causal=True), scale=0.8, order=order), (q, k, v))


# ------------------------------------------------------------------------------------------
# Argument errors.
# ------------------------------------------------------------------------------------------
def _qkv(t=6, s=6):
  return rand(0, (1, t, 2, 4)), rand(1, (1, s, 2, 4)), rand(2, (1, s, 2, 4))


@pytest.mark.parametrize("name, kwargs, match", [
    ("performer", dict(features=jnp.ones((8, 5))), "features"),
    ("performer", dict(features=jnp.ones((8, 4)), feature_key=0), "exactly one"),
    ("performer", dict(features=jnp.ones((8, 4)), feature_key=0), "exactly one"),
    ("performer", dict(features=jnp.ones((8, 4)), num_features=4), "num_features"),
    ("performer", dict(feature_key=0, num_features=0), "num_features"),
    ("performer", dict(feature_key=0, chunk_size=0), "chunk_size"),
    ("performer", dict(feature_key=0, scale=-1.0), "scale"),
    ("lightning", dict(block_size=0), "block_size"),
    ("lightning", dict(block_size=2.5), "block_size"),
    ("lightning", dict(decay=1.5, is_causal=True), "decay"),
    ("lightning", dict(decay=jnp.ones((3,)), is_causal=True), "decay"),
    ("lightning", dict(decay=0.9), "is_causal"),
    ("fast", dict(order=0), "order"),
    ("fast", dict(order=4), "order"),
    ("fast", dict(scale=-1.0), "scale"),
    ("fast", dict(chunk_size=0), "chunk_size"),
    ("lognormal_linear", dict(alpha=jnp.ones((2,))), "alpha"),
    ("lognormal_linear", dict(chunk_size=-1), "chunk_size"),
    ("focused_linear", dict(scale=0.5), "scale"),
    ("focused_linear", dict(power=0), "power"),
    ("focused_linear", dict(feature_scale=jnp.ones((3, 4))), "feature_scale"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 2, 5))), "dwc_kernel"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 1, 4)), dwc_kernel_size=5),
     "dwc_kernel_size"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 3, 1, 4))), "grid"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 3, 1, 4)), grid=(2, 2)), "grid"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 3, 1, 4)), grid=(2, 3), is_causal=True),
     "causal"),
    ("focused_linear", dict(grid=(2, 3)), "grid"),
    ("focused_linear", dict(dwc_kernel=jnp.ones((3, 1, 4)), dwc_bias=jnp.ones((3, 4))),
     "dwc_bias"),
])
def test_bad_arguments_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ops.get(name)(*_qkv(), **kwargs)


def test_dwc_needs_equal_lengths_and_key_padding_mask_shape_is_checked():
  with pytest.raises(ValueError, match="q_len == kv_len"):
    ops.get("focused_linear")(*_qkv(5, 6), dwc_kernel=jnp.ones((3, 1, 4)))
  with pytest.raises(ValueError, match="mask"):
    ops.get("lognormal_linear")(*_qkv(), mask=jnp.ones((1, 3, 1, 6), bool))
