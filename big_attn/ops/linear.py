"""Linear (kernelised) attention: Performer, focused linear, log-normal, lightning and FAST.

Each op uses a kernel that factorises, κ(q, k) = φ_q(q)ᵀφ_k(k) ≥ 0, and computes

    out_i = Σ_j κ(q_i, k_j) v_j / Σ_j κ(q_i, k_j)          (lightning: no denominator)

without the `[q_len, kv_len]` matrix:

- non-causal: out_i = φ_q(q_i)ᵀ(Σ_j φ_k(k_j) v_jᵀ) / φ_q(q_i)ᵀΣ_j φ_k(k_j);
- causal: the sequence is cut into chunks of C tokens (padded internally to a multiple of C);
  inside a chunk the masked quadratic form (φ_q(Q_c)φ_k(K_c)ᵀ ⊙ M)V_c is used, the earlier chunks
  enter through a running state S = Σ_j φ_k(k_j)v_jᵀ and normaliser z = Σ_j φ_k(k_j), carried
  by `lax.scan` over the chunks. Cost O(n·C·m + n·m·d_v) for m features.

Masks: a key-padding mask (`mask.shape[2] == 1`, e.g. `[batch, 1, 1, kv_len]`) zeroes φ_k(k_j)
of the masked keys and keeps the linear form. A general `[.., q_len, kv_len]` mask or
`segment_ids` falls back to the exact quadratic form of the same kernel (O(q_len·kv_len)
memory). Query rows with nothing to attend to return zeros. Keys and values may have fewer
heads than queries (GQA): queries are grouped per kv head, K and V are never repeated. Inputs
of any floating dtype are computed in (at least) float32 and returned in the query's dtype.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params

Array = jax.Array

# Defaults shared by the ops and their recurrent state forms (`big_attn.ops.recurrent`).
CHUNK_SIZE = 64  # chunk length of the causal forms
FOCUSED_POWER = 3.0  # focused_linear's focusing power p (FLatten Transformer)
FOCUSED_EPS = 1e-6
LIGHTNING_BLOCK_SIZE = 64  # Lightning Attention-2's intra/inter block size
SRMS_EPS = 1e-6  # TransNormerLLM's SRMSNorm epsilon


# ------------------------------------------------------------------------------------------
# Argument checks.
# ------------------------------------------------------------------------------------------
def _check_broadcast_to(name: str, x: Array, target: tuple[int, ...], layout: str) -> None:
  if x.ndim > len(target) or any(
      size not in (1, want) for size, want in zip(x.shape[::-1], target[::-1])):
    raise ValueError(f"{name} must be broadcastable to {layout} = {target}, got shape {x.shape}")


def _compute_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


# ------------------------------------------------------------------------------------------
# Masks.
# ------------------------------------------------------------------------------------------
class _Masks(NamedTuple):
  """How masking is applied: key validity (linear form) or a full mask (quadratic form)."""
  key_valid: Array | None  # [b|1, kv_len, k|1, G] bool, G in {1, groups}
  full: Array | None       # [b|1, n|1, q_len, kv_len] bool


def _plan_masks(dims: common.Dims, mask, is_causal: bool, segment_ids) -> _Masks:
  if segment_ids is not None or (
      mask is not None and getattr(mask, "ndim", 0) == 4 and mask.shape[2] != 1):
    return _Masks(None, common.make_mask(dims, mask=mask, is_causal=is_causal,
                                         segment_ids=segment_ids))
  if mask is None:
    return _Masks(None, None)
  mask = common.make_mask(dims, mask=mask)  # Validates dtype and shape.
  valid = jnp.broadcast_to(mask[:, :, 0, :], (mask.shape[0], mask.shape[1], dims.kv_len))
  valid = jnp.swapaxes(valid, 1, 2)  # [b|1, s, n|1]
  kv_heads = dims.num_kv_heads if valid.shape[2] > 1 else 1
  return _Masks(valid.reshape(valid.shape[0], dims.kv_len, kv_heads,
                              valid.shape[2] // kv_heads), None)


def _stable_key_features(log_phi_k: Array, key_valid: Array | None, is_causal: bool,
                         prefix_max: Array | None = None) -> tuple[Array, Array | None]:
  """φ_k = exp(log φ_k − M) for `[b, s, k, m]` key log-features, and M for the causal form.

  Non-causal: M is one constant per (batch, kv head), the max over valid keys and features;
  it cancels in the ratio and only keeps exp() in range. Causal: a constant over all keys
  would see the future, so M_j is the prefix max over valid keys 0..j, `[b, s, k, 1]` (None
  is returned for the non-causal constant); `_linear_attention` then weighs key j for query i
  by exp(M_j − M_i) ≤ 1, and the per-row factor exp(M_i) cancels. Masked keys give M_j =
  `common.MASKED_LOGIT` until the first valid one. `prefix_max` `[b, k]` (causal only) is the
  max over earlier tokens not in `log_phi_k` (a carried state), MASKED_LOGIT if none.
  """
  if key_valid is not None:
    valid = jnp.any(key_valid, axis=-1)[..., None]
    log_phi_k = jnp.where(valid, log_phi_k, common.MASKED_LOGIT)
  if is_causal:
    top = jax.lax.cummax(jnp.max(log_phi_k, axis=3, keepdims=True,
                                 initial=common.MASKED_LOGIT), axis=1)
    if prefix_max is not None:
      top = jnp.maximum(top, prefix_max[:, None, :, None])
    top = jax.lax.stop_gradient(top)
    # Only masked keys exceed M (where M is still MASKED_LOGIT): 0, not an overflow.
    return jnp.exp(jnp.where(log_phi_k <= top, log_phi_k - top, 0.0)), top
  top = jnp.max(log_phi_k, axis=(1, 3), keepdims=True, initial=common.MASKED_LOGIT)
  top = jax.lax.stop_gradient(jnp.where(top > common.MASKED_LOGIT, top, 0.0))
  return jnp.exp(log_phi_k - top), None


def _key_scale(key_log_max: Array, q_len: int) -> Array:
  """exp(M_j − M_i) ≤ 1 for query i (M at min(i, kv_len − 1)) and key j ≤ i: `[b, t, s, k]`."""
  s = key_log_max.shape[1]
  m = key_log_max[..., 0]  # [b, s, k]
  m_q = m[:, jnp.minimum(jnp.arange(q_len), s - 1)]
  return jnp.exp(jnp.minimum(m[:, None] - m_q[:, :, None], 0.0))


def _zero_empty_rows(out: Array, masks: _Masks, dims: common.Dims, is_causal: bool) -> Array:
  """Zeros `[b, t, n, d]` rows that may attend to no key (needed where a term is added)."""
  if masks.full is not None:
    return common.apply_row_mask(out, masks.full, dims)
  if masks.key_valid is None:
    return out
  valid = masks.key_valid
  if is_causal:
    seen = jnp.cumsum(valid, axis=1) > 0
    has_key = seen[:, jnp.minimum(jnp.arange(dims.q_len), dims.kv_len - 1)]
  else:
    has_key = jnp.any(valid, axis=1, keepdims=True)
  b, t, n, d = out.shape
  groups = has_key.shape[-1]
  out = out.reshape(b, t, dims.num_kv_heads, groups, n // (dims.num_kv_heads * groups), d)
  out = jnp.where(has_key[..., None, None], out, jnp.zeros((), out.dtype))
  return out.reshape(b, t, n, d)


# ------------------------------------------------------------------------------------------
# The linear-attention core shared by all ops.
# ------------------------------------------------------------------------------------------
def _linear_attention(phi_q: Array, phi_k: Array, value: Array, dims: common.Dims,
                      masks: _Masks, *, is_causal: bool, chunk_size: int,
                      log_decay: Array | None = None, key_log_max: Array | None = None,
                      normalize: bool = True) -> Array:
  """Σ_j κ_ij v_j (/ Σ_j κ_ij) for κ_ij = λ^{i-j}·φ_q(q_i)ᵀφ_k(k_j).

  Args:
    phi_q: `[b, t, k, g, m]` query features, grouped by kv head.
    phi_k: `[b, s, k, m]` key features.
    value: `[b, s, k, dv]`.
    dims: sizes of the inputs.
    masks: from `_plan_masks`.
    is_causal: query i sees keys j <= i.
    chunk_size: tokens per chunk of the causal form.
    log_decay: None or `[k|1, g|1]`, log λ per query head (causal only).
    key_log_max: None or the causal prefix max M `[b, s, k, 1]` of `_stable_key_features`
      (causal only, without `log_decay`): κ_ij is weighed by exp(M_j − M_i).
    normalize: divide by the kernel's row sums (zero rows give zero).

  Returns:
    `[b, t, n, dv]` in the features' dtype.
  """
  b, t = phi_q.shape[:2]
  phi_q, phi_k, log_decay = _group_features(phi_q, phi_k, masks.key_valid, log_decay)
  if key_log_max is not None and dims.kv_len == 0:
    key_log_max = None  # No keys: nothing to weigh.
  if masks.full is not None:
    num, den = _quadratic(phi_q, phi_k, value, masks.full, dims, log_decay, key_log_max)
  elif is_causal:
    num, den, _ = _chunked(phi_q, phi_k, value, log_decay, chunk_size, key_log_max)
  else:
    num, den = _global(phi_q, phi_k, value)
  if normalize:
    num = _divide_rows(num, den)
  return num.reshape(b, t, dims.num_heads, dims.value_dim)


def _group_features(phi_q: Array, phi_k: Array, key_valid: Array | None,
                    log_decay: Array | None) -> tuple[Array, Array, Array | None]:
  """`[b, t, k, g, m]` queries -> `[b, t, k, G, g/G, m]`, `[b, s, k, m]` keys -> `[b, s, k, G, m]`
  (masked keys zeroed), log λ -> `[k, G]`: G is how many of a kv head's query heads need their
  own state (a per-head decay or a per-head key mask)."""
  b, t, k, g, m = phi_q.shape
  groups = 1
  if key_valid is not None:
    groups = max(groups, key_valid.shape[-1])
  if log_decay is not None:
    groups = max(groups, log_decay.shape[-1])
    log_decay = jnp.broadcast_to(log_decay, (k, groups))
  phi_q = phi_q.reshape(b, t, k, groups, g // groups, m)
  phi_k = phi_k[:, :, :, None, :]
  if key_valid is not None:
    phi_k = jnp.where(key_valid[..., None], phi_k, jnp.zeros((), phi_k.dtype))
  return phi_q, jnp.broadcast_to(phi_k, (b, phi_k.shape[1], k, groups, m)), log_decay


def _divide_rows(num: Array, den: Array) -> Array:
  """num / den over the last axis of `num`, rows with den = 0 (no key) giving num (zeros)."""
  return num / jnp.where(den == 0, jnp.ones((), den.dtype), den)[..., None]


def _global(phi_q, phi_k, value):
  """Non-causal linear form: φ_q(Q)(φ_k(K)ᵀV) and φ_q(Q)Σφ_k(K)."""
  kv = jnp.einsum("bskGm,bskd->bkGmd", phi_k, value)
  num = jnp.einsum("btkGhm,bkGmd->btkGhd", phi_q, kv)
  den = jnp.einsum("btkGhm,bkGm->btkGh", phi_q, jnp.sum(phi_k, axis=1))
  return num, den


def _quadratic(phi_q, phi_k, value, full_mask, dims, log_decay, key_log_max):
  """Exact quadratic form (φ_q(Q)φ_k(K)ᵀ ⊙ M ⊙ Λ)V for general masks and segment ids."""
  weights = jnp.einsum("btkGhm,bskGm->bkGhts", phi_q, phi_k)
  if key_log_max is not None:
    scale = _key_scale(key_log_max, dims.q_len)  # [b, t, s, k]
    weights = weights * jnp.transpose(scale, (0, 3, 1, 2))[:, :, None, None]
  mask = common.grouped(full_mask, dims)  # [b|1, k|1, g|1, t, s]
  if mask.shape[2] == 1:
    mask = mask[:, :, :, None]
  else:
    mask = mask.reshape(*mask.shape[:2], weights.shape[2], weights.shape[3], *mask.shape[3:])
  weights = jnp.where(mask, weights, jnp.zeros((), weights.dtype))
  if log_decay is not None:
    dist = jnp.maximum(jnp.arange(dims.q_len)[:, None] - jnp.arange(dims.kv_len)[None, :], 0)
    weights = weights * jnp.exp(log_decay[:, :, None, None, None] * dist)
  num = jnp.einsum("bkGhts,bskd->btkGhd", weights, value)
  den = jnp.moveaxis(jnp.sum(weights, axis=-1), -1, 1)
  return num, den


def _chunked(phi_q, phi_k, value, log_decay, chunk, key_log_max=None, initial=None):
  """Causal form: masked quadratic inside chunks, a state scanned across chunks.

  With `key_log_max` M the state is kept relative to M at the end of the last chunk and
  rescaled by exp(M_old − M_new) ≤ 1 as the prefix max grows (as an online softmax).
  `initial` is the carry `(S [b, k, G, m, dv], z [b, k, G, m], M [b, k])` of earlier tokens
  (zeros and MASKED_LOGIT when None). Returns num, den and the carry after the last chunk; with
  `log_decay` and a length that is not a multiple of `chunk` that carry is decayed over the
  padding too (λ^pad too small).
  """
  b, t, k, groups, h, m = phi_q.shape
  s, dv = value.shape[1], value.shape[-1]
  num_chunks = -(-max(t, s) // chunk)
  length = num_chunks * chunk

  def split(x, n):  # [b, n, ...] -> [num_chunks, b, chunk, ...], zero-padded.
    x = jnp.pad(x, [(0, 0), (0, length - n)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, num_chunks, chunk, *x.shape[2:]), 1, 0)

  qc, kc, vc = split(phi_q, t), split(phi_k, s), split(value, s)
  dtype = qc.dtype
  pos = jnp.arange(chunk)
  diff = pos[:, None] - pos[None, :]
  if log_decay is None:
    intra = (diff >= 0).astype(dtype)
    qc_state, kc_state = qc, kc
  else:
    intra = jnp.where(diff >= 0, jnp.exp(log_decay[..., None, None] * jnp.maximum(diff, 0)),
                      jnp.zeros((), dtype))[:, :, None]  # [k, G, 1, C, C]
    # A key at offset e of the previous chunk reaches offset c of this chunk after
    # (chunk - 1 - e) + (c + 1) steps; the state decays by λ^chunk per chunk in between.
    q_decay = jnp.moveaxis(jnp.exp(log_decay[..., None] * (pos + 1)), -1, 0)
    k_decay = jnp.moveaxis(jnp.exp(log_decay[..., None] * (chunk - 1 - pos)), -1, 0)
    qc_state = qc * q_decay[:, :, :, None, None]
    kc_state = kc * k_decay[:, :, :, None]
    chunk_decay = jnp.exp(log_decay * chunk)
  scores = jnp.einsum("nbckGhm,nbekGm->nbkGhce", qc, kc) * intra
  if key_log_max is None:
    mc = jnp.zeros((num_chunks, b, chunk, k), dtype)
  else:  # M per position (queries past kv_len use M at kv_len - 1), [n, b, C, k].
    mc = split(key_log_max[..., 0][:, jnp.minimum(jnp.arange(length), s - 1)], length)
    scale = jnp.exp(jnp.minimum(mc[:, :, None] - mc[:, :, :, None], 0.0))  # [n, b, c, e, k]
    scores = scores * jnp.moveaxis(scale, -1, 2)[:, :, :, None, None]
  intra_num = jnp.einsum("nbkGhce,nbekd->nbckGhd", scores, vc)
  intra_den = jnp.moveaxis(jnp.sum(scores, axis=-1), -1, 2)

  def step(carry, chunk_inputs):
    state, norm, m_old = carry
    q, kk, v, m_new = chunk_inputs
    num = jnp.einsum("bckGhm,bkGmd->bckGhd", q, state)
    den = jnp.einsum("bckGhm,bkGm->bckGh", q, norm)
    if key_log_max is not None:  # The state is relative to m_old; row c to M_c.
      to_row = jnp.exp(jnp.minimum(m_old[:, None] - m_new, 0.0))[..., None, None]
      num, den = num * to_row[..., None], den * to_row
      to_end = jnp.exp(jnp.minimum(m_new - m_new[:, -1:], 0.0))[..., None, None]
      kk = kk * to_end
      rescale = jnp.exp(jnp.minimum(m_old - m_new[:, -1], 0.0))[..., None, None]
      state, norm = state * rescale[..., None], norm * rescale
      m_old = m_new[:, -1]
    if log_decay is not None:
      state = state * chunk_decay[:, :, None, None]
      norm = norm * chunk_decay[:, :, None]
    state = state + jnp.einsum("bckGm,bckd->bkGmd", kk, v)
    norm = norm + jnp.sum(kk, axis=1)
    return (state, norm, m_old), (num, den)

  if initial is None:
    initial = (jnp.zeros((b, k, groups, m, dv), dtype), jnp.zeros((b, k, groups, m), dtype),
               jnp.full((b, k), common.MASKED_LOGIT, dtype))
  final, (inter_num, inter_den) = jax.lax.scan(step, initial, (qc_state, kc_state, vc, mc))
  num = jnp.moveaxis(intra_num + inter_num, 0, 1).reshape(b, length, k, groups, h, dv)
  den = jnp.moveaxis(intra_den + inter_den, 0, 1).reshape(b, length, k, groups, h)
  return num[:, :t], den[:, :t], final


def _grouped_qk(query: Array, key: Array, dims: common.Dims, dtype) -> tuple[Array, Array]:
  return common.group_query(query, dims.num_kv_heads).astype(dtype), key.astype(dtype)


# ------------------------------------------------------------------------------------------
# Performer (FAVOR+).
# ------------------------------------------------------------------------------------------
def default_num_features(head_dim: int) -> int:
  """m = max(d, ⌈d·ln d⌉), the d·log d features the Performer paper recommends (267 for d=64)."""
  head_dim = checks.positive_int("head_dim", head_dim)
  return max(head_dim, math.ceil(head_dim * math.log(head_dim)))


def orthogonal_random_features(key, num_features: int, head_dim: int, *,
                               dtype=jnp.float32) -> Array:
  """The random feature matrix W `[num_features, head_dim]` of FAVOR+ (Performer).

  Rows come in blocks of `head_dim` exactly orthogonal directions (QR of a Gaussian matrix,
  sign-corrected so each block is Haar-distributed; the last block is truncated) and are
  rescaled by independent chi(head_dim)-distributed norms, i.e. the norms of Gaussian vectors,
  so each row is marginally N(0, I) as the unbiased softmax-kernel estimator needs.

  Args:
    key: a PRNG key (typed or raw) or an int seed.
    num_features: m, the number of rows.
    head_dim: d, the number of columns.
    dtype: of the result.
  """
  num_features = checks.positive_int("num_features", num_features)
  head_dim = checks.positive_int("head_dim", head_dim)
  if isinstance(key, (int, np.integer)):
    return _seeded_features(int(key), num_features, head_dim, jnp.dtype(dtype).name)
  return _orthogonal_random_features(key, num_features, head_dim, jnp.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _seeded_features(seed: int, num_features: int, head_dim: int, dtype: str) -> np.ndarray:
  """A seed fixes W: drawn once, as a NumPy constant, so a jitted caller holds a constant
  instead of running the QR on every call (at 512 tokens that QR cost as much as the
  attention). Drawn on a thread of its own: JAX's trace and mesh contexts are per thread, so
  the draw is concrete also when the caller is being traced (inside `jit` or `shard_map`)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(lambda: np.asarray(_orthogonal_random_features(
        jax.random.key(seed), num_features, head_dim, jnp.dtype(dtype)))).result()


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _orthogonal_random_features(key, num_features, head_dim, dtype):
  block_key, norm_key = jax.random.split(key)
  num_blocks = -(-num_features // head_dim)
  gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
  q, r = jnp.linalg.qr(gaussian)
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(
      jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
  return (rows * norms[:, None]).astype(dtype)


# The seed of Performer's random features W when neither `features` nor `feature_key` is given:
# the same W on every call and in every process (a fixed draw, as a model's buffer would be).
DEFAULT_FEATURE_SEED = 0


def _performer_features(features, feature_key, num_features, head_dim: int) -> Array:
  if features is not None and feature_key is not None:
    raise ValueError("performer needs exactly one of features ([num_features, head_dim] "
                     "matrix W) or feature_key (a PRNG key or int seed to draw W), got both")
  if features is None:
    feature_key = DEFAULT_FEATURE_SEED if feature_key is None else feature_key
    num = default_num_features(head_dim) if num_features is None else checks.positive_int(
        "num_features", num_features)
    return orthogonal_random_features(feature_key, num, head_dim)
  common.check_float("features", features)
  if features.ndim != 2 or features.shape[1] != head_dim:
    raise ValueError(f"features must have shape [num_features, head_dim={head_dim}], "
                     f"got {features.shape}")
  if num_features is not None and num_features != features.shape[0]:
    raise ValueError(f"num_features={num_features!r} disagrees with features of shape "
                     f"{features.shape}")
  return features


@register("performer", segment_ids=True)
def performer_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                        features=None, feature_key=None, num_features=None, chunk_size=CHUNK_SIZE,
                        segment_ids=None):
  """Performer attention, FAVOR+ (Rethinking Attention with Performers, Choromanski et al. 2021).

  Positive orthogonal random features estimate the softmax kernel exp(s·q·k):

      φ(x) = exp(W x' − ‖x'‖²/2) / √m,   x' = √s·x   (√s = d^{-1/4} by default),
      out_i = φ(q_i)ᵀ Σ_j φ(k_j)v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j),

  so E[φ(q)ᵀφ(k)] = exp(s·q·k) for rows of W distributed N(0, I). As in the reference
  implementation the exponents are stabilised: each query's max over features and, per
  (batch, kv head), the max over all (valid) keys and features are subtracted; both are
  constants of the ratio and cancel. With `is_causal` the key max is a prefix max over keys
  0..j, so no output depends on a later token (`_stable_key_features`).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; key-padding masks
      (`[.., 1, kv_len]`) keep the linear form, others use the quadratic form of the kernel.
    is_causal: query i attends keys j <= i (chunked prefix sums).
    scale: s of the estimated kernel exp(s·q·k); `1/sqrt(head_dim)` when None.
    features: W `[num_features, head_dim]` (e.g. `orthogonal_random_features`); or
    feature_key: PRNG key (or int seed) from which W is drawn on each call; with neither
      `features` nor `feature_key`, the fixed seed `DEFAULT_FEATURE_SEED` = 0 (the same W on
      every call).
    num_features: m when drawing W; `default_num_features(head_dim)` = max(d, ⌈d ln d⌉).
    chunk_size: chunk length of the causal form.
    segment_ids: as in `dot_product_attention` (quadratic form).

  Cost: with the paper's m = d·ln d features (267 for d = 64) the causal form does more
  arithmetic per token than softmax does at short lengths. On CPU (float32, 8 heads, d = 64;
  experiments/results/cpu_paths.md) causal performer is slower than softmax below ~900 tokens
  forward and ~1100–1300 forward+backward (1.8x / 2.6x CPU time at 512), 0.3x at 4096; fewer
  features (`num_features=64`: ~1x at 512) or the non-causal form (~550 / ~700) cross earlier.
  A seeded `feature_key` is drawn while tracing, so a jitted call holds W as a constant.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  chunk_size = checks.positive_int("chunk_size", chunk_size)
  scale = common.default_scale(dims.head_dim, scale)
  if scale <= 0:
    raise ValueError(f"performer estimates exp(scale·q·k) and needs scale > 0, got {scale}")
  w = _performer_features(features, feature_key, num_features, dims.head_dim)
  masks = _plan_masks(dims, mask, is_causal, segment_ids)
  dtype = _compute_dtype(query, key, value)
  q, k = _grouped_qk(query, key, dims, dtype)
  phi_q, phi_k, key_log_max = _favor_features(q, k, w.astype(dtype), scale,
                                                 masks.key_valid, is_causal)
  out = _linear_attention(phi_q, phi_k, value.astype(dtype), dims, masks, is_causal=is_causal,
                          chunk_size=chunk_size, key_log_max=key_log_max)
  return out.astype(query.dtype)


def _favor_features(q: Array, k: Array, w: Array, scale: float, key_valid: Array | None,
                       is_causal: bool, prefix_max: Array | None = None
                       ) -> tuple[Array, Array, Array | None]:
  """FAVOR+ features φ(q) `[b, t, k, g, m]`, φ(k) `[b, s, k, m]` of grouped queries and keys
  (stabilised as `_stable_key_features`, which also returns the causal key max M)."""
  root = math.sqrt(scale)
  q, k = q * root, k * root
  log_q = jnp.einsum("btkgd,md->btkgm", q, w) - 0.5 * jnp.sum(q * q, -1, keepdims=True)
  log_k = jnp.einsum("bskd,md->bskm", k, w) - 0.5 * jnp.sum(k * k, -1, keepdims=True)
  log_q = log_q - jax.lax.stop_gradient(jnp.max(log_q, axis=-1, keepdims=True))
  phi_k, key_log_max = _stable_key_features(log_k, key_valid, is_causal, prefix_max)
  norm = 1.0 / math.sqrt(w.shape[0])
  return jnp.exp(log_q) * norm, phi_k * norm, key_log_max


# ------------------------------------------------------------------------------------------
# Focused linear attention (FLatten Transformer).
# ------------------------------------------------------------------------------------------
def _focused_map(x: Array, feature_scale: Array | None, power: float, eps: float) -> Array:
  """φ_p(x) = ‖x'‖·x'^p/‖x'^p‖ with x' = (ReLU(x) + eps) / feature_scale, over the last axis."""
  x = jax.nn.relu(x) + eps
  if feature_scale is not None:
    x = x / feature_scale
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  # x'^p/‖x'^p‖ is unchanged by rescaling x'; dividing by the max keeps x'^p in range.
  focused = (x / jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))) ** power
  return norm * focused / jnp.linalg.norm(focused, axis=-1, keepdims=True)


def _focused_features(q: Array, k: Array, feature_scale: Array | None, power: float,
                     eps: float) -> tuple[Array, Array]:
  """φ_p of grouped queries `[b, t, k, g, d]` and keys `[b, s, k, d]`; `feature_scale` s is
  broadcastable to `[num_kv_heads, head_dim]` (None = 1)."""
  scale_q = scale_k = None
  if feature_scale is not None:
    scale_k = jnp.broadcast_to(feature_scale, k.shape[2:]).astype(k.dtype)
    scale_q = scale_k[:, None, :]
  return _focused_map(q, scale_q, power, eps), _focused_map(k, scale_k, power, eps)


def _depthwise_conv(value: Array, kernel: Array, bias: Array | None, masks: _Masks,
                    dims: common.Dims, is_causal: bool, grid) -> Array:
  """DWC(V): depthwise conv of `[b, s, k, dv]` values over the sequence or the image grid."""
  b, s, k, dv = value.shape
  spatial = kernel.shape[:-2]
  if masks.key_valid is not None:
    valid = jnp.any(masks.key_valid, axis=-1)[..., None]
    value = jnp.where(valid, value, jnp.zeros((), value.dtype))
  channels = k * dv
  x = value.reshape((b, *grid, channels) if len(spatial) == 2 else (b, s, channels))
  kernel = jnp.broadcast_to(kernel, (*spatial, k, dv)).reshape(*spatial, 1, channels)
  if is_causal:
    padding = [(spatial[0] - 1, 0)]
  else:
    padding = [((n - 1) // 2, n - 1 - (n - 1) // 2) for n in spatial]
  spec = ("NHWC", "HWIO", "NHWC") if len(spatial) == 2 else ("NWC", "WIO", "NWC")
  out = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1,) * len(spatial), padding=padding,
      dimension_numbers=spec, feature_group_count=channels)
  out = out.reshape(b, s, k, dv)
  return out if bias is None else out + bias.astype(out.dtype)


def _check_dwc(kernel, bias, kernel_size, grid, dims: common.Dims, is_causal: bool):
  """Validates the rank-restoration arguments; returns the grid (or None)."""
  if kernel is None:
    for name, arg in (("dwc_bias", bias), ("dwc_kernel_size", kernel_size), ("grid", grid)):
      if arg is not None:
        raise ValueError(f"{name} is only used with dwc_kernel, which is None")
    return None
  common.check_float("dwc_kernel", kernel)
  target = (dims.num_kv_heads, dims.value_dim)
  if kernel.ndim not in (3, 4) or kernel.shape[-2] not in (1, target[0]) or (
      kernel.shape[-1] != target[1]):
    raise ValueError(
        "dwc_kernel must be [kernel, kv_heads|1, value_dim] (1-D, over the sequence) or "
        f"[kh, kw, kv_heads|1, value_dim] (2-D, with grid) with kv_heads={target[0]}, "
        f"value_dim={target[1]}, got shape {kernel.shape}")
  if kernel_size is not None:
    size = checks.positive_int("dwc_kernel_size", kernel_size)
    if any(n != size for n in kernel.shape[:-2]):
      raise ValueError(
          f"dwc_kernel_size={size} disagrees with dwc_kernel of shape {kernel.shape}")
  if bias is not None:
    common.check_float("dwc_bias", bias)
    _check_broadcast_to("dwc_bias", bias, target, "[kv_heads, value_dim]")
  if dims.q_len != dims.kv_len:
    raise ValueError("dwc_kernel adds DWC(V) to the output token by token and needs "
                     f"q_len == kv_len, got {dims.q_len} and {dims.kv_len}")
  if kernel.ndim == 3:
    if grid is not None:
      raise ValueError(f"grid={grid!r} is for a 2-D dwc_kernel, got a 1-D one of shape "
                       f"{kernel.shape}")
    return None
  if is_causal:
    raise ValueError("a 2-D dwc_kernel has no causal form; use a 1-D [kernel, heads, "
                     "value_dim] kernel with is_causal=True")
  if not isinstance(grid, (tuple, list)) or len(grid) != 2:
    raise ValueError(f"a 2-D dwc_kernel needs grid=(height, width), got {grid!r}")
  height, width = (checks.positive_int("grid", n) for n in grid)
  if height * width != dims.kv_len:
    raise ValueError(f"grid={grid!r} has {height * width} tokens, the sequence has "
                     f"{dims.kv_len}")
  return height, width


@register("focused_linear", segment_ids=True, grid=True)
def focused_linear_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                             power=FOCUSED_POWER, feature_scale=None, eps=FOCUSED_EPS,
                             dwc_kernel=None, dwc_bias=None, dwc_kernel_size=None, grid=None,
                             chunk_size=CHUNK_SIZE, segment_ids=None):
  """Focused linear attention (FLatten Transformer: Vision Transformer using Focused Linear
  Attention, Han et al. 2023).

      x' = (ReLU(x) + ε) / s,   φ_p(x) = ‖x'‖ · x'^p / ‖x'^p‖   (element-wise power p),
      out_i = φ_p(q_i)ᵀ Σ_j φ_p(k_j)v_jᵀ / φ_p(q_i)ᵀ Σ_j φ_p(k_j)  +  DWC(V)_i.

  The focusing power p sharpens the kernel while keeping the norm; s is the paper's learnable
  per-channel scale (softplus of a parameter; `FocusedLinearParams` owns it) and ε = 1e-6 keeps
  φ strictly positive. DWC is the rank-restoring depthwise convolution of V with 'SAME'
  padding (causal padding when `is_causal`), 1-D over the sequence or 2-D over a `grid` of
  image tokens (row-major). Differences from the official code: the norms are taken per head
  (the code takes them over all heads' channels before splitting), exact division replaces
  the `+1e-6` in the denominator (rows with no key give zeros), and the positional encoding
  the code adds to K belongs to the layer.

  Args:
    query, key, value: `[batch, seq, heads, dim]`; keys/values may have fewer heads (GQA).
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; key-padding masks keep the
      linear form (and zero the masked values in DWC), others use the quadratic form.
    is_causal: query i attends keys j <= i (chunked prefix sums; causal 1-D DWC).
    scale: not accepted (None): the kernel is invariant to a scalar scale of q and k.
    power: focusing power p > 0 (3 in the paper).
    feature_scale: s, positive, broadcastable to `[num_kv_heads, head_dim]`; None = 1.
    eps: ε added after the ReLU.
    dwc_kernel: `[kernel, kv_heads|1, value_dim]` (1-D) or `[kh, kw, kv_heads|1, value_dim]`
      (2-D, needs `grid`); a heads axis of 1 shares the kernel across heads as the paper.
    dwc_bias: broadcastable to `[kv_heads, value_dim]`.
    dwc_kernel_size: if given, must equal the kernel's spatial size (set by the layer).
    grid: `(height, width)` with height·width = seq, for a 2-D kernel.
    chunk_size: chunk length of the causal form.
    segment_ids: as in `dot_product_attention` (quadratic form).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  chunk_size = checks.positive_int("chunk_size", chunk_size)
  if scale is not None:
    raise ValueError("focused_linear takes no scale: the focused kernel is invariant to a "
                     f"scalar scale of q and k (use feature_scale), got scale={scale!r}")
  power = checks.positive_float("power", power)
  eps = checks.positive_float("eps", eps)
  grid = _check_dwc(dwc_kernel, dwc_bias, dwc_kernel_size, grid, dims, is_causal)
  dtype = _compute_dtype(query, key, value)
  q, k = _grouped_qk(query, key, dims, dtype)
  if feature_scale is not None:
    common.check_float("feature_scale", feature_scale)
    _check_broadcast_to("feature_scale", feature_scale, (dims.num_kv_heads, dims.head_dim),
                        "[num_kv_heads, head_dim]")
  masks = _plan_masks(dims, mask, is_causal, segment_ids)
  v = value.astype(dtype)
  out = _linear_attention(*_focused_features(q, k, feature_scale, power, eps), v, dims, masks,
                          is_causal=is_causal, chunk_size=chunk_size)
  if dwc_kernel is not None:
    conv = _depthwise_conv(v, dwc_kernel.astype(dtype), dwc_bias, masks, dims, is_causal, grid)
    b, t, n, dv = out.shape
    out = out.reshape(b, t, dims.num_kv_heads, dims.groups, dv) + conv[:, :, :, None]
    out = _zero_empty_rows(out.reshape(b, t, n, dv), masks, dims, is_causal)
  return out.astype(query.dtype)


# ------------------------------------------------------------------------------------------
# Linear log-normal attention.
# ------------------------------------------------------------------------------------------
# Linear fit σ²_sm ≈ a·σ²_lln + b between the log-variances of softmax and LLN attention
# matrices, from the authors' implementation.
_LLN_FIT_A = 0.14855178144710912
_LLN_FIT_B = -0.35487039130661086


def _scalar(name: str, x, dtype) -> Array:
  if jnp.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(x)}")
  return jnp.asarray(x, dtype)


def _token_sums(x: Array) -> tuple[Array, Array]:
  """Sum and sum of squares of the entries of each token of `[b, t, ...]`: two `[b, t]`."""
  flat = x.reshape(*x.shape[:2], math.prod(x.shape[2:]))
  return jnp.sum(flat, -1), jnp.sum(flat * flat, -1)


def _std(x: Array, is_causal: bool, prefix: tuple[Array, Array] | None = None,
         position: Array | int = 0) -> Array:
  """Standard deviation of all entries of each example `[b, t, ...]`: `[b, 1]`, or with
  `is_causal` of the entries of tokens 0..i, `[b, t]` (a prefix statistic). `prefix` holds the
  `[b]` sums of `_token_sums` over `position` earlier tokens (causal only)."""
  b, t = x.shape[:2]
  total, squares = _token_sums(x)
  if is_causal:
    entries = math.prod(x.shape[2:])
    count = entries * (position + jnp.arange(1, t + 1, dtype=x.dtype))
    total, squares = jnp.cumsum(total, 1), jnp.cumsum(squares, 1)
    if prefix is not None:
      total, squares = total + prefix[0][:, None], squares + prefix[1][:, None]
    mean = total / count
    var = squares / count - mean * mean
  else:
    count = max(math.prod(x.shape[2:]) * t, 1)
    mean = jnp.sum(total, 1, keepdims=True) / count
    var = jnp.sum(squares, 1, keepdims=True) / count - mean * mean
  return jnp.sqrt(jnp.maximum(var, 0.0))


def _lln_moments(q: Array, k: Array, scale: float, head_dim: int, is_causal: bool,
                 prefix: Array | None = None, position: Array | int = 0
                 ) -> tuple[Array, Array]:
  """Moment-matched α `[b, t|1]` and β `[b, s|1]` of linear log-normal attention. `prefix`
  `[b, 4]`: the sums and sums of squares of q's and k's entries over `position` earlier tokens
  (causal self-attention only)."""
  tiny = jnp.finfo(q.dtype).tiny
  q_prefix = k_prefix = None
  if prefix is not None:
    q_prefix, k_prefix = (prefix[:, 0], prefix[:, 1]), (prefix[:, 2], prefix[:, 3])
  sigma_q = jnp.maximum(_std(q, is_causal, q_prefix, position), tiny)
  sigma_k = jnp.maximum(_std(k, is_causal, k_prefix, position), tiny)

  def sigma_lln(sq, sk):
    var_sm = scale ** 2 * head_dim * sq ** 2 * sk ** 2
    return jnp.sqrt((var_sm - _LLN_FIT_B) / (2.0 * _LLN_FIT_A))

  if is_causal:  # Token i's feature map uses the statistics of tokens 0..i of both arrays.
    t, s = sigma_q.shape[1], sigma_k.shape[1]
    alpha = sigma_lln(sigma_q, sigma_k[:, jnp.minimum(jnp.arange(t), s - 1)]) / sigma_q
    beta = sigma_lln(sigma_q[:, jnp.minimum(jnp.arange(s), t - 1)], sigma_k) / sigma_k
  else:
    sigma = sigma_lln(sigma_q, sigma_k)
    alpha, beta = sigma / sigma_q, sigma / sigma_k
  return jax.lax.stop_gradient(alpha), jax.lax.stop_gradient(beta)


@register("lognormal_linear", segment_ids=True)
def lognormal_linear_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                               alpha=None, beta=None, chunk_size=CHUNK_SIZE, segment_ids=None):
  """Linear log-normal attention (Linear Log-Normal Attention with Unbiased Concentration,
  Nahshan et al. 2023).

      φ_q(q) = exp(α q),  φ_k(k) = exp(β k)   (element-wise; m = head_dim features),
      out_i = φ_q(q_i)ᵀ Σ_j φ_k(k_j)v_jᵀ / φ_q(q_i)ᵀ Σ_j φ_k(k_j).

  α, β are moment-matched so the LLN attention matrix has the log-normal spread of softmax
  attention: with σ_q, σ_k the standard deviations of all query and key entries, softmax
  logits s·q·k have variance σ²_sm = s²·d·σ_q²σ_k²; the LLN log-variance is
  σ²_lln = α²σ_q² + β²σ_k², and the paper's linear fit σ²_sm ≈ a·σ²_lln + b
  (a = 0.1486, b = −0.3549) with ασ_q = βσ_k = σ̃ gives σ̃² = (σ²_sm − b)/(2a), α = σ̃/σ_q,
  β = σ̃/σ_k. The statistics are taken without gradient, as in the authors' code, over each
  example's whole query/key arrays (never across the batch). With `is_causal` they are
  prefix statistics: token i's α_i (and β_i) come from σ_q, σ_k over tokens 0..i, so
  φ_q(q_i) = exp(α_i q_i), φ_k(k_j) = exp(β_j k_j) and no output depends on a later token.
  Exponents are stabilised as in that code (per-query max; per (batch, kv head) key max, with
  `is_causal` a prefix max over keys 0..j: `_stable_key_features`), which cancels.

  Args:
    query, key, value: `[batch, seq, heads, dim]`; keys/values may have fewer heads (GQA).
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; key-padding masks keep the
      linear form, others use the quadratic form.
    is_causal: query i attends keys j <= i (chunked prefix sums).
    scale: s of the softmax attention being matched; `1/sqrt(head_dim)` when None.
    alpha, beta: scalars overriding the moment-matched α and β.
    chunk_size: chunk length of the causal form.
    segment_ids: as in `dot_product_attention` (quadratic form).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  chunk_size = checks.positive_int("chunk_size", chunk_size)
  scale = common.default_scale(dims.head_dim, scale)
  dtype = _compute_dtype(query, key, value)
  alpha = None if alpha is None else _scalar("alpha", alpha, dtype)
  beta = None if beta is None else _scalar("beta", beta, dtype)
  masks = _plan_masks(dims, mask, is_causal, segment_ids)
  return _lognormal_attention(query, key, value, masks, is_causal=is_causal, scale=scale,
                              alpha=alpha, beta=beta, chunk_size=chunk_size)


def _lognormal_attention(query: Array, key: Array, value: Array, masks: _Masks, *,
                         is_causal: bool, scale: float, alpha: Array | None,
                         beta: Array | None, chunk_size: int, prefix_sums: Array | None = None,
                         position: Array | int = 0) -> Array:
  """`lognormal_linear_attention` of checked arguments (`masks` from `_plan_masks`), its tokens
  after `position` earlier ones whose moment sums are `prefix_sums` `[b, 4]` (causal; None: the
  first tokens) and whose keys it does not see: the runs that start inside a sequence shard."""
  dims = common.check_qkv(query, key, value)
  dtype = _compute_dtype(query, key, value)
  q, k = _grouped_qk(query, key, dims, dtype)
  phi_q, phi_k, key_log_max = _lognormal_features(q, k, alpha, beta, scale, masks.key_valid,
                                                 is_causal, prefix_sums=prefix_sums,
                                                 position=position)
  out = _linear_attention(phi_q, phi_k, value.astype(dtype), dims, masks,
                          is_causal=is_causal, chunk_size=chunk_size, key_log_max=key_log_max)
  return out.astype(query.dtype)


def _lognormal_features(q: Array, k: Array, alpha: Array | None, beta: Array | None,
                       scale: float, key_valid: Array | None, is_causal: bool,
                       prefix_max: Array | None = None, prefix_sums: Array | None = None,
                       position: Array | int = 0) -> tuple[Array, Array, Array | None]:
  """exp(α q) `[b, t, k, g, d]` and exp(β k) `[b, s, k, d]` of grouped queries and keys (α, β
  moment-matched where None; `_lln_moments`), stabilised as `_stable_key_features`."""
  if alpha is None or beta is None:
    matched_alpha, matched_beta = _lln_moments(q, k, scale, k.shape[-1], is_causal,
                                               prefix_sums, position)
    alpha = matched_alpha[:, :, None, None, None] if alpha is None else alpha
    beta = matched_beta[:, :, None, None] if beta is None else beta
  log_q = alpha * q
  log_q = log_q - jax.lax.stop_gradient(jnp.max(log_q, axis=-1, keepdims=True))
  phi_k, key_log_max = _stable_key_features(beta * k, key_valid, is_causal, prefix_max)
  return jnp.exp(log_q), phi_k, key_log_max


# ------------------------------------------------------------------------------------------
# Lightning attention.
# ------------------------------------------------------------------------------------------
LIGHTNING_DECAY = "alibi"  # TransNormerLLM's per-head decay λ_h = exp(−m_h), ALiBi slopes m_h


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes m_h (Train Short, Test Long, Press et al. 2022): 2^(−8h/H) for
  h = 1..H when H is a power of two, otherwise those of the power of two below H followed by
  every other slope of the next power of two (the authors' `get_slopes`)."""
  num_heads = checks.positive_int("num_heads", num_heads)
  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = [2.0 ** (-8.0 * h / closest) for h in range(1, closest + 1)]
  if closest < num_heads:
    slopes += list(alibi_slopes(2 * closest)[0::2][:num_heads - closest])
  return np.asarray(slopes)


