"""`neighborhood` (Neighborhood Attention Transformer; Dilated Neighborhood Attention
Transformer) against a float64 reference.

The reference builds NAT's neighbour lists and relative-position-bias indices by loops over
positions, one axis at a time, and evaluates full `[q, kv]` matrices in float64; it never calls
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


def _nat_axis(length, kernel, dilation, causal=False):
  """Per-position neighbour lists and bias indices along one axis, NAT's definition, by loops."""
  neighbours, bias_idx = [], []
  for i in range(length):
    members = [p for p in range(length) if p % dilation == i % dilation]
    j = members.index(i)
    if causal:
      window = list(range(max(0, j - kernel + 1), j + 1))
    else:
      start = min(max(j - kernel // 2, 0), len(members) - kernel)
      window = list(range(start, start + kernel))
    neighbours.append([members[m] for m in window])
    bias_idx.append([kernel - 1 + m - j for m in window])
  return neighbours, bias_idx


def _nat_mask_and_bias(shape, kernel, dilation, rpb, causal=False):
  """`[t, t]` neighbour mask and `[n, t, t]` bias (zeros off the neighbourhoods)."""
  t = int(np.prod(shape))
  n = 1 if rpb is None else rpb.shape[0]
  allowed = np.zeros((t, t), bool)
  index = []  # (query, key, *bias index)
  if len(shape) == 1:
    nb, bi = _nat_axis(shape[0], kernel, dilation, causal)
    for i in range(t):
      for key, idx in zip(nb[i], bi[i]):
        allowed[i, key] = True
        index.append((i, key, idx))
  else:
    (h, w), (kh, kw), (dh, dw) = shape, kernel, dilation
    nby, biy = _nat_axis(h, kh, dh)
    nbx, bix = _nat_axis(w, kw, dw)
    for y in range(h):
      for x in range(w):
        for ky, iy in zip(nby[y], biy[y]):
          for kx, ix in zip(nbx[x], bix[x]):
            allowed[y * w + x, ky * w + kx] = True
            index.append((y * w + x, ky * w + kx, iy, ix))
  if rpb is None:
    return allowed, None
  qi, ki = np.array([e[0] for e in index]), np.array([e[1] for e in index])
  vals = rpb[(slice(None),) + tuple(np.array([e[2 + a] for e in index])
                                    for a in range(len(shape)))]  # [n, entries]
  bias = jnp.zeros((n, t, t), rpb.dtype).at[:, qi, ki].set(vals)
  return allowed, bias


def _nat_ref(q, k, v, shape, kernel, dilation, rpb=None, causal=False, mask=None):
  b, t, n, d = q.shape
  allowed, bias = _nat_mask_and_bias(shape, kernel, dilation, rpb, causal)
  logits = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d)
  if bias is not None:
    logits = logits + bias[None]
  full = np.broadcast_to(allowed, (b, n, t, t))
  if mask is not None:
    full = full & np.asarray(mask)
  return jnp.einsum("bnts,bsnd->btnd", ref.masked_softmax(logits, full), ref.repeat_kv(v, n))


@pytest.mark.parametrize("kv_heads,kernel,dilation,causal", [
    (2, 5, 1, False), (1, 3, 3, False), (2, 3, 4, False), (1, 5, 2, True)])
def test_neighborhood_1d_matches_reference(kv_heads, kernel, dilation, causal):
  q, k, v = _qkv(t=13, k=kv_heads)
  rpb = ref.normal(3, (4, 2 * kernel - 1))
  op = ops.get("neighborhood")
  ref.assert_matches(
      lambda q, k, v, rpb: op(q, k, v, kernel_size=kernel, dilation=dilation, rpb=rpb,
                              is_causal=causal),
      lambda q, k, v, rpb: _nat_ref(q, k, v, (13,), kernel, dilation, rpb, causal),
      [q, k, v, rpb])


@pytest.mark.parametrize("kernel,dilation", [(3, (1, 2)), ((3, 5), 1)])
def test_neighborhood_2d_matches_reference(kernel, dilation):
  q, k, v = _qkv(t=35, k=2)
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
  rpb = ref.normal(3, (4, 2 * kh - 1, 2 * kw - 1))
  op = ops.get("neighborhood")
  ref.assert_matches(
      lambda q, k, v, rpb: op(q, k, v, kernel_size=kernel, dilation=dilation, grid=(5, 7),
                              rpb=rpb),
      lambda q, k, v, rpb: _nat_ref(q, k, v, (5, 7), (kh, kw), (dh, dw), rpb), [q, k, v, rpb])


def test_neighborhood_windows_are_full_and_centred():
  allowed, _ = _nat_mask_and_bias((13,), 5, 2, None)
  assert np.all(allowed.sum(1) == 5)
  # an interior query sees the two group members on each side of it
  assert set(np.flatnonzero(allowed[6])) == {2, 4, 6, 8, 10}
  # kernel = length, no dilation: plain softmax attention
  q, k, v = _qkv(t=13, k=2)
  out = jax.jit(functools.partial(ops.get("neighborhood"), kernel_size=13))(q, k, v)
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v))
  np.testing.assert_allclose(np.asarray(out), want, **F32_TOL)


