"""Attention with learned positional terms: ConViT's GPSA, LeViT's attention bias, MViTv2's
decomposed relative positions, and kernelized attention with relative positional encoding.

- `gpsa`: gated positional self-attention (ConViT), a per-head gate between content attention
  and a purely positional attention over 2-D offsets.
- `levit_bias`, `decomposed_relpos`: softmax attention whose logits get a learned bias of the
  relative position of query and key on the `grid=(h, w)` image (the positional-bias hooks).
- `kernelized_rpe`: Performer features times `exp(b_{i−j})`, the Toeplitz sum done by FFT
  (causal: by divide and conquer, never reading a later token);
  sequence-parallel, dense blocks of the features times `exp(b_{i−j})` read at the blocks'
  global offsets (`PairTerms`), summed over `[v, 1]` and divided.

Image tokens are row-major: token i sits at `(y_i, x_i) = (i // w, i % w)`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import common
from big_attn.ops import linear
from big_attn.ops import toeplitz
from big_attn.ops import windowed
from big_attn.ops.registry import (BlockForm, HeadArg, OpParams, PairTerms, register,
                                   register_params)
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array


def _self_grid(dims: common.Dims, grid, op: str) -> tuple[int, int]:
  if dims.q_len != dims.kv_len:
    raise ValueError(f"{op} is self-attention over one image: q_len must equal kv_len, got "
                     f"{dims.q_len} and {dims.kv_len}")
  return windowed.check_grid(grid, dims.q_len)


def _offsets(grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """`(dy, dx)`, each `[t, t]`: key position minus query position on the row-major grid."""
  h, w = grid
  pos = np.arange(h * w)
  ys, xs = pos // w, pos % w
  return ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]


# ------------------------------------------------------------------------------------------
# ConViT gated positional self-attention.
# ------------------------------------------------------------------------------------------
@register("gpsa", grid=True,
          head_args={"pos_proj": HeadArg(), "gating": HeadArg()},
          block_refusal=(
              "its positional softmax of v_hᵀr_ij uses the grid offsets of the query and the key "
              "at global positions, which the ring's key blocks do not see"))
def gpsa_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                   pos_proj=None, gating=None):
  """Gated positional self-attention: ConViT, Improving Vision Transformers with Soft
  Convolutional Inductive Biases (d'Ascoli et al., 2021).

  Each head h mixes content attention with a positional attention over the relative offsets
  r_ij = (δx, δy, δx² + δy²), δ = (x_j − x_i, y_j − y_i), through a learned gate λ_h:

      A^h = (1 − σ(λ_h))·softmax_j(s·q_i·k_j) + σ(λ_h)·softmax_j(v_hᵀ r_ij),
      out_i = Σ_j A^h_ij v_j.

  With v_h = α(2Δx_h, 2Δy_h, −1) the positional term is ∝ exp(−α‖δ − Δ_h‖²): a soft
  convolution kernel centred at offset Δ_h with locality strength α (the paper's local
  initialisation, done by `GPSAParams` below). The mask applies to both
  softmaxes; a row with nothing to attend to gives zeros.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, tokens in row-major order.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: boolean, broadcastable to `[batch, num_heads, seq, seq]`.
    is_causal: query i attends keys j <= i (in both softmaxes).
    scale: content logit scale s; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    pos_proj: v_pos `[num_heads, 3]`, weights of (δx, δy, δx² + δy²).
    gating: λ `[num_heads]`, the gate logits (σ(λ_h) is the positional share).

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  grid = _self_grid(dims, grid, "gpsa")
  common.check_weight("pos_proj", pos_proj, (dims.num_heads, 3), "[num_heads, 3]")
  common.check_weight("gating", gating, (dims.num_heads,), "[num_heads]")
  _, logits, full = common.scores(query, key, value, scale=scale, mask=mask,
                                  is_causal=is_causal)
  dy, dx = _offsets(grid)
  rel = jnp.asarray(np.stack([dx, dy, dx * dx + dy * dy], -1), jnp.float32)  # [t, t, 3]
  pos_logits = jnp.einsum("tsc,nc->nts", rel, pos_proj.astype(jnp.float32))
  pos_logits = pos_logits.reshape(dims.num_kv_heads, dims.groups, dims.q_len, dims.kv_len)
  gate = jax.nn.sigmoid(gating.astype(jnp.float32)).reshape(
      dims.num_kv_heads, dims.groups, 1, 1)
  weights = ((1.0 - gate) * common.masked_softmax(logits, full)
             + gate * common.masked_softmax(jnp.broadcast_to(pos_logits, logits.shape), full))
  return common.weighted_values(weights, value, dims).astype(query.dtype)


def relpos_table_sizes(grid: tuple[int, int], kv_grid: tuple[int, int]) -> tuple[int, int]:
  """Rows of `decomposed_relpos`'s tables R_h, R_w for queries on `grid` and keys on
  `kv_grid`: 2·max(h, h') − 1 and 2·max(w, w') − 1."""
  return tuple(2 * max(q, k) - 1 for q, k in zip(grid, kv_grid))


def _scaled_offsets(q_size: int, k_size: int) -> np.ndarray:
  """`[q_size, k_size]` table rows of MViTv2's relative positions along one axis: query and key
  positions on the finer grid, shifted to be >= 0."""
  q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
  dist = (np.arange(q_size)[:, None] * q_ratio - np.arange(k_size)[None, :] * k_ratio
          + (k_size - 1) * k_ratio)
  return np.floor(dist).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Positional-bias hooks around softmax attention.
# ------------------------------------------------------------------------------------------
@register("levit_bias", grid=True,
          head_args={"attention_bias": HeadArg()},
          block_refusal=(
              "its logits add B_h[|y_i − y_j|, |x_i − x_j|] at the global grid positions of the "
              "query and the key, which the ring's key blocks do not see"))
def levit_bias_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         grid=None, attention_bias=None):
  """Softmax attention with LeViT's attention bias: LeViT, a Vision Transformer in ConvNet's
  Clothing for Faster Inference (Graham et al., 2021).

  Each head has a table B_h indexed by the absolute offset between query and key on the grid,
  a translation-invariant positional bias added to the logits:

      out_i = Σ_j softmax_j(s·q_i·k_j + B_h[|y_i − y_j|, |x_i − x_j|]) v_j.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, tokens in row-major order.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: boolean, broadcastable to `[batch, num_heads, seq, seq]`.
    is_causal: query i attends keys j <= i.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    attention_bias: B `[num_heads, h, w]`.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  grid = _self_grid(dims, grid, "levit_bias")
  common.check_weight("attention_bias", attention_bias, (dims.num_heads,) + grid,
                      "[num_heads, h, w]")
  dy, dx = _offsets(grid)
  bias = attention_bias.astype(jnp.float32)[:, np.abs(dy), np.abs(dx)][None]
  return dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                               is_causal=is_causal, implementation="xla")


@register("decomposed_relpos", grid=True, head_args={},
          block_refusal=(
              "its logits add q_i·R_h[y_i − y_j] + q_i·R_w[x_i − x_j] at the global grid "
              "positions of the query and the key, which the ring's key blocks do not see"))
def decomposed_relpos_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                                grid=None, kv_grid=None, rel_h=None, rel_w=None):
  """Softmax attention with MViTv2's decomposed relative position embeddings: MViTv2, Improved
  Multiscale Vision Transformers for Classification and Detection (Li et al., 2022).

  The relative position embedding R_{p(i), p(j)} is decomposed along height and width and
  interacts with the (unscaled) query:

      logits_ij = s·q_i·k_j + q_i·R_h[y_i − y_j + h − 1] + q_i·R_w[x_i − x_j + w − 1],
      out_i = Σ_j softmax_j(logits_ij) v_j,

  so only 2h−1 + 2w−1 embeddings are learned instead of (2h−1)(2w−1). As in MViTv2 the tables
  are shared by the heads.

  Keys on another grid (MViTv2's pooled keys, `kv_grid=(h', w')`): the offsets are measured on
  the finer of the two grids, y_i·max(h'/h, 1) − y_j·max(h/h', 1) + (h' − 1)·max(h/h', 1)
  rounded down (the same along the width), into tables of 2·max(h, h') − 1 and
  2·max(w, w') − 1 rows.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, tokens in row-major order.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]` (`h'·w'` tokens with
      `kv_grid`).
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends keys j <= i.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)` of the queries, `h·w == q_len`.
    kv_grid: `(h', w')` of the keys, `h'·w' == kv_len`; None: the queries' grid.
    rel_h: R_h `[2·max(h, h') − 1, head_dim]`.
    rel_w: R_w `[2·max(w, w') − 1, head_dim]`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  if kv_grid is None:
    grid = _self_grid(dims, grid, "decomposed_relpos")
    kv_grid = grid
  else:
    grid = windowed.check_grid(grid, dims.q_len)
    kv_grid = windowed.check_grid(kv_grid, dims.kv_len, "kv_grid")
  rows_h, rows_w = relpos_table_sizes(grid, kv_grid)
  common.check_weight("rel_h", rel_h, (rows_h, dims.head_dim), "[2·max(h, h') − 1, head_dim]")
  common.check_weight("rel_w", rel_w, (rows_w, dims.head_dim), "[2·max(w, w') − 1, head_dim]")
  dist_h, dist_w = (_scaled_offsets(q, k) for q, k in zip(grid, kv_grid))
  ys, xs = np.divmod(np.arange(dims.q_len), grid[1])
  ky, kx = np.divmod(np.arange(dims.kv_len), kv_grid[1])
  q = query.astype(jnp.float32)
  q_rh = jnp.einsum("btnd,rd->bntr", q, rel_h.astype(jnp.float32))  # [b, n, t, rows_h]
  q_rw = jnp.einsum("btnd,rd->bntr", q, rel_w.astype(jnp.float32))
  rows = np.arange(dims.q_len)[:, None]
  bias = (q_rh[:, :, rows, dist_h[ys[:, None], ky[None]]]
          + q_rw[:, :, rows, dist_w[xs[:, None], kx[None]]])  # [b, n, t, s]
  return dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                               is_causal=is_causal, implementation="xla")


# ------------------------------------------------------------------------------------------
# Kernelized attention with relative positional encoding (FFT).
# ------------------------------------------------------------------------------------------
def _toeplitz_matmul(coeffs: Array, x: Array) -> Array:
  """y_i = Σ_j c_{i−j} x_j for i, j < n by FFT, O(n log n).

  x `[b, n, *rest]`; coeffs `[*rest', 2n − 1]` with `coeffs[..., n − 1 + r]` = c_r, where
  `rest'` has len(rest) axes broadcasting against `rest`. Returns `[b, n, *rest]`.
  """
  n = x.shape[1]
  size = 2 * n
  # Circulant first column of size 2n: c_0..c_{n−1}, 0, c_{−(n−1)}..c_{−1}.
  column = jnp.concatenate([coeffs[..., n - 1:], jnp.zeros_like(coeffs[..., :1]),
                            coeffs[..., :n - 1]], axis=-1)
  column_f = jnp.moveaxis(jnp.fft.rfft(column, n=size, axis=-1), -1, 0)  # [F, *rest']
  x_f = jnp.fft.rfft(x, n=size, axis=1)  # [b, F, *rest]
  return jnp.fft.irfft(x_f * column_f, n=size, axis=1)[:, :n]


def _check_kernelized_rpe(dims: common.Dims, rpe_bias, scale) -> float:
  """The scale of `kernelized_rpe` after the checks of its arguments."""
  if dims.q_len != dims.kv_len:
    raise ValueError("kernelized_rpe indexes b by i − j within one sequence: q_len must equal "
                     f"kv_len, got {dims.q_len} and {dims.kv_len}")
  n = dims.q_len
  common.check_weight("rpe_bias", rpe_bias, (dims.num_heads, 2 * n - 1),
                      "[num_heads, 2·seq − 1]")
  scale = common.default_scale(dims.head_dim, scale)
  if scale <= 0:
    raise ValueError(f"kernelized_rpe estimates exp(scale·q·k) and needs scale > 0, got {scale}")
  return scale


def _kernel_features(query, key, scale, features, feature_key, num_features, dims, dtype,
                     is_causal=False):
  """Performer's positive features `(φ(q) [b, t, k, g, m], φ(k) [b, s, k, m], C)` in `dtype`,
  stabilised by the maximum of each query's exponents and, per key head, by the maximum of the
  key exponents: over the whole sequence (C None), or when causal the running maximum
  `C [b, s, k]` up to each key j, so a key's features never depend on later keys (the
  product then weighs key j for query i by e^{C_j − C_i}). The constants cancel in the ratio;
  the 1/√m factors too."""
  w = linear._performer_features(  # pylint: disable=protected-access
      features, feature_key, num_features, dims.head_dim)
  root = jnp.sqrt(jnp.asarray(scale, dtype))
  q = common.group_query(query, dims.num_kv_heads).astype(dtype) * root  # [b, t, k, g, d]
  k = key.astype(dtype) * root
  w = w.astype(dtype)
  log_q = jnp.einsum("btkgd,md->btkgm", q, w) - 0.5 * jnp.sum(q * q, -1, keepdims=True)
  log_k = jnp.einsum("bskd,md->bskm", k, w) - 0.5 * jnp.sum(k * k, -1, keepdims=True)
  log_q = log_q - jax.lax.stop_gradient(jnp.max(log_q, axis=-1, keepdims=True))
  if not is_causal:
    log_k = log_k - jax.lax.stop_gradient(jnp.max(log_k, axis=(1, 3), keepdims=True))
    return jnp.exp(log_q), jnp.exp(log_k), None
  running = jax.lax.stop_gradient(jax.lax.cummax(jnp.max(log_k, axis=-1), axis=1))
  return jnp.exp(log_q), jnp.exp(log_k - running[..., None]), running


def _rpe_coefficients(rpe_bias, length: int, is_causal: bool, dtype):
  """e^{b_r − max b} `[num_heads, 2·length − 1]` (future offsets r < 0 are 0 when causal): the
  relative-position factors, stabilised by the maximum over the offsets a query can see."""
  b = rpe_bias.astype(dtype)
  if is_causal:  # offsets r = i − j < 0 are the future.
    b = jnp.where(jnp.arange(2 * length - 1) >= length - 1, b, common.MASKED_LOGIT)
  return jnp.exp(b - jax.lax.stop_gradient(jnp.max(b, axis=-1, keepdims=True)))


def _with_ones(value, dtype):
  """`[value, 1]` in `dtype`: the values and the normaliser's column of ones."""
  return jnp.concatenate([value.astype(dtype), jnp.ones(value.shape[:3] + (1,), dtype)], -1)


def _ratio(both, has_key):
  """Numerator over the last column (the normaliser) where a query has a key, 0 elsewhere."""
  num, den = both[..., :-1], both[..., -1:]
  return jnp.where(has_key, num / jnp.where(has_key, den, 1.0), 0.0)


def _rpe_terms(arrays, q_pos, k_pos, *, is_causal, length):
  """`kernelized_rpe`'s `PairTerms`: the multiplier e^{b_{i−j} − max b} at these positions."""
  coeffs = _rpe_coefficients(arrays["rpe_bias"], length, is_causal, jnp.float32)
  return None, coeffs[:, q_pos[:, None] - k_pos[None, :] + length - 1], None


def _kernelized_rpe_block_form(query, key, scale, *, rpe_bias=None, features=None,
                               feature_key=None, num_features=None) -> BlockForm:
  """Linear blocks of the features, weights e^{b_{i−j}}·φ(q_i)ᵀφ(k_j) at global positions,
  summed over [v, 1]; the output map divides by the normaliser."""
  dims = common.check_qkv(query, key, key)
  scale = _check_kernelized_rpe(dims, rpe_bias, scale)
  dtype = jnp.promote_types(jnp.float32, jnp.result_type(query, key))
  phi_q, phi_k, _ = _kernel_features(query, key, scale, features, feature_key, num_features,
                                     dims, dtype)
  phi_q = phi_q.reshape(dims.batch, dims.q_len, dims.num_heads, phi_q.shape[-1])
  return BlockForm(
      "linear", phi_q, phi_k, 1.0, value_map=lambda value: _with_ones(value, dtype),
      output_map=lambda out, value: _ratio(out, out[..., -1:] > 0).astype(value.dtype),
      pair_terms=PairTerms(_rpe_terms, (("length", dims.q_len),)),
      pair_arrays={"rpe_bias": rpe_bias})


@register("kernelized_rpe", segment_ids=True, block_form=_kernelized_rpe_block_form)
def kernelized_rpe_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                             segment_ids=None, rpe_bias=None, features=None, feature_key=None,
                             num_features=None):
  """Kernelized attention with relative positional encoding: Stable, Fast and Accurate:
  Kernelized Attention with Relative Positional Encoding (Luo et al., 2021).

  Softmax attention with an RPE bias, exp(s·q_i·k_j + b_{i−j}), is approximated with the
  positive random features of Performer (`performer`, φ(x) = exp(Wx' − ‖x'‖²/2)/√m,
  x' = √s·x):

      out_i = Σ_j e^{b_{i−j}} φ(q_i)ᵀφ(k_j) v_j / Σ_j e^{b_{i−j}} φ(q_i)ᵀφ(k_j).

  For every feature m, Σ_j e^{b_{i−j}} φ(k_j)_m [v_j, 1] is a Toeplitz matrix-vector product,
  computed with the FFT in O(n log n) (the paper's algorithm) instead of O(n²). Causal: only
  offsets j ≤ i, by divide and conquer (`toeplitz.causal_toeplitz`, O(n log² n)): a later
  block gets the FFT product of the earlier blocks only, and blocks of ≤ 16 tokens are summed
  directly, so no later token enters an earlier output, not even at round-off. Per query head,
  the exponent of b is stabilised by its maximum and each query's features by theirs; the key
  features by the maximum over the sequence, or when causal by the running maximum C_j up to
  key j (key j then weighs e^{C_j − C_i} ≤ 1 for query i); all cancel in the ratio. The FFT's
  round-off is relative to the largest term: in float32, terms with e^{b − max b} below ~1e-6
  are not resolved (compute in float64 for extreme biases).

  Args:
    query: `[batch, seq, num_heads, head_dim]`.
    key: `[batch, seq, num_kv_heads, head_dim]`.
    value: `[batch, seq, num_kv_heads, value_dim]`.
    mask: optional key-padding mask broadcastable to `[batch, num_heads, 1, seq]`; a row with
      no valid key returns zeros.
    is_causal: query i attends keys j <= i.
    scale: s of the estimated kernel exp(s·q·k); `1/sqrt(head_dim)` when None.
    segment_ids: `[batch, seq]` ints of packed sequences: query i attends the keys of its
      segment only, with b indexed by i − j as in each segment alone; the sums then run as a
      dense product, O(seq²·m), instead of the FFT.
    rpe_bias: b `[num_heads, 2·seq − 1]`, `rpe_bias[:, seq − 1 + r]` = b_r for r = i − j.
    features: W `[num_features, head_dim]` (`big_attn.ops.linear.orthogonal_random_features`);
      or
    feature_key: PRNG key (or int seed) from which W is drawn on each call; with neither,
      `performer`'s fixed default seed.
    num_features: m when drawing W; `linear.default_num_features(head_dim)` when None.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  scale = _check_kernelized_rpe(dims, rpe_bias, scale)
  n = dims.q_len
  key_valid = None
  if mask is not None:
    full = common.make_mask(dims, mask=mask)
    if full.shape[2] != 1:
      raise ValueError("kernelized_rpe supports key-padding masks only: mask must broadcast to "
                       f"[batch, num_heads, 1, seq], got shape {mask.shape}")
    key_valid = jnp.broadcast_to(full[:, :, 0, :], (full.shape[0], dims.num_heads, n))
  dtype = jnp.promote_types(jnp.float32, jnp.result_type(query, key, value))
  phi_q, phi_k, running = _kernel_features(query, key, scale, features, feature_key,
                                           num_features, dims, dtype, is_causal)
  coeffs = _rpe_coefficients(rpe_bias, n, is_causal, dtype).reshape(
      dims.num_kv_heads, dims.groups, 2 * n - 1)
  v1 = _with_ones(value, dtype)
  if segment_ids is not None:
    return _kernelized_rpe_segments(phi_q, phi_k, v1, coeffs, key_valid, segment_ids, dims,
                                    running).astype(query.dtype)
  kv = phi_k[..., :, None] * v1[..., None, :]  # [b, s, k, m, dv + 1]
  kv = jnp.broadcast_to(kv[:, :, :, None], kv.shape[:3] + (dims.groups,) + kv.shape[3:])
  if key_valid is not None:
    valid = jnp.swapaxes(key_valid, 1, 2).reshape(
        key_valid.shape[0], n, dims.num_kv_heads, dims.groups)
    kv = jnp.where(valid[..., None, None], kv, 0.0)
  if is_causal:  # Σ_{j≤i} e^{b_{i−j}} e^{C_j − C_i} φ(k_j)[v_j, 1], no later key read
    taps = jnp.moveaxis(coeffs[..., n - 1:], -1, 0)[..., None, None]  # [n, k, g, 1, 1]
    mixed = toeplitz.causal_toeplitz(taps, kv, running[:, :, :, None, None, None])
  else:
    mixed = _toeplitz_matmul(coeffs[..., None, None, :], kv)  # [b, t, k, g, m, dv + 1]
  both = jnp.einsum("btkgm,btkgmc->btkgc", phi_q, mixed)
  if key_valid is None:
    out = both[..., :-1] / both[..., -1:]
  else:
    out = _ratio(both, _any_valid_key(key_valid, dims, is_causal)[..., None])
  return out.reshape(dims.batch, n, dims.num_heads, dims.value_dim).astype(query.dtype)


def _kernelized_rpe_segments(phi_q, phi_k, v1, coeffs, key_valid, segment_ids, dims, running):
  """`kernelized_rpe`'s output over packed segments, densely: weights e^{b_{i−j}} φ(q_i)ᵀφ(k_j)
  over the allowed keys j of query i (its segment, j <= i when causal, not padded); causal
  when the key features are stabilised by the running maximum `running` C, with the factor
  e^{C_j − C_i}."""
  n = dims.q_len
  is_causal = running is not None
  same, _ = common.segment_layout(segment_ids, dims)  # [b, t, s]
  offset = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
  allowed = same[:, None] & ((offset >= 0) if is_causal else True)  # [b, 1, t, s]
  if key_valid is not None:
    allowed = allowed & key_valid[:, :, None, :]  # [b, heads, t, s]
  allowed = jnp.broadcast_to(allowed, (dims.batch, dims.num_heads, n, n)).reshape(
      dims.batch, dims.num_kv_heads, dims.groups, n, n)
  weights = (jnp.einsum("btkgm,bskm->bkgts", phi_q, phi_k) * coeffs[:, :, offset + n - 1])
  if is_causal:  # e^{C_j − C_i} ≤ 1 for j ≤ i; later keys are not allowed
    gap = jnp.moveaxis(running, 1, -1)
    weights = weights * jnp.exp(jnp.minimum(gap[:, :, None, None, :] - gap[:, :, None, :, None],
                                            0.0))
  weights = jnp.where(allowed, weights, 0.0)
  both = jnp.einsum("bkgts,bskc->btkgc", weights, v1)
  has_key = jnp.moveaxis(jnp.any(allowed, axis=-1), 3, 1)[..., None]  # [b, t, k, g, 1]
  out = _ratio(both, has_key)
  return out.reshape(dims.batch, n, dims.num_heads, dims.value_dim)


def _any_valid_key(key_valid: Array, dims: common.Dims, is_causal: bool) -> Array:
  """`[b|1, n, s]` key validity -> `[b|1, t, k, g]`: whether query i has a key to attend to."""
  seen = jnp.cumsum(key_valid, axis=-1) > 0 if is_causal else jnp.any(
      key_valid, axis=-1, keepdims=True)
  seen = jnp.broadcast_to(seen, key_valid.shape)
  return jnp.swapaxes(seen, 1, 2).reshape(
      key_valid.shape[0], dims.q_len, dims.num_kv_heads, dims.groups)


@register_params("gpsa")
class GPSAParams(OpParams):
  """Weights of ConViT's gated positional self-attention (d'Ascoli et al. 2021), initialised
  "locally" as in the paper (locality strength α = 1): `pos_proj [num_heads, 3]` weighs the
  offsets (δx, δy, δx² + δy²) with v_h = α(2Δx_h, 2Δy_h, −1), so head h attends around its own
  offset Δ_h on a √heads × √heads square centred at 0 (heads beyond that square reuse its
  offsets in order), and `gating [num_heads]` = 1 (the paper's λ init). Returns both.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    side = max(1, int(self.num_heads ** 0.5))
    center = (side - 1) / 2

    def local_init(rng, shape, dtype):
      del rng
      heads = jnp.arange(shape[0]) % (side * side)
      dy, dx = heads // side - center, heads % side - center
      return jnp.stack([2 * dx, 2 * dy, -jnp.ones_like(dx)], -1).astype(dtype)

    pos_proj = self.param("pos_proj", nn.with_logical_partitioning(local_init, ("heads", None)),
                          (self.num_heads, 3), self.param_dtype)
    gating = self.param("gating", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ("heads",)),
                        (self.num_heads,), self.param_dtype)
    pos_proj, gating = nn.dtypes.promote_dtype(pos_proj, gating, dtype=self.dtype)
    return {"pos_proj": pos_proj, "gating": gating}