def _log_decay(decay, dims: common.Dims, dtype) -> Array | None:
  """λ ("alibi", float in (0, 1] or `[num_heads]` array) -> log λ as `[1, 1]` or `[k, g]`."""
  if decay is None:
    return None
  if isinstance(decay, str):
    if decay != "alibi":
      raise ValueError(f"decay must be 'alibi', None, a float in (0, 1] or a [num_heads] "
                       f"array, got {decay!r}")
    return jnp.asarray(-alibi_slopes(dims.num_heads), dtype).reshape(dims.num_kv_heads,
                                                                     dims.groups)
  if isinstance(decay, (int, float, np.floating, np.integer)) and not isinstance(decay, bool):
    checks.unit_interval("decay", decay)
    return jnp.full((1, 1), math.log(decay), dtype)
  common.check_float("decay", decay)
  if decay.ndim == 0:
    return jnp.log(decay.astype(dtype)).reshape(1, 1)
  if decay.shape != (dims.num_heads,):
    raise ValueError(f"decay must be a float or have shape [num_heads] = ({dims.num_heads},), "
                     f"got shape {decay.shape}")
  return jnp.log(decay.astype(dtype)).reshape(dims.num_kv_heads, dims.groups)


@register("lightning", segment_ids=True)
def lightning_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                        decay=LIGHTNING_DECAY, block_size=LIGHTNING_BLOCK_SIZE, output_norm=False,
                        norm_eps=SRMS_EPS, segment_ids=None):
  """Lightning attention (Various Lengths, Constant Speed: Efficient Language Modeling with
  Lightning Attention, Qin et al. 2024; Lightning Attention-2).

  Linear attention without softmax or denominator, with TransNormerLLM's per-head decay λ:

      out_t = Σ_{s≤t} λ^{t−s} (s_qk · q_t·k_s) v_s,   λ_h = exp(−m_h) by default,

  m_h the ALiBi slope of head h (`alibi_slopes`; TransNormerLLM further scales m_h by
  1 − l/(L−1) in layer l of L, which the LM's TransNormerLLM block passes as `decay`).

  Causal: the sequence is tiled into blocks of `block_size`; the intra-block part is the
  masked quadratic form ((QKᵀ) ⊙ Λ)V, the inter-block part is λ^{c+1}·q·KV with the running
  state KV ← λ^B·KV + Σ_j λ^{B−1−j} k_j v_jᵀ, carried across blocks (no cumsum over the
  sequence). Non-causal: the global linear form Q(KᵀV) (no decay). With `output_norm` the
  output goes through TransNormerLLM's parameter-free SRMSNorm, x / RMS(x) over all heads of a
  token; the feature activation of Q and K, the output gate and the projections of
  TransNormerLLM belong to the layer.

  Args:
    query, key, value: `[batch, seq, heads, dim]`; keys/values may have fewer heads (GQA).
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; key-padding masks keep the
      linear form, others use the quadratic form.
    is_causal: query t attends keys s <= t.
    scale: s_qk multiplying q·k; 1 when None (the paper does not scale).
    decay: "alibi" (λ_h = exp(−m_h), the default; the non-causal form has no decay), None
      (λ = 1), a float in (0, 1], or a `[num_heads]` array of values in (0, 1]
      (differentiable); a float or an array needs `is_causal`.
    block_size: tokens per block of the causal form.
    output_norm: apply SRMSNorm to the output.
    norm_eps: ε of SRMSNorm, x / sqrt(mean(x²) + ε).
    segment_ids: as in `dot_product_attention` (quadratic form).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  block_size = checks.positive_int("block_size", block_size)
  dtype = _compute_dtype(query, key, value)
  alibi = isinstance(decay, str) and decay == "alibi"
  log_decay = _log_decay(decay, dims, dtype) if is_causal or not alibi else None
  if log_decay is not None and not is_causal:
    raise ValueError("decay λ^(t−s) is defined for causal attention: pass is_causal=True or "
                     "decay=None")
  q, k = _grouped_qk(query, key, dims, dtype)
  if scale is not None:
    q = q * scale
  masks = _plan_masks(dims, mask, is_causal, segment_ids)
  out = _linear_attention(q, k, value.astype(dtype), dims, masks, is_causal=is_causal,
                          chunk_size=block_size, log_decay=log_decay, normalize=False)
  if output_norm:
    out = _srms_norm(out, norm_eps)
  return out.astype(query.dtype)


def _srms_norm(out: Array, eps: float) -> Array:
  """TransNormerLLM's SRMSNorm x / sqrt(mean(x²) + ε) over all heads of a token `[b, t, n, d]`."""
  return out * jax.lax.rsqrt(jnp.mean(out * out, axis=(2, 3), keepdims=True) + eps)