def test_neighborhood_mask_and_empty_rows():
  q, k, v = _qkv(t=13, k=2)
  rng = np.random.default_rng(4)
  m = rng.random((2, 4, 13, 13)) > 0.3
  m[0, 1, 5] = False
  mask = jnp.asarray(m)
  op = ops.get("neighborhood")
  out = ref.assert_matches(lambda q, k, v: op(q, k, v, kernel_size=5, dilation=2, mask=mask),
                        lambda q, k, v: _nat_ref(q, k, v, (13,), 5, 2, mask=mask), [q, k, v])
  assert np.all(out[0, 5, 1] == 0.0)


def test_neighborhood_bad_args():
  q, k, v = _qkv(t=13, k=2)
  op = ops.get("neighborhood")
  q7, _, _ = _qkv(t=7, s=13, k=2)
  with pytest.raises(ValueError, match="q_len must equal kv_len"):
    op(q7, k, v, kernel_size=3)
  with pytest.raises(ValueError, match="kernel_size \\* dilation"):
    op(q, k, v, kernel_size=5, dilation=3)
  with pytest.raises(ValueError, match="odd"):
    op(q, k, v, kernel_size=4)
  with pytest.raises(ValueError, match="grid"):
    op(q, k, v, kernel_size=3, grid=(3, 4))
  q35, k35, v35 = _qkv(t=35, k=2)
  with pytest.raises(NotImplementedError, match="causal"):
    op(q35, k35, v35, kernel_size=3, grid=(5, 7), is_causal=True)
  with pytest.raises(ValueError, match="rpb"):
    op(q35, k35, v35, kernel_size=3, grid=(5, 7), rpb=jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="dilation"):
    op(q, k, v, kernel_size=3, dilation=0)


def test_neighborhood_causal_ignores_the_future():
  op = jax.jit(functools.partial(ops.get("neighborhood"), is_causal=True, kernel_size=3,
                                 dilation=2, rpb=ref.normal(4, (4, 5))))
  op_checks.assert_causal_ignores_future(op, _qkv(t=13, k=2), cut=7)


def test_neighborhood_bfloat16_inputs():
  """bfloat16 inputs, the default dilation."""
  q, k, v = _qkv(t=13, k=2, dtype=jnp.bfloat16)
  ref.assert_matches(lambda q, k, v: ops.get("neighborhood")(q, k, v, kernel_size=5),
                     lambda q, k, v: _nat_ref(q, k, v, (13,), 5, 1), [q, k, v], tol=BF16_TOL)


@pytest.mark.parametrize("length,grid,kernel,dilation,causal", [
    (13, None, 5, 2, False), (13, None, 3, 4, True), (30, (5, 6), (3, 3), (1, 2), False)])