@register_params("levit_bias")
class LeViTBiasParams(OpParams):
  """LeViT's per-head attention bias table `attention_bias [num_heads, h, w]` over the absolute
  offsets of the `op_args["grid"] = (h, w)` image, zero-initialised as in LeViT."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, key, value
    h, w = windowed.patch_grid(self.op_args, query.shape[1])
    table = self.param("attention_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("heads", None, None)),
                       (self.num_heads, h, w), self.param_dtype)
    (table,) = nn.dtypes.promote_dtype(table, dtype=self.dtype)
    return {"attention_bias": table}


@register_params("decomposed_relpos")
class DecomposedRelPosParams(OpParams):
  """MViTv2's decomposed relative position tables `rel_h [2·max(h, h') − 1, head_dim]` and
  `rel_w [2·max(w, w') − 1, head_dim]` for queries on the `op_args["grid"] = (h, w)` image and
  keys on `op_args["kv_grid"] = (h', w')` (the queries' grid when absent), shared by the heads
  and truncated-normal initialised with std 0.02 as in MViTv2."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, value
    grid = windowed.patch_grid(self.op_args, query.shape[1])
    kv_grid = (self.op_args or {}).get("kv_grid")
    kv_grid = grid if kv_grid is None else windowed.check_grid(kv_grid, key.shape[1], "kv_grid")
    rows_h, rows_w = relpos_table_sizes(grid, kv_grid)
    init = nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02),
                                        (None, "head_dim"))
    rel_h = self.param("rel_h", init, (rows_h, self.head_dim), self.param_dtype)
    rel_w = self.param("rel_w", init, (rows_w, self.head_dim), self.param_dtype)
    rel_h, rel_w = nn.dtypes.promote_dtype(rel_h, rel_w, dtype=self.dtype)
    return {"rel_h": rel_h, "rel_w": rel_w}


@register_params("kernelized_rpe")
class KernelizedRPEParams(OpParams):
  """The relative positional encoding `rpe_bias [num_heads, 2·seq − 1]` of kernelized attention
  with RPE (Luo et al. 2021), sized by the query length (a fixed-length model), zero-initialised
  (no positional preference at the start). The random features come from
  `op_args["feature_key"]` (or `"features"`; neither: a fixed seed), as for `performer`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, key, value
    length = query.shape[1]
    rpe = self.param("rpe_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("heads", None)),
                     (self.num_heads, 2 * length - 1), self.param_dtype)
    (rpe,) = nn.dtypes.promote_dtype(rpe, dtype=self.dtype)
    return {"rpe_bias": rpe}