# ------------------------------------------------------------------------------------------
# FAST (FASTMax): a truncated Taylor kernel of normalised q·k.
# ------------------------------------------------------------------------------------------
FAST_ORDER = 2  # FASTMax's Taylor order p (the paper's default)
FAST_EPS = 1e-6  # floor of ‖x‖ in the normalisation x / ‖x‖


def _taylor_features(x: Array, order: int, scale: float, eps: float) -> Array:
  """[x̂^{⊗n}·(s^n / n!)^{1/2}]_{n=0..p} of x̂ = x / max(‖x‖, ε): φ(q)ᵀφ(k) = Σ_n (s q̂·k̂)^n / n!.

  `x` is `[..., d]`; the result is `[..., Σ_n d^n]` (1 + d + d² for p = 2)."""
  # max(‖x‖, ε) as √max(‖x‖², ε²): a zero vector (a zero-initialised class token) then has a
  # finite gradient, where √ of 0 would give 0·∞ = NaN.
  unit = x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
  power = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  features = [power]
  for n in range(1, order + 1):
    power = (power[..., :, None] * unit[..., None, :]).reshape(
        x.shape[:-1] + (x.shape[-1] ** n,))
    features.append(power * math.sqrt(scale ** n / math.factorial(n)))
  return jnp.concatenate(features, axis=-1)


