"""`agent`, `latte`, `neighborhood` and `retention` ops against float64 references.

Each reference is written from the paper's formula with full `[q, kv]` matrices, masks and decay
matrices built by explicit NumPy loops, and evaluated in float64; it never calls `big_attn`.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL


def _qkv(b=2, t=13, s=None, n=4, k=2, d=8, dtype=jnp.float32, seed=0):
  s = t if s is None else s
  return (ref.normal(seed, (b, t, n, d), dtype), ref.normal(seed + 1, (b, s, k, d), dtype),
          ref.normal(seed + 2, (b, s, k, d), dtype))


def _masked_softmax64(logits, mask):
  """Softmax over the last axis of float64 logits, masked; fully masked rows give zeros."""
  top = jnp.where(mask, logits, -jnp.inf).max(-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def _padding_mask(b, t, s, seed=5):
  """Outer-product padding mask `[b, 1, t, s]`: query 2 of batch 0 and some keys are invalid."""
  rng = np.random.default_rng(seed)
  kvalid = rng.random((b, s)) > 0.3
  kvalid[:, 0] = True
  qvalid = np.ones((b, t), bool)
  qvalid[0, 2] = False
  return qvalid[:, None, :, None] & kvalid[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# Agent attention.
# ----------------------------------------------------------------------------------------------
def _adaptive_bins(length, size):
  return [(math.floor(i * length / size), math.ceil((i + 1) * length / size))
          for i in range(size)]


def _pool_ref(q, num_agents, grid=None):
  """Adaptive average pooling of `[b, t, n, d]` with explicit loops over PyTorch's bins."""
  if grid is None:
    return jnp.stack([q[:, a:e].mean(1) for a, e in _adaptive_bins(q.shape[1], num_agents)], 1)
  (h, w), (ph, pw) = grid, num_agents
  img = q.reshape(q.shape[0], h, w, *q.shape[2:])
  return jnp.stack([img[:, y0:y1, x0:x1].mean((1, 2)) for y0, y1 in _adaptive_bins(h, ph)
                    for x0, x1 in _adaptive_bins(w, pw)], 1)


