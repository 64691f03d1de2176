"""Retention with explicit decay: RetNet's 1-D retention and RMT's 2-D Manhattan attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register

Array = jax.Array


def retnet_gammas(num_heads: int) -> np.ndarray:
  """RetNet's per-head decays γ_h = 1 − 2^(−5−h)."""
  return 1.0 - 2.0 ** (-5.0 - np.arange(num_heads))


def rmt_gammas(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0
               ) -> np.ndarray:
  """RMT's per-head decays γ_h = 1 − 2^(−initial_value − heads_range·h/num_heads)."""
  return 1.0 - 2.0 ** (-initial_value - heads_range * np.arange(num_heads) / num_heads)


def _log_gamma(gamma, num_heads: int, default) -> Array:
  """`[num_heads]` float32 log-decays from None (the default), a float or a `[num_heads]` array."""
  if gamma is None:
    return jnp.asarray(np.log(default(num_heads)), jnp.float32)
  if isinstance(gamma, (float, int, np.floating, np.integer)) and not isinstance(gamma, bool):
    checks.unit_interval("gamma", gamma)
    return jnp.full((num_heads,), np.log(gamma), jnp.float32)
  if not hasattr(gamma, "shape") or not jnp.issubdtype(gamma.dtype, jnp.floating):
    raise TypeError(f"gamma must be a float or a floating [num_heads] array, got {gamma!r}")
  if gamma.shape not in ((), (num_heads,)):
    raise ValueError(f"gamma must be a scalar or have shape [num_heads] = ({num_heads},), "
                     f"got {gamma.shape}")
  return jnp.broadcast_to(jnp.log(gamma.astype(jnp.float32)), (num_heads,))


def _check_grid(grid, dims: common.Dims) -> tuple[int, int]:
  h, w = checks.int_tuple("grid", grid, allow_int=False)
  if h * w != dims.q_len or dims.kv_len != dims.q_len:
    raise ValueError(
        f"grid {grid!r} must have height*width = q_len = kv_len, got q_len "
        f"{dims.q_len} and kv_len {dims.kv_len}")
  return h, w


def _chunkwise_causal(query, key, value, log_gamma, dims, scale, chunk_size, initial=None,
                     position=0):
  """RetNet's chunkwise recurrent form of causal 1-D retention, normalisations included.

  The state after position e is S = Σ_{m≤e} γ^{e−m} k_m v_mᵀ (and z = Σ γ^{e−m} k_m for the row
  sums); inside a chunk the decay matrix γ^{i−j} applies, across chunks γ^{i+1}·q_i·S. Every
  power of γ is of a non-negative exponent. `log_gamma` is `[k, g]`. `initial` is the state
  `(S [b, k, g, d, dv], z [b, k, g, d])` after `position` earlier tokens (zeros when None).
  Returns `[b, t, k, g, dv]` and the state after the last chunk (with a length that is not a
  multiple of `chunk_size`, decayed over the padding too).
  """
  b, t, k_heads, g, d, dv = (dims.batch, dims.q_len, dims.num_kv_heads, dims.groups,
                             dims.head_dim, dims.value_dim)
  c = min(chunk_size, t)
  pad = -t % c
  n_chunks = (t + pad) // c
  # c_n² = Σ_{i≤n} γ^i, the row sums of the causal decay matrix: for n = position + i,
  # Σ_{j<position} γ^j + γ^position·Σ_{j≤i} γ^j, the first sum (1 − γ^p)/(1 − γ) via expm1.
  row_sum = jnp.cumsum(jnp.exp(log_gamma[..., None] * jnp.arange(t + pad)), -1)
  if initial is not None:
    earlier = jnp.where(log_gamma == 0, position, jnp.expm1(log_gamma * position)
                        / jnp.expm1(jnp.where(log_gamma == 0, 1.0, log_gamma)))
    row_sum = earlier[..., None] + jnp.exp(log_gamma * position)[..., None] * row_sum
  row_norm = jnp.sqrt(row_sum)
  pos = np.arange(c)
  expo = pos[:, None] - pos[None, :]
  intra = jnp.where(expo >= 0, jnp.exp(log_gamma[..., None, None] * np.maximum(expo, 0)), 0.0)
  cross = jnp.exp(log_gamma[..., None] * (pos + 1))  # [k, g, c]: γ^{i+1}
  carry_in = jnp.exp(log_gamma[..., None] * (c - 1 - pos))  # [k, g, c]: γ^{c−1−j}
  chunk_decay = jnp.exp(log_gamma * c)  # [k, g]

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n_chunks, c, *x.shape[2:]), 1, 0)

  def step(carry, xs):
    state, z = carry  # [b, k, g, d, dv], [b, k, g, d]
    q_c, k_c, v_c, norm_c = xs  # [b,c,k,g,d], [b,c,k,d], [b,c,k,dv], [k,g,c]
    scores = jnp.einsum("bikgd,bjkd->bkgij", q_c, k_c,
                        preferred_element_type=jnp.float32) * jnp.float32(scale) * intra
    q_s = q_c.astype(jnp.float32) * jnp.float32(scale)
    num = (jnp.einsum("bkgij,bjkd->bikgd", scores, v_c.astype(jnp.float32))
           + jnp.einsum("bikgd,bkgde->bikge", q_s, state) * jnp.moveaxis(cross, -1, 0)[..., None])
    row = (jnp.moveaxis(jnp.sum(scores, -1), -1, 1)
           + jnp.einsum("bikgd,bkgd->bikg", q_s, z) * jnp.moveaxis(cross, -1, 0))
    norm = jnp.moveaxis(norm_c, -1, 0)  # [c, k, g]
    out = (num / norm[..., None]) / jnp.maximum(jnp.abs(row / norm), 1.0)[..., None]
    k_w = k_c.astype(jnp.float32)[:, :, :, None] * jnp.moveaxis(carry_in, -1, 0)[..., None]
    state = (chunk_decay[..., None, None] * state
             + jnp.einsum("bjkgd,bjke->bkgde", k_w, v_c.astype(jnp.float32)))
    z = chunk_decay[..., None] * z + jnp.sum(k_w, axis=1)
    return (state, z), out

  if initial is None:
    initial = (jnp.zeros((b, k_heads, g, d, dv), jnp.float32),
               jnp.zeros((b, k_heads, g, d), jnp.float32))
  norms = jnp.moveaxis(row_norm.reshape(k_heads, g, n_chunks, c), 2, 0)
  final, out = jax.lax.scan(step, initial, (chunks(common.group_query(query, k_heads)),
                                            chunks(key), chunks(value), norms))
  return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * c, k_heads, g, dv)[:, :t], final


