"""Independent float64 references for the tests, written from the papers' formulas.

Nothing here calls `big_attn`: each reference repeats K/V heads explicitly, builds masks with
NumPy-style comparisons and evaluates the formula in float64 under `jax.enable_x64`.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


def f64(*xs):
  out = tuple(jnp.asarray(x).astype(jnp.float64) for x in xs)
  return out if len(out) > 1 else out[0]


def repeat_kv(x, num_heads):
  """`[b, s, k, d]` -> `[b, s, num_heads, d]` (each kv head repeated for its query group)."""
  return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def full_mask(b, h, t, s, *, mask=None, is_causal=False, segment_ids=None, window=None):
  """Boolean `[b, h, t, s]` from the masking arguments, in NumPy."""
  m = np.ones((b, h, t, s), bool)
  if mask is not None:
    m &= np.broadcast_to(np.asarray(mask), (b, h, t, s))
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  if is_causal:
    m &= (j <= i)[None, None]
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    m &= ((i - j <= left) & (j - i <= right))[None, None]
  if segment_ids is not None:
    qs, ks = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    m &= (np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :])[:, None]
  return m


def softmax_attention(q, k, v, *, bias=None, mask=None, scale=None, soft_cap=None):
  """softmax(scale·QKᵀ (soft-capped) + B, masked)V in float64; fully masked rows give 0."""
  q, k, v = f64(q, k, v)
  n = q.shape[2]
  k, v = repeat_kv(k, n), repeat_kv(v, n)
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  if bias is not None:
    s = s + f64(bias)
  if mask is None:
    p = jax.nn.softmax(s, axis=-1)
  else:
    s = jnp.where(mask, s, -1e300)
    e = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
  return jnp.einsum("bnts,bsnd->btnd", p, v)