@register("fast", segment_ids=True)
def fast_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                   order=FAST_ORDER, eps=FAST_EPS, chunk_size=CHUNK_SIZE, segment_ids=None):
  """FAST (FASTMax): FAST: Factorizable Attention for Speeding up Transformers (Gerami et
  al. 2024).

  The softmax's exponential is replaced by its Taylor polynomial of order p in the cosine
  x_ij = q̂_i·k̂_j of the normalised q̂ = q/‖q‖, k̂ = k/‖k‖:

      κ(q_i, k_j) = Σ_{n=0}^{p} (s·x_ij)^n / n!,   out_i = Σ_j κ_ij v_j / Σ_j κ_ij.

  The polynomial factorises, κ = φ(q)ᵀφ(k) with φ(x) = [x̂^{⊗n}·√(s^n/n!)]_{n≤p} (1 + d + d²
  features for p = 2), so the cost is O(n·d^{p}·d_v), linear in length; the causal form
  accumulates the factorised moments Σ_j φ(k_j)v_jᵀ and Σ_j φ(k_j) as prefix sums (chunked).
  For p = 2, 1 + x + x²/2 > 0: the weights are positive and every row's normaliser too.

  Args:
    query, key, value: `[batch, seq, heads, dim]`; keys/values may have fewer heads (GQA).
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; key-padding masks keep the
      linear form, others use the quadratic form of the same kernel.
    is_causal: query i attends keys j <= i.
    scale: s multiplying the cosine; 1 when None (the paper's normalised scores).
    order: Taylor order p in {1, 2, 3} (2 in the paper; p = 1 gives negative weights for
      s·x < −1).
    eps: floor of ‖x‖ in the normalisation.
    chunk_size: chunk length of the causal form.
    segment_ids: as in `dot_product_attention` (quadratic form).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  chunk_size = checks.positive_int("chunk_size", chunk_size)
  order = checks.int_in_range("order", order, 1, 3)
  eps = checks.positive_float("eps", eps)
  scale = 1.0 if scale is None else checks.positive_float("scale", scale)
  dtype = _compute_dtype(query, key, value)
  q, k = _grouped_qk(query, key, dims, dtype)
  masks = _plan_masks(dims, mask, is_causal, segment_ids)
  out = _linear_attention(_taylor_features(q, order, scale, eps),
                          _taylor_features(k, order, scale, eps), value.astype(dtype), dims,
                          masks, is_causal=is_causal, chunk_size=chunk_size)
  return out.astype(query.dtype)


@register_params("focused_linear")
class FocusedLinearParams(OpParams):
  """Weights of focused linear attention (FLatten Transformer, Han et al. 2023).

  - `dwc_kernel`, `dwc_bias`: the rank-restoring depthwise convolution of V, shared across
    heads as in the official code: `[k, 1, head_dim]` over the sequence, or `[k, k, 1, head_dim]`
    when `op_args["grid"] = (height, width)` (image tokens); `k = op_args["dwc_kernel_size"]`,
    5 by default as the paper. PyTorch's Conv default init (U(±1/√fan_in)), zero bias.
  - `feature_scale`: the learnable per-channel scale s of the focused map, `[num_kv_heads,
    head_dim]`, stored as a zero-initialised parameter and returned through softplus (ln 2 at
    init), as the paper.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key
    op_args = dict(self.op_args or {})
    size = checks.positive_int("op_args['dwc_kernel_size']", op_args.get("dwc_kernel_size", 5))
    image = op_args.get("grid") is not None
    spatial, names = ((size, size), ("conv_height", "conv_width")) if image else (
        (size,), ("conv_width",))
    value_dim = value.shape[-1]
    kernel = self.param(
        "dwc_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            names + (None, "head_dim")),
        spatial + (1, value_dim), self.param_dtype)
    bias = self.param(
        "dwc_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "head_dim")),
        (1, value_dim), self.param_dtype)
    scale = self.param(
        "feature_scale",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("kv_heads", "head_dim")),
        (self.num_kv_heads, self.head_dim), self.param_dtype)
    kernel, bias, scale = nn.dtypes.promote_dtype(kernel, bias, scale, dtype=self.dtype)
    return {"dwc_kernel": kernel, "dwc_bias": bias, "feature_scale": nn.softplus(scale)}