def test_neighborhood_block_terms_at_any_positions(length, grid, kernel, dilation, causal):
  """The sequence-parallel block form's window and bias, read at shuffled query and key
  positions (as a striped block sees them), equal NAT's loop-built ones at those positions."""
  shape = (length,) if grid is None else grid
  n = 2
  rpb = ref.normal(5, (n,) + tuple(2 * k - 1 for k in np.atleast_1d(kernel)))
  q, k, _ = ref.qkv(b=1, t=length, n=n, k=n, d=4)
  form = ops.spec("neighborhood").block_form(q, k, None, kernel_size=kernel, dilation=dilation,
                                             grid=grid, rpb=rpb)
  allowed, bias = _nat_mask_and_bias(shape, kernel, dilation, rpb, causal)
  rng = np.random.default_rng(length)
  q_pos, k_pos = rng.permutation(length)[:7], rng.permutation(length)
  got_bias, multiplier, visible = jax.jit(functools.partial(
      form.pair_terms.fn, is_causal=causal, **dict(form.pair_terms.static)))(
          form.pair_arrays, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32))
  want = allowed[np.ix_(q_pos, k_pos)]
  assert multiplier is None
  np.testing.assert_array_equal(visible, want)
  np.testing.assert_allclose(np.where(want, got_bias, 0.0),
                             np.asarray(bias)[:, q_pos][:, :, k_pos], rtol=1e-6)


def _circle_ref(q, k, v, shape, radius):
  """CLEAR's circular window by loops: query i sees the keys within distance `radius`."""
  b, t, n, d = q.shape
  coords = [np.unravel_index(i, shape) for i in range(t)]
  allowed = np.array([[sum((a - c) ** 2 for a, c in zip(coords[i], coords[j])) <= radius ** 2
                       for j in range(t)] for i in range(t)])
  logits = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d)
  return jnp.einsum("bnts,bsnd->btnd",
                    ref.masked_softmax(logits, np.broadcast_to(allowed, (b, n, t, t))),
                    ref.repeat_kv(v, n))


@pytest.mark.parametrize("shape,radius", [((13,), 2), ((5, 7), 1.5), ((5, 7), 2.3)])
def test_neighborhood_circular_window_matches_reference(shape, radius):
  q, k, v = _qkv(t=int(np.prod(shape)), k=2)
  grid = shape if len(shape) == 2 else None
  op = ops.get("neighborhood")
  ref.assert_matches(lambda q, k, v: op(q, k, v, grid=grid, radius=radius),
                     lambda q, k, v: _circle_ref(q, k, v, shape, radius), [q, k, v])

  form = ops.spec("neighborhood").block_form(q, k, None, grid=grid, radius=radius)
  rng = np.random.default_rng(0)
  q_pos, k_pos = rng.permutation(q.shape[1])[:7], rng.permutation(q.shape[1])
  bias, multiplier, visible = jax.jit(functools.partial(
      form.pair_terms.fn, is_causal=False, **dict(form.pair_terms.static)))(
          form.pair_arrays, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32))
  coords = np.stack(np.unravel_index(np.arange(q.shape[1]), shape), -1)
  distance2 = ((coords[q_pos][:, None] - coords[k_pos][None]) ** 2).sum(-1)
  assert bias is None and multiplier is None
  np.testing.assert_array_equal(visible, distance2 <= radius ** 2)


def test_neighborhood_circular_window_bad_args():
  q, k, v = _qkv(t=35, k=2)
  op = ops.get("neighborhood")
  for kwargs, message in ((dict(kernel_size=3), "no kernel_size"),
                          (dict(dilation=2), "no dilation"),
                          (dict(rpb=jnp.zeros((4, 5, 5))), "no rpb")):
    with pytest.raises(ValueError, match=message):
      op(q, k, v, grid=(5, 7), radius=2, **kwargs)
  with pytest.raises(ValueError, match="no is_causal"):
    op(q, k, v, radius=2, is_causal=True)
  with pytest.raises(ValueError, match="radius must be a positive number"):
    op(q, k, v, grid=(5, 7), radius=0)
