"""`agent` (Agent Attention) and `latte` (Latte: Latent Attention for Linear Time
Transformers) against float64 references.

Each reference is written from the paper's formula with full `[q, kv]` matrices and masks built
by explicit NumPy loops, and evaluated in float64; it never calls `big_attn`.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
_qkv = functools.partial(ref.qkv, t=13)


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
  agent_v = jnp.einsum("bnas,bsnd->band", ref.masked_softmax(l2, kmask), vr)
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
  p_s = ref.masked_softmax(z[:, :, None], allowed[:, :, :, None, :])  # [b, n, t, L, s]
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


def test_latte_causal_ignores_the_future():
  op = jax.jit(functools.partial(ops.get("latte"), is_causal=True,
                                 latents=ref.normal(3, (4, 5, 8)), chunk_size=4))
  op_checks.assert_causal_ignores_future(op, _qkv(t=13, k=2), cut=7)


@pytest.mark.parametrize("is_causal", [False, True])
def test_latte_packed_rows_equal_separate_segments(is_causal):
  args = dict(latents=ref.normal(3, (4, 5, 8)), chunk_size=4)  # runs cross chunk borders
  op_checks.assert_packed_rows_match_segments(ops.get("latte"), args, lambda n: args,
                                              is_causal=is_causal, lengths=(3, 6, 4))


def test_latte_causal_segments_must_be_runs():
  q, k, v = _qkv(t=6, k=2)
  w = ref.normal(3, (4, 5, 8))
  op = ops.get("latte")
  with pytest.raises(ValueError, match="runs of equal ids"):
    op(q, k, v, latents=w, is_causal=True, segment_ids=jnp.asarray([[0, 0, 1, 1, 0, 0]] * 2))
  seg = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match="one \\[batch, seq\\] array"):
    op(q, k, v, latents=w, is_causal=True, segment_ids=(seg, seg))


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
# Both: bfloat16 inputs, default hyper-parameters.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["agent", "latte_causal"])
def test_bfloat16_inputs(name):
  q, k, v = _qkv(t=13, k=2, dtype=jnp.bfloat16)
  w = ref.normal(3, (4, 5, 8), jnp.bfloat16)
  cases = {
      "agent": (lambda q, k, v: ops.get("agent")(q, k, v, num_agents=4),
                lambda q, k, v: _agent_ref(q, k, v, _pool_ref(q, 4))),
      "latte_causal": (lambda q, k, v: ops.get("latte")(q, k, v, latents=w, is_causal=True,
                                                        chunk_size=4),
                       lambda q, k, v: _latte_ref(q, k, v, ref.f64(w), is_causal=True)),
  }
  op_fn, ref_fn = cases[name]
  ref.assert_matches(op_fn, ref_fn, [q, k, v], tol=BF16_TOL)