@register("retention", grid=True)
def retention(query, key, value, *, mask=None, is_causal=False, scale=None, gamma=None,
              grid=None, renormalize=True, chunk_size=None):
  """Retention: Retentive Network (Sun et al., 2023) and RMT: Retentive Networks Meet Vision
  Transformers (Fan et al., 2024).

  1-D (RetNet's parallel form, with its normalisations):

      D_nm = γ^{n−m} (m ≤ n, else 0; causal) or γ^{|n−m|} (bidirectional),
      D̃_nm = D_nm / sqrt(Σ_i D_ni),   R = s·QKᵀ ⊙ D̃,   out = (R_nm / max(|Σ_i R_ni|, 1)) V.

  RetNet's GroupNorm, swish gate and xPos rotation live outside the op. 2-D (`grid`, RMT's
  Manhattan self-attention, no causal form), with the decay applied to the softmax weights and
  renormalised, as RMT's code does by adding log γ·dist to the logits:

      out = softmax(s·QKᵀ + log γ · (|Δx| + |Δy|)) V,

  or, with `renormalize=False`, the paper's literal (softmax(s·QKᵀ) ⊙ γ^{|Δx|+|Δy|}) V.
  Masked pairs are dropped (D_nm = 0, or excluded from the softmax); rows with nothing to attend
  to give zeros. Positions count from the start of each sequence.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: optional boolean mask broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: 1-D only: the causal decay γ^{n−m}, m ≤ n.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    gamma: decay per head, a float in (0, 1] or a `[num_heads]` array (differentiable). Default:
      RetNet's 1 − 2^(−5−h) in 1-D, RMT's 1 − 2^(−2−4h/num_heads) in 2-D.
    grid: `(height, width)` of a row-major token grid (`q_len == kv_len == height·width`).
    renormalize: 2-D only; see above.
    chunk_size: causal 1-D self-attention without `mask` only: RetNet's chunkwise recurrent
      form over chunks of this length (memory linear in the sequence), equal to the parallel
      form; None computes the parallel form.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  k_heads, g = dims.num_kv_heads, dims.groups

  if chunk_size is not None:
    chunk_size = checks.positive_int("chunk_size", chunk_size)
    if not is_causal or grid is not None or mask is not None or dims.q_len != dims.kv_len:
      raise ValueError(
          "chunk_size (the chunkwise form) needs is_causal=True, no grid, no mask and "
          f"q_len == kv_len; got is_causal={is_causal}, grid={grid!r}, mask "
          f"{'given' if mask is not None else None}, lengths {dims.q_len} and {dims.kv_len}")
    log_gamma = _log_gamma(gamma, dims.num_heads, retnet_gammas).reshape(k_heads, g)
    out, _ = _chunkwise_causal(query, key, value, log_gamma, dims, scale, int(chunk_size))
    return out.reshape(dims.batch, dims.q_len, dims.num_heads,
                       dims.value_dim).astype(query.dtype)

  if grid is None:
    log_gamma = _log_gamma(gamma, dims.num_heads, retnet_gammas).reshape(k_heads, g, 1, 1)
    logits = common.attention_logits(query, key, dims, scale)  # [b, k, g, t, s]
    dist = np.arange(dims.q_len)[:, None] - np.arange(dims.kv_len)[None, :]
    full = common.make_mask(dims, mask=mask, is_causal=is_causal)
    decay = jnp.exp(log_gamma * np.abs(dist))  # [k, g, t, s]
    if full is not None:
      decay = jnp.where(common.grouped(full, dims), decay, 0.0)
    row_sum = jnp.sum(decay, axis=-1, keepdims=True)
    decay = decay * jax.lax.rsqrt(jnp.where(row_sum > 0, row_sum, 1.0))
    scores = logits * decay
    scores = scores / jnp.maximum(jnp.abs(jnp.sum(scores, axis=-1, keepdims=True)), 1.0)
    return common.weighted_values(scores, value, dims).astype(query.dtype)

  common.check_no_causal("retention (2-D grid)", is_causal)
  if not isinstance(renormalize, bool):
    raise TypeError(f"renormalize must be a bool, got {renormalize!r}")
  h, w = _check_grid(grid, dims)
  log_gamma = _log_gamma(gamma, dims.num_heads, rmt_gammas).reshape(k_heads, g, 1, 1)
  logits = common.attention_logits(query, key, dims, scale)
  y, x = np.divmod(np.arange(h * w), w)
  dist = np.abs(y[:, None] - y[None, :]) + np.abs(x[:, None] - x[None, :])
  full = common.grouped(common.make_mask(dims, mask=mask), dims)
  if renormalize:
    probs = common.masked_softmax(logits + log_gamma * dist, full)
  else:
    probs = common.masked_softmax(logits, full) * jnp.exp(log_gamma * dist)
  return common.weighted_values(probs, value, dims).astype(query.dtype)