def _dwc_ref(v, kernel, bias, grid=None):
  """'same' depthwise cross-correlation over the sequence or the grid, explicit offsets."""
  b, s, k, dv = v.shape
  shape = (s,) if grid is None else grid
  img = v.reshape(b, *shape, k, dv)
  out = jnp.zeros_like(img)
  ksz = kernel.shape[:len(shape)]
  for offs in np.ndindex(*ksz):
    shifts = [o - kk // 2 for o, kk in zip(offs, ksz)]
    padded = jnp.pad(img, [(0, 0)] + [(kk // 2, kk // 2) for kk in ksz] + [(0, 0), (0, 0)])
    window = padded[(slice(None),) + tuple(slice(kk // 2 + sh, kk // 2 + sh + n)
                                           for kk, sh, n in zip(ksz, shifts, shape))]
    out = out + window * kernel[offs]
  out = out + (0.0 if bias is None else bias)
  return out.reshape(b, s, k, dv)


def _agent_ref(q, k, v, agents, *, b1=None, b2=None, mask=None, kernel=None, dwc_bias=None,
               grid=None):
  n = q.shape[2]
  kr, vr = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  s = 1.0 / np.sqrt(q.shape[-1])
  l2 = jnp.einsum("band,bsnd->bnas", agents, kr) * s + (0.0 if b2 is None else b2)
  l1 = jnp.einsum("btnd,band->bnta", q, agents) * s + (0.0 if b1 is None else b1)
  kmask = np.ones(l2.shape, bool) if mask is None else np.asarray(mask).any(2, keepdims=True)
  agent_v = jnp.einsum("bnas,bsnd->band", _masked_softmax64(l2, kmask), vr)
  out = jnp.einsum("bnta,band->btnd", jax.nn.softmax(l1, -1), agent_v)
  if kernel is not None:
    out = out + ref.repeat_kv(_dwc_ref(v, kernel, dwc_bias, grid), n)
  if mask is not None:
    rows = np.asarray(mask).any(-1)  # [b, 1|n, t]
    out = jnp.where(np.moveaxis(rows, 1, 2)[..., None], out, 0.0)
  return out


@pytest.mark.parametrize("kv_heads,t,s", [(2, 13, 9), (1, 13, 13)])
def test_agent_pooled_matches_reference(kv_heads, t, s):
  """Pooled agents, both biases; with q_len == kv_len also the 1-D DWC(V) term."""
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  b1, b2 = ref.normal(3, (1, 4, t, 5), std=0.5), ref.normal(4, (2, 4, 5, s), std=0.5)
  kernel = ref.normal(13, (5, kv_heads, 8), std=0.3) if t == s else None
  op = ops.get("agent")
  ref.assert_matches(
      lambda q, k, v, b1, b2: op(q, k, v, num_agents=5, query_agent_bias=b1, agent_key_bias=b2,
                                 dwc_kernel=kernel),
      lambda q, k, v, b1, b2: _agent_ref(q, k, v, _pool_ref(q, 5), b1=b1, b2=b2,
                                         kernel=None if kernel is None else ref.f64(kernel)),
      [q, k, v, b1, b2])


def test_agent_given_tokens_and_padding_mask():
  q, k, v = _qkv(t=11, s=9, k=2)
  agents = ref.normal(9, (2, 4, 4, 8))
  mask = jnp.asarray(_padding_mask(2, 11, 9))
  op = ops.get("agent")
  out = ref.assert_matches(lambda q, k, v, a: op(q, k, v, agent_tokens=a, mask=mask),
                        lambda q, k, v, a: _agent_ref(q, k, v, a, mask=mask), [q, k, v, agents])
  np.testing.assert_array_equal(out[0, 2], 0.0)


def test_agent_2d_pooling_and_dwc():
  q, k, v = _qkv(t=35, k=2)
  kernel, bias = ref.normal(11, (3, 3, 2, 8), std=0.3), ref.normal(12, (2, 8), std=0.3)
  op = ops.get("agent")
  ref.assert_matches(
      lambda q, k, v, kern, bias: op(q, k, v, num_agents=(2, 3), grid=(5, 7), dwc_kernel=kern,
                                     dwc_bias=bias),
      lambda q, k, v, kern, bias: _agent_ref(q, k, v, _pool_ref(q, (2, 3), (5, 7)),
                                             kernel=kern, dwc_bias=bias, grid=(5, 7)),
      [q, k, v, kernel, bias])


def test_agent_bad_args():
  q, k, v = _qkv(t=9, k=2)
  op = ops.get("agent")
  with pytest.raises(NotImplementedError, match="agent"):
    op(q, k, v, num_agents=3, is_causal=True)
  with pytest.raises(ValueError, match="num_agents"):
    op(q, k, v, num_agents=10)  # more agents than the 9 queries
  with pytest.raises(ValueError, match="num_agents"):
    op(q, k, v, num_agents=5, grid=(3, 3))
  with pytest.raises(ValueError, match="agent_tokens"):
    op(q, k, v, agent_tokens=jnp.zeros((2, 3, 2, 8)))
  with pytest.raises(ValueError, match="dwc_kernel"):
    op(q, k, v, num_agents=3, dwc_kernel=jnp.zeros((3, 4, 8)))
  with pytest.raises(ValueError, match="agent_key_bias"):
    op(q, k, v, num_agents=3, agent_key_bias=jnp.zeros((1, 4, 2, 9)))
  with pytest.raises(ValueError, match="key-padding masks"):
    op(q, k, v, num_agents=3, mask=jnp.tril(jnp.ones((9, 9), bool))[None, None])


# ----------------------------------------------------------------------------------------------
# Latte.
# ----------------------------------------------------------------------------------------------
def _latte_ref(q, k, v, w, *, is_causal=False, mask=None):
  """y_t = Σ_l softmax_l(q_t·w_l) Σ_s softmax_s(k_s·w_l) v_s over the allowed s (full matrix)."""
  b, t, n, d = q.shape
  s_len = k.shape[1]
  kr, vr = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  s = 1.0 / np.sqrt(d)
  p_l = jax.nn.softmax(jnp.einsum("btnd,nld->bntl", q, w) * s, -1)  # [b, n, t, L]
  z = jnp.einsum("bsnd,nld->bnls", kr, w) * s  # [b, n, L, s]
  allowed = np.ones((b, n, t, s_len), bool)
  if mask is not None:
    allowed &= np.asarray(mask).any(2, keepdims=True)
  for i in range(t):
    for j in range(s_len):
      if is_causal and j > i:
        allowed[:, :, i, j] = False
  p_s = _masked_softmax64(z[:, :, None], allowed[:, :, :, None, :])  # [b, n, t, L, s]
  out = jnp.einsum("bntl,bntls,bsnd->btnd", p_l, p_s, vr)
  if mask is not None:
    rows = (np.asarray(mask) & allowed).any(-1)
    out = jnp.where(np.moveaxis(rows, 1, 2)[..., None], out, 0.0)
  return out


@pytest.mark.parametrize("kv_heads,is_causal,t,s,chunk", [
    (2, False, 13, 13, 64), (1, False, 9, 13, 64), (2, True, 13, 13, 5)])
def test_latte_matches_reference(kv_heads, is_causal, t, s, chunk):
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  w = ref.normal(3, (4, 5, 8))
  op = ops.get("latte")
  ref.assert_matches(
      lambda q, k, v, w: op(q, k, v, latents=w, is_causal=is_causal, chunk_size=chunk),
      lambda q, k, v, w: _latte_ref(q, k, v, w, is_causal=is_causal), [q, k, v, w])


@pytest.mark.parametrize("is_causal", [False, True])
def test_latte_padding_mask_and_empty_rows(is_causal):
  q, k, v = _qkv(t=13, k=1)
  w = ref.normal(3, (4, 6, 8))
  m = _padding_mask(2, 13, 13)
  m[1, :, :, :3] = False  # batch 1: the first causal rows see no key at all
  mask = jnp.asarray(m)
  op = ops.get("latte")
  out = ref.assert_matches(
      lambda q, k, v, w: op(q, k, v, latents=w, is_causal=is_causal, mask=mask, chunk_size=4),
      lambda q, k, v, w: _latte_ref(q, k, v, w, is_causal=is_causal, mask=mask), [q, k, v, w])
  assert np.all(out[0, 2] == 0.0)
  if is_causal:
    assert np.all(out[1, :3] == 0.0)


def test_latte_causal_chunked_is_stable_for_large_logits():
  q, k, v = _qkv(t=13, k=2)
  w = ref.normal(3, (4, 5, 8), std=60.0)  # key logits spread over hundreds: exp over/underflows
  op = ops.get("latte")
  out = jax.jit(functools.partial(op, is_causal=True, chunk_size=3))(q, k, v, latents=w)
  with ref.x64():
    want = np.asarray(_latte_ref(*ref.f64(q, k, v, w), is_causal=True))
  np.testing.assert_allclose(np.asarray(out), want, **F32_TOL)


@pytest.mark.parametrize("name,args", [
    ("latte", lambda: dict(latents=ref.normal(3, (4, 5, 8)), chunk_size=4)),
    ("neighborhood", lambda: dict(kernel_size=3, dilation=2, rpb=ref.normal(4, (4, 5)))),
    ("retention", lambda: dict()),
])
def test_causal_ops_ignore_the_future(name, args):
  q, k, v = _qkv(t=13, k=2)
  op = jax.jit(functools.partial(ops.get(name), is_causal=True, **args()))
  out = op(q, k, v)
  q2, k2, v2 = (x.at[:, 7:].set(ref.normal(20 + i, x[:, 7:].shape)) for i, x in enumerate((q, k, v)))
  out2 = op(q2, k2, v2)
  np.testing.assert_allclose(np.asarray(out[:, :7]), np.asarray(out2[:, :7]), rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(np.asarray(out[:, 7:]), np.asarray(out2[:, 7:]))


def test_latte_bad_args():
  q, k, v = _qkv(t=9, k=2)
  op = ops.get("latte")
  with pytest.raises(ValueError, match="latents"):
    op(q, k, v)
  with pytest.raises(ValueError, match="latents"):
    op(q, k, v, latents=jnp.zeros((2, 5, 8)))
  with pytest.raises(ValueError, match="num_latents"):
    op(q, k, v, latents=jnp.zeros((4, 5, 8)), num_latents=6)
  with pytest.raises(ValueError, match="chunk_size"):
    op(q, k, v, latents=jnp.zeros((4, 5, 8)), chunk_size=0)
  q2, _, _ = _qkv(t=7, s=9, k=2)
  with pytest.raises(ValueError, match="q_len == kv_len"):
    op(q2, k, v, latents=jnp.zeros((4, 5, 8)), is_causal=True)
  causal = jnp.tril(jnp.ones((9, 9), bool))[None, None]
  with pytest.raises(ValueError, match="is_causal=True"):  # a causal mask is no padding mask
    op(q, k, v, latents=jnp.zeros((4, 5, 8)), mask=causal)
  out = op(q, k, v, latents=ref.normal(1, (4, 5, 8)), mask=causal, is_causal=True)
  want = op(q, k, v, latents=ref.normal(1, (4, 5, 8)), is_causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_latte_layer_inits_and_runs():
  x = ref.normal(0, (2, 13, 32))
  layer = layers.Attention(num_heads=4, op="latte", op_args=dict(num_latents=8))
  params = jax.jit(layer.init)(jax.random.key(0), x)
  latents = params["params"]["op_params"]["latents"]
  assert isinstance(latents, nn.LogicallyPartitioned)
  assert latents.names == ("heads", "latents", "head_dim")
  assert latents.value.shape == (4, 8, 8)
  for causal in (False, True):
    y = jax.jit(functools.partial(layer.apply, is_causal=causal))(params, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  with pytest.raises(ValueError, match="num_latents"):
    layers.Attention(num_heads=4, op="latte", op_args=dict(num_latents=0)).init(
        jax.random.key(0), x)


# ----------------------------------------------------------------------------------------------
# Neighborhood attention.
# ----------------------------------------------------------------------------------------------
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
  return jnp.einsum("bnts,bsnd->btnd", _masked_softmax64(logits, full), ref.repeat_kv(v, n))


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


# ----------------------------------------------------------------------------------------------
# Retention.
# ----------------------------------------------------------------------------------------------
def _retention_ref(q, k, v, gamma, *, is_causal=False, mask=None):
  """RetNet's parallel retention with D̃ = D/sqrt(rowsum D) and R/max(|rowsum R|, 1)."""
  b, t, n, d = q.shape
  s_len = k.shape[1]
  allowed = np.ones((b, n, t, s_len), bool) if mask is None else np.broadcast_to(
      np.asarray(mask), (b, n, t, s_len)).copy()
  expo = np.zeros((t, s_len))
  for i in range(t):
    for j in range(s_len):
      expo[i, j] = abs(i - j)
      if is_causal and j > i:
        allowed[:, :, i, j] = False
  decay = jnp.where(allowed, gamma[None, :, None, None] ** expo, 0.0)
  decay = decay / jnp.sqrt(jnp.maximum(decay.sum(-1, keepdims=True), 1e-300))
  r = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d) * decay
  r = r / jnp.maximum(jnp.abs(r.sum(-1, keepdims=True)), 1.0)
  return jnp.einsum("bnts,bsnd->btnd", r, ref.repeat_kv(v, n))


def _manhattan_ref(q, k, v, gamma, h, w, *, renormalize=True, mask=None):
  b, t, n, d = q.shape
  dist = np.zeros((t, t))
  for p in range(t):
    for r in range(t):
      dist[p, r] = abs(p // w - r // w) + abs(p % w - r % w)
  decay = gamma[:, None, None] ** dist  # [n, t, t]
  logits = jnp.einsum("btnd,bsnd->bnts", q, ref.repeat_kv(k, n)) / np.sqrt(d)
  full = np.ones((b, n, t, t), bool) if mask is None else np.broadcast_to(mask, (b, n, t, t))
  if renormalize:
    weights = _masked_softmax64(logits + jnp.log(decay), full)
  else:
    weights = _masked_softmax64(logits, full) * decay
  return jnp.einsum("bnts,bsnd->btnd", weights, ref.repeat_kv(v, n))


@pytest.mark.parametrize("kv_heads,is_causal,t,s", [(2, True, 13, 13), (1, False, 13, 13),
                                                   (2, False, 9, 13)])
def test_retention_1d_matches_reference(kv_heads, is_causal, t, s):
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  op = ops.get("retention")
  gamma = jnp.asarray([0.5, 0.7, 0.9, 1.0], jnp.float32)
  ref.assert_matches(lambda q, k, v, g: op(q, k, v, is_causal=is_causal, gamma=g),
                  lambda q, k, v, g: _retention_ref(q, k, v, g, is_causal=is_causal),
                  [q, k, v, gamma])


def test_retention_chunkwise_matches_reference():
  q, k, v = _qkv(t=13, k=1)
  gamma = jnp.asarray([0.5, 0.7, 0.9, 1.0], jnp.float32)
  op = ops.get("retention")
  ref.assert_matches(lambda q, k, v, g: op(q, k, v, is_causal=True, gamma=g, chunk_size=4),
                  lambda q, k, v, g: _retention_ref(q, k, v, g, is_causal=True),
                  [q, k, v, gamma])


def test_retention_1d_mask_and_empty_rows():
  q, k, v = _qkv(t=13, k=2)
  m = np.random.default_rng(4).random((2, 1, 13, 13)) > 0.3
  m[1, 0, 4] = False
  mask = jnp.asarray(m)
  op = ops.get("retention")
  out = ref.assert_matches(
      lambda q, k, v: op(q, k, v, gamma=0.8, is_causal=True, mask=mask),
      lambda q, k, v: _retention_ref(q, k, v, jnp.full((4,), 0.8), is_causal=True, mask=mask),
      [q, k, v])
  assert np.all(out[1, 4] == 0.0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_retention_2d_manhattan_matches_reference(renormalize):
  q, k, v = _qkv(t=35, k=2)
  gamma = jnp.asarray([0.6, 0.75, 0.85, 0.95], jnp.float32)
  m = np.random.default_rng(4).random((2, 1, 35, 35)) > 0.2
  m[0, 0, 3] = False
  mask = jnp.asarray(m)
  op = ops.get("retention")
  out = ref.assert_matches(
      lambda q, k, v, g: op(q, k, v, gamma=g, grid=(5, 7), renormalize=renormalize, mask=mask),
      lambda q, k, v, g: _manhattan_ref(q, k, v, g, 5, 7, renormalize=renormalize, mask=m),
      [q, k, v, gamma])
  assert np.all(out[0, 3] == 0.0)


def test_retention_bad_args():
  q, k, v = _qkv(t=35, k=2)
  op = ops.get("retention")
  with pytest.raises(NotImplementedError, match="causal"):
    op(q, k, v, grid=(5, 7), is_causal=True)
  with pytest.raises(ValueError, match="gamma"):
    op(q, k, v, gamma=1.5)
  with pytest.raises(ValueError, match="gamma"):
    op(q, k, v, gamma=jnp.ones((3,)))
  with pytest.raises(ValueError, match="grid"):
    op(q, k, v, grid=(5, 6))
  with pytest.raises(ValueError, match="chunk_size"):
    op(q, k, v, is_causal=True, chunk_size=4, mask=jnp.ones((1, 1, 35, 35), bool))
  with pytest.raises(ValueError, match="chunk_size"):
    op(q, k, v, chunk_size=4)


# ----------------------------------------------------------------------------------------------
# All four: bfloat16 inputs, default hyper-parameters.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["agent", "latte_causal", "neighborhood", "retention",
                                  "manhattan"])
def test_bfloat16_inputs(name):
  t = 35 if name == "manhattan" else 13
  q, k, v = _qkv(t=t, k=2, dtype=jnp.bfloat16)
  w = ref.normal(3, (4, 5, 8), jnp.bfloat16)
  g = jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(4)))  # the defaults: RetNet's
  g2 = jnp.asarray(1.0 - 2.0 ** (-2.0 - np.arange(4)))  # and RMT's (heads_range 4, 4 heads)
  cases = {
      "agent": (lambda q, k, v: ops.get("agent")(q, k, v, num_agents=4),
                lambda q, k, v: _agent_ref(q, k, v, _pool_ref(q, 4))),
      "latte_causal": (lambda q, k, v: ops.get("latte")(q, k, v, latents=w, is_causal=True,
                                                        chunk_size=4),
                       lambda q, k, v: _latte_ref(q, k, v, ref.f64(w), is_causal=True)),
      "neighborhood": (lambda q, k, v: ops.get("neighborhood")(q, k, v, kernel_size=5),
                       lambda q, k, v: _nat_ref(q, k, v, (13,), 5, 1)),
      "retention": (lambda q, k, v: ops.get("retention")(q, k, v, is_causal=True),
                    lambda q, k, v: _retention_ref(q, k, v, g, is_causal=True)),
      "manhattan": (lambda q, k, v: ops.get("retention")(q, k, v, grid=(5, 7)),
                    lambda q, k, v: _manhattan_ref(q, k, v, g2, 5, 7)),
  }
  op_fn, ref_fn = cases[name]
  ref.assert_matches(op_fn, ref_fn, [q, k, v], tol=BF16_TOL)
