"""The `hyena` op (Hyena Hierarchy: Towards Larger Convolutional Language Models) against a
direct O(L²) convolution in float64, and its learned parameters (the implicit filter) in the
`Attention` layer.

The reference builds the Toeplitz matrix T[t, s] = h(pos_t − pos_s) by loops over token
positions (sequence or row-major grid), applies the short convolutions tap by tap with explicit
zero padding, and runs the recurrence z_{n+1} = x_n ⊙ (T_n z_n + D_n ⊙ z_n). It never calls
`big_attn`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from big_attn.layers import hyena as hyena_layers
from tests import op_checks
from tests import reference as ref


def _positions(spatial):
  """`[L, rank]` positions of the tokens, row-major."""
  if len(spatial) == 1:
    return np.arange(spatial[0])[:, None]
  h, w = spatial
  return np.array([(y, x) for y in range(h) for x in range(w)])


def _toeplitz(filt, spatial, is_causal, causal_taps):
  """`[L, L, heads, head_dim]`: entry (t, s) is the tap at offset pos_t − pos_s, or 0."""
  pos = _positions(spatial)
  length, rank = pos.shape
  index = np.zeros((length, length, rank), int)
  present = np.ones((length, length), bool)
  for t in range(length):
    for s in range(length):
      r = pos[t] - pos[s]
      present[t, s] = not (is_causal and np.any(r < 0))
      index[t, s] = np.maximum(r, 0) if causal_taps else np.asarray(spatial) - 1 + r
  taps = filt[tuple(index[..., a] for a in range(rank))]
  return jnp.where(present[:, :, None, None], taps, 0.0)


def _short_conv_ref(x, kernel, spatial, is_causal):
  """y_t = Σ_j w_j x_{t+j−p} per axis with zeros outside; x `[b, L, n, d]`."""
  b, length, n, d = x.shape
  img = x.reshape(b, *spatial, n, d)
  k = kernel.shape[:-2]
  pads = [(m - 1) if is_causal else (m - 1) // 2 for m in k]
  padded = jnp.pad(img, [(0, 0)] + [(p, m - 1 - p) for p, m in zip(pads, k)] + [(0, 0)] * 2)
  out = jnp.zeros_like(img)
  for j in np.ndindex(*k):
    window = padded[(slice(None),) + tuple(slice(ji, ji + s) for ji, s in zip(j, spatial))]
    out = out + kernel[j] * window
  return out.reshape(x.shape)


def hyena_ref(q, k, v, filters, *, bias=None, short=None, gates=(), spatial, is_causal,
              valid=None):
  """z_1 = v, z_{n+1} = x_n ⊙ (h_n * z_n + D_n z_n), x = (k, *gates, q), in float64."""
  causal_taps = tuple(filters.shape[1:1 + len(spatial)]) == tuple(spatial)
  xs = [v, k, *gates, q]
  if valid is not None:
    keep = jnp.asarray(valid)[:, :, None, None]
    xs = [jnp.where(keep, x, 0.0) for x in xs]
  if short is not None:
    xs = [_short_conv_ref(x, short[i], spatial, is_causal) for i, x in enumerate(xs)]
    if valid is not None:
      xs = [jnp.where(keep, x, 0.0) for x in xs]
  z = xs[0]
  for n, x in enumerate(xs[1:]):
    toeplitz = _toeplitz(filters[n], spatial, is_causal, causal_taps)
    conv = jnp.einsum("tsnd,bsnd->btnd", toeplitz, z)
    if bias is not None:
      conv = conv + bias[n] * z
    z = x * conv
  return z


CASES = [  # (spatial, is_causal, order, causal_taps, short kernel)
    ((7,), True, 2, False, 3),
    ((7,), True, 2, True, None),
    ((9,), False, 3, False, 3),
    ((3, 5), False, 2, False, 3),
    ((3, 3), True, 2, False, 2),
]


@pytest.mark.parametrize("spatial,is_causal,order,causal_taps,short", CASES)
def test_hyena_matches_direct_convolution(spatial, is_causal, order, causal_taps, short):
  b, n, d = 2, 2, 3
  length = int(np.prod(spatial))
  taps = spatial if causal_taps else tuple(2 * m - 1 for m in spatial)
  q, k, v = (ref.normal(i, (b, length, n, d)) for i in range(3))
  filters = ref.normal(3, (order, *taps, n, d), std=0.3)
  bias = ref.normal(4, (order, n, d))
  gates = ref.normal(5, (order - 2, b, length, n, d))
  short_filters = None if short is None else ref.normal(6, (order + 1,) + (short,) * len(
      spatial) + (n, d), std=0.5)
  grid = spatial if len(spatial) == 2 else None
  arrays = [q, k, v, filters, bias] + ([gates] if order > 2 else []) + (
      [] if short is None else [short_filters])

  def split(a):
    a = list(a)
    g = a.pop(5) if order > 2 else None
    s = a.pop(5) if short is not None else None
    return a, g, s

  def op_fn(*a):
    (q_, k_, v_, f_, b_), g, s = split(a)
    return ops.get("hyena")(q_, k_, v_, is_causal=is_causal, filters=f_, filter_bias=b_,
                            gates=g, short_filters=s, grid=grid)

  def ref_fn(*a):
    (q_, k_, v_, f_, b_), g, s = split(a)
    return hyena_ref(q_, k_, v_, f_, bias=b_, short=s, gates=() if g is None else list(g),
                     spatial=spatial, is_causal=is_causal)

  ref.assert_matches(op_fn, ref_fn, arrays, tol=dict(rtol=2e-4, atol=2e-4))


def test_key_padding_mask_and_empty_rows():
  b, length, n, d = 3, 6, 2, 2
  q, k, v = (ref.normal(i, (b, length, n, d)) for i in range(3))
  filters = ref.normal(3, (2, 2 * length - 1, n, d), std=0.3)
  short = ref.normal(4, (3, 3, n, d), std=0.5)
  valid = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0] * 6], bool)
  mask = jnp.asarray(valid[:, None, None, :])

  def op_fn(q_, k_, v_, f_):
    return ops.get("hyena")(q_, k_, v_, mask=mask, filters=f_, short_filters=short)

  def ref_fn(q_, k_, v_, f_):
    return hyena_ref(q_, k_, v_, f_, short=ref.f64(short), spatial=(length,), is_causal=False,
                     valid=valid)

  out = ref.assert_matches(op_fn, ref_fn, [q, k, v, filters], tol=dict(rtol=2e-4, atol=2e-4))
  assert np.all(out[2] == 0.0) and np.all(out[0][~valid[0]] == 0.0)
  # Padded tokens do not reach the others: changing them changes nothing.
  noisy = [jnp.where(mask[:, 0, 0, :, None, None], x, 100.0) for x in (q, k, v)]
  np.testing.assert_allclose(op_fn(*noisy, filters), out, rtol=1e-5, atol=1e-5)


def test_causal_outputs_ignore_the_future_and_bf16():
  b, length, n, d = 1, 8, 1, 4
  q, k, v = (ref.normal(i, (b, length, n, d)) for i in range(3))
  filters = ref.normal(3, (2, 2 * length - 1, n, d), std=0.3)
  short = ref.normal(4, (3, 4, n, d), std=0.5)
  op = ops.get("hyena")
  fn = lambda x: op(q, k, x, is_causal=True, filters=filters, short_filters=short)
  jac = jax.jacrev(lambda x: fn(x)[0, :, 0, 0])(v)[:, 0, :, 0, 0]  # [t, s]
  jac = np.asarray(jac)  # FFT round-off leaves ~1e-10 above the diagonal
  assert np.abs(np.triu(jac, 1)).max() < 1e-6 * np.abs(jac).max() and np.all(np.diag(jac) != 0)
  out = fn(v)
  out_bf16 = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)), is_causal=True, filters=filters,
                short_filters=short)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32), out, **ref.BF16_TOL)


def test_bad_arguments():
  op = ops.get("hyena")
  q = ref.normal(0, (1, 6, 2, 4))
  filters = ref.normal(1, (2, 11, 2, 4))
  with pytest.raises(ValueError, match="filters .* are required"):
    op(q, q, q)
  with pytest.raises(ValueError, match="filters must have shape"):
    op(q, q, q, filters=filters[:, :6])  # causal taps without is_causal
  with pytest.raises(ValueError, match="order >= 2"):
    op(q, q, q, filters=filters[:1])
  with pytest.raises(ValueError, match="order=3"):
    op(q, q, q, filters=filters, order=3)
  with pytest.raises(ValueError, match="no scale"):
    op(q, q, q, filters=filters, scale=0.5)
  with pytest.raises(ValueError, match="same length and head_dim"):
    op(q, q[:, :4], q[:, :4], filters=filters)
  with pytest.raises(ValueError, match="key-padding"):
    op(q, q, q, filters=filters, mask=jnp.ones((1, 1, 6, 6), bool))
  with pytest.raises(ValueError, match="gates"):
    op(q, q, q, filters=jnp.concatenate([filters, filters[:1]]))
  with pytest.raises(ValueError, match="grid"):
    op(q, q, q, filters=filters, grid=(2, 2))
  with pytest.raises(ValueError, match="short_filters must have shape"):
    op(q, q, q, filters=filters, short_filters=jnp.ones((2, 3, 2, 4)))
  with pytest.raises(ValueError, match="short_kernel=5"):
    op(q, q, q, filters=filters, short_filters=jnp.ones((3, 3, 2, 4)), short_kernel=5)
  with pytest.raises(ValueError, match="filter_bias"):
    op(q, q, q, filters=filters, filter_bias=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="exceeds max_len"):
    op(q, q, q, filters=filters, max_len=5)
  with pytest.raises(TypeError, match="filters"):
    op(q, q, q, filters=filters.astype(jnp.int32))


def test_grouped_kv_heads_gate_their_query_heads():
  op = ops.get("hyena")
  q, kv = ref.normal(0, (1, 6, 4, 3)), ref.normal(1, (1, 6, 2, 3))
  filters = ref.normal(2, (2, 11, 4, 3))
  repeated = jnp.repeat(kv, 2, axis=2)
  np.testing.assert_allclose(op(q, kv, kv * 0.5, filters=filters),
                             op(q, repeated, repeated * 0.5, filters=filters), rtol=1e-6)
  grad = jax.grad(lambda k: jnp.sum(op(q, k, kv, filters=filters) ** 2))(kv)
  grad_ref = jax.grad(lambda k: jnp.sum(op(q, jnp.repeat(k, 2, axis=2), repeated,
                                           filters=filters) ** 2))(kv)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_implicit_filter_is_the_windowed_sine_network():
  module = hyena_layers.ImplicitFilter(order=2, num_heads=2, head_dim=3, hidden=8, depth=2,
                                       bands=2)
  params = nn.unbox(module.init(jax.random.key(0), (4,)))["params"]
  h = np.asarray(jax.jit(lambda p: module.apply({"params": p}, (4,)))(params))
  assert h.shape == (2, 7, 2, 3)
  p = jax.tree.map(np.asarray, params)
  rows = []
  for r in range(-3, 4):
    t = r / 3
    x = np.array([t, np.sin(np.pi * t), np.sin(2 * np.pi * t), np.cos(np.pi * t),
                  np.cos(2 * np.pi * t)])
    for i in range(2):
      x = np.sin(p["freq"] * (x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]))
    alpha = np.log(100.0) / np.linspace(1.5, 0.3, 6)  # slow to fast decay over the channels
    rows.append((x @ p["out"]["kernel"]).reshape(2, 6) * np.exp(-abs(t) * alpha))
  np.testing.assert_allclose(h, np.stack(rows, 1).reshape(2, 7, 2, 3), rtol=1e-5, atol=1e-6)


def test_attention_layer_runs_hyena_with_its_weights():
  x = ref.normal(0, (2, 12, 16))
  layer = layers.Attention(num_heads=2, op="hyena", op_args=dict(order=3, grid=(3, 4),
                                                                  max_len=(4, 4)))
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  weights = nn.unbox(variables)["params"]["op_params"]
  assert weights["filter_bias"].shape == (3, 2, 8)
  assert weights["short_filters"].shape == (4, 3, 3, 2, 8)
  assert weights["gates"]["kernel"].shape == (16, 1, 2, 8)
  assert set(weights["implicit_filter"]) == {"Dense_0", "Dense_1", "freq", "out"}

  def loss(v):
    return jnp.sum(layer.apply(v, x) ** 2)

  grads = nn.unbox(jax.jit(jax.grad(loss))(variables))["params"]
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  with pytest.raises(ValueError, match="order"):
    layers.Attention(num_heads=2, op="hyena", op_args=dict(order=1)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="short_kernel"):
    layers.Attention(num_heads=2, op="hyena", op_args=dict(short_kernel=-1)).init(
        jax.random.key(0), x)


@pytest.mark.parametrize("is_causal", [True, False])
def test_packed_rows_equal_each_segment_alone(is_causal):
  """With `segment_ids`, the long and short convolutions stay within each segment: the packed
  row equals each segment run alone with its filters' taps (forward and gradients)."""
  length, n, d = 12, 4, 8
  taps = length if is_causal else 2 * length - 1
  filters = ref.normal(3, (2, taps, n, d), std=0.3)
  args = dict(filter_bias=ref.normal(4, (2, n, d)),
              short_filters=ref.normal(6, (3, 3, n, d), std=0.5))

  def segment_args(m):
    taps = slice(0, m) if is_causal else slice(length - m, length + m - 1)
    return dict(args, filters=filters[:, taps])

  op_checks.assert_packed_rows_match_segments(
      ops.get("hyena"), dict(args, filters=filters), segment_args, is_causal=is_causal)
  with pytest.raises(ValueError, match="segment_ids are packed 1-D sequences"):
    ops.get("hyena")(*ref.qkv(t=4), filters=ref.normal(0, (2, 3, 3, 4, 8)), grid=(2, 2),
                     segment_ids=jnp.zeros((2, 4), jnp.int32))
