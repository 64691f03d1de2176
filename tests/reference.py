"""Independent float64 references for the tests, written from the papers' formulas.

Nothing here calls `big_attn`: each reference repeats K/V heads explicitly, builds masks with
NumPy-style comparisons and evaluates the formula in float64 under `jax.enable_x64`.
"""
import contextlib
import math

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


def sage_attention(q, k, v, block_q, block_k, mask, is_causal=False):
  """SageAttention in NumPy: smoothed K, symmetric int8 per (block, head), dequantised
  scores; float64 elsewhere.

  Causal: each token's scale is the max over its block up to itself; key block r is smoothed
  with μ_r = mean(k_0..k_{r·block_k}) and q·μ_r is added back to the scores.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s = k.shape[:2]
  if is_causal:
    starts = np.arange(s) // block_k * block_k
    mean = np.stack([k[:, :p + 1].mean(axis=1) for p in starts], axis=1)
  else:
    mean = np.broadcast_to(k.mean(axis=1, keepdims=True), k.shape)

  def quantize(x, block):
    out = np.empty_like(x)
    for i in range(x.shape[1]):
      start = i // block * block
      end = i + 1 if is_causal else start + block
      scale = np.abs(x[:, start:end]).max(axis=(1, 3), keepdims=True) / 127.0
      scale = np.where(scale == 0.0, 1.0, scale)  # An all-zero block stays zero.
      out[:, i:i + 1] = np.clip(np.round(x[:, i:i + 1] / scale), -127, 127) * scale
    return out

  qd, kd = quantize(q, block_q), quantize(k - mean, block_k)
  # Scores qd·kd + q·μ_j as one dot product over concatenated features.
  with x64():
    return np.asarray(softmax_attention(
        np.concatenate([qd, q], -1), np.concatenate([kd, mean], -1), v, mask=mask,
        scale=1.0 / np.sqrt(q.shape[-1])))


F32_TOL = dict(rtol=1e-4, atol=1e-4)
BF16_TOL = dict(rtol=5e-2, atol=5e-2)


def normal(seed, shape, dtype=jnp.float32, std=1.0):
  """A seeded standard-normal array (NumPy's generator, so independent of JAX's PRNG)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * std, dtype)


def qkv(*, b=2, t, s=None, n=4, k=2, d=8, dv=None, dtype=jnp.float32, seed=0, std=1.0):
  """Seeded query `[b, t, n, d]`, key `[b, s, k, d]` and value `[b, s, k, dv]` (s = t, dv = d
  unless given), from seeds `seed`, `seed + 1`, `seed + 2`."""
  s = t if s is None else s
  dv = d if dv is None else dv
  return (normal(seed, (b, t, n, d), dtype, std), normal(seed + 1, (b, s, k, d), dtype, std),
          normal(seed + 2, (b, s, k, dv), dtype, std))


def rigid_transforms(seed, shape):
  """`[*shape, 4, 4]` random SE(3) matrices [[R, t], [0, 1]], float64."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=shape + (3, 3)))
  rotation *= np.sign(np.linalg.det(rotation))[..., None, None]
  matrices = np.zeros(shape + (4, 4))
  matrices[..., :3, :3], matrices[..., :3, 3] = rotation, rng.normal(size=shape + (3,)) * 0.5
  matrices[..., 3, 3] = 1.0
  return matrices


def key_padding(b, s, seed=5, *, first_valid=False, invalid=None):
  """Seeded `[b, 1, 1, s]` key-padding mask, each key valid with probability 0.7.

  `first_valid` keeps key 0 of every example; then `invalid` (a NumPy index into `[b, s]`)
  is set invalid.
  """
  valid = np.random.default_rng(seed).random((b, s)) > 0.3
  if first_valid:
    valid[:, 0] = True
  if invalid is not None:
    valid[invalid] = False
  return valid[:, None, None, :]


def masked_softmax(logits, mask):
  """Softmax over the last axis (float64), restricted to `mask`; fully masked rows give zeros."""
  top = jnp.where(mask, logits, -jnp.inf).max(-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def attention_logits(q, k, scale=None):
  """`[b, n, t, s]` scale·QKᵀ in float64, K/V heads repeated; scale defaults to 1/√d."""
  q, k = f64(q, k)
  k = repeat_kv(k, q.shape[2])
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  return jnp.einsum("btnd,bsnd->bnts", q, k) * scale


def out_and_grads(fn, arrays, seed=7):
  """`fn(*arrays)` and the gradients of `Σ fn(*arrays)·c` (c fixed, random), in one jit."""
  shape = jax.eval_shape(fn, *arrays).shape
  cot = np.random.default_rng(seed).normal(size=shape)

  def run(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(jnp.asarray(cot, out.dtype))

  return jax.jit(run)(*arrays)


def assert_matches(op_fn, ref_fn, arrays, tol=F32_TOL):
  """Forward and gradients wrt every array of `op_fn(*arrays)` vs `ref_fn` in float64.

  Returns the op's output.
  """
  out, grads = out_and_grads(op_fn, arrays)
  with x64():
    want, want_grads = out_and_grads(ref_fn, [jnp.asarray(a).astype(jnp.float64)
                                              for a in arrays])
    want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
  assert out.dtype == arrays[0].dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), want, **tol)
  for i, (g, w) in enumerate(zip(grads, want_grads)):
    assert np.all(np.isfinite(np.asarray(g, np.float64))), f"non-finite gradient of arg {i}"
    np.testing.assert_allclose(np.asarray(g, np.float64), w, err_msg=f"gradient of arg {i}",
                               **tol)
  return np.asarray(out, np.float64)


def ddim(eps_fn, x, num_steps, num_timesteps=1000, clip=False):
  """Deterministic DDIM (η = 0) in float64 NumPy, written from the DDIM update."""
  betas = np.linspace(1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps, num_timesteps)
  ab = np.cumprod(1 - betas)
  steps = [i * num_timesteps // num_steps for i in range(num_steps)]
  x = np.asarray(x, np.float64)
  for i in reversed(range(num_steps)):
    a = ab[steps[i]]
    a_prev = ab[steps[i - 1]] if i > 0 else 1.0
    eps = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), steps[i]), np.float64)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip:
      x0 = np.clip(x0, -1, 1)
      eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
  return x
