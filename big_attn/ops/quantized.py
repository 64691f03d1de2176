"""Quantised attention: SageAttention's int8 QKᵀ with smoothed keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import register

INT8_MAX = 127.0
PV_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def quantize_blocks(x: jax.Array, block: int, is_causal: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per token block and head: `[b, t, h, d]` -> (int8 `[b, t, h, d]`,
  float32 scales `[b, t, h]` with x ≈ int8 · scale; scale = max|x| / 127 over the block).

  With `is_causal` token i's scale is the max over the tokens of its block up to i (a prefix
  max), so no quantised token depends on a later one. A NaN makes its scale NaN.
  """
  b, t, h, d = x.shape
  num_blocks = -(-t // block)
  x = x.astype(jnp.float32)
  padded = jnp.pad(x, ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)))
  padded = padded.reshape(b, num_blocks, block, h, d)
  amax = jnp.max(jnp.abs(padded), axis=4, keepdims=True)
  if is_causal:
    amax = jax.lax.cummax(amax, axis=2)
  else:
    amax = jnp.broadcast_to(jnp.max(amax, axis=2, keepdims=True), amax.shape)
  scale = jnp.where(amax == 0.0, 1.0, amax / INT8_MAX)
  q = jnp.clip(jnp.round(padded / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return q.reshape(b, -1, h, d)[:, :t], scale.reshape(b, -1, h)[:, :t]


def _smoothing_mean(key: jax.Array, block_k: int, is_causal: bool) -> jax.Array:
  """The mean μ subtracted from the keys, per key token `[b, s, h, d]`: over all keys, or with
  `is_causal` over keys 0..start of the token's block (keys every query of the block sees)."""
  if not is_causal:
    return jnp.broadcast_to(jnp.mean(key, axis=1, keepdims=True), key.shape)
  s = key.shape[1]
  starts = jnp.arange(s) // block_k * block_k
  return (jnp.cumsum(key, axis=1)[:, starts]
          / (starts + 1).astype(key.dtype)[None, :, None, None])


def quantize_query_key(query, key, block_q: int, block_k: int, is_causal: bool = False):
  """SageAttention's quantisation of the scores' operands: `(q8, q_scale, k8, k_scale, mean)`
  with Q ≈ q8·q_scale and K − μ ≈ k8·k_scale (`quantize_blocks` over blocks of `block_q` /
  `block_k` tokens), μ `[b, s, h, d]` the smoothing mean of each key token
  (`_smoothing_mean`); float32 except the int8 arrays."""
  key = key.astype(jnp.float32)
  mean = _smoothing_mean(key, block_k, is_causal)
  q8, q_scale = quantize_blocks(query, block_q, is_causal)
  k8, k_scale = quantize_blocks(key - mean, block_k, is_causal)
  return q8, q_scale, k8, k_scale, mean


def _float_attention(query, key, value, bias, gmask, dims, scale):
  """The float softmax attention whose backward pass the int8 op uses."""
  logits = common.attention_logits(query, key, dims, scale)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = common.masked_softmax(logits, gmask)
  return common.weighted_values(probs, value, dims).astype(query.dtype)


def _int8_attention(query, key, value, bias, gmask, dims, scale, block_q, block_k, pv_dtype,
                    is_causal):
  q8, q_scale, k8, k_scale, mean = quantize_query_key(query, key, block_q, block_k, is_causal)
  q8 = common.group_query(q8, dims.num_kv_heads)
  qk = jnp.einsum("btkgd,bskd->bkgts", q8, k8, preferred_element_type=jnp.int32)
  q_scale = q_scale.reshape(dims.batch, dims.q_len, dims.num_kv_heads, dims.groups)
  logits = (qk.astype(jnp.float32) * jnp.float32(scale)
            * jnp.transpose(q_scale, (0, 2, 3, 1))[..., None]
            * jnp.transpose(k_scale, (0, 2, 1))[:, :, None, None, :])
  if is_causal:  # μ differs between key blocks: add back s·q_i·μ_j (one term per block).
    starts = jnp.arange(0, dims.kv_len, block_k)
    q_mean = common.attention_logits(query, mean[:, starts], dims, scale)  # [b, k, g, t, S]
    logits = logits + q_mean[..., jnp.arange(dims.kv_len) // block_k]
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = common.masked_softmax(logits, gmask)
  out = common.weighted_values(probs.astype(pv_dtype), value.astype(pv_dtype), dims)
  return out.astype(query.dtype)


@register("sage_int8", segment_ids=True, bias=True, head_args={},
          block_refusal=(
              "its int8 scales are maxima over blocks of block_q / block_k tokens and its keys "
              "are smoothed by prefix means over key blocks, so its result depends on how the "
              "whole sequence is cut into quantisation blocks, which shards computing their own "
              "blocks would not reproduce"))
def sage_int8_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                        bias=None, segment_ids=None, local_window_size=None, block_q=128,
                        block_k=64, pv_dtype=jnp.bfloat16):
  """SageAttention (SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
  Acceleration, Zhang et al. 2024): int8 QKᵀ with smoothed keys, low-precision PV.

    K̃ = K − mean_seq(K)                 (per batch and head; softmax(q·(k_j − μ)) = softmax(q·k_j))
    Q̂ = int8(Q / δ_Q),  K̂ = int8(K̃ / δ_K),  δ = max|x| / 127 per block of `block_q` / `block_k`
        tokens and head (symmetric, round to nearest)
    S = s · (Q̂ K̂ᵀ)_int32 · δ_Q δ_K + B;   P = softmax(S) in float32
    out = P V with P and V in `pv_dtype` (bfloat16 by default; the paper uses fp16) and float32
        accumulation

  The score matmul is a true int8×int8→int32 `dot_general`. Smoothing removes the large
  channel-wise offset keys share, which otherwise dominates max|K| and wastes the int8 range.
  Accuracy against float softmax attention on N(0, 1) inputs with keys offset by a shared
  mean of 2 (`tests/test_ops_quantized.py`, head_dim 32): relative L2 error 0.75-0.95% and
  cosine similarity 0.99996-0.99997; the int8 rounding dominates, bfloat16 PV adds ~0.03%.

  With `is_causal` no output depends on a later token: each token's scale δ is the max over
  its block's tokens up to itself (a prefix max, at least as fine as the block's), and the
  keys of block r are smoothed with μ_r = mean(k_0..k_{r·block_k}), the keys every query of
  the block sees; as μ_r differs between blocks, s·q_i·μ_r is added back to the logits in
  float (a [q_len, kv_len / block_k] product), so the smoothing stays exact.
  A NaN input makes the scale of its quantisation block NaN, so the rows of that block (or
  every row, for a key moving μ) give NaN instead of a finite result.

  Gradients are straight-through: the backward pass is that of float softmax attention on the
  same inputs (the paper targets inference; this lets the op sit in a trained model).

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, bias, segment_ids, local_window_size: as `dot_product_attention`.
    block_q, block_k: token block sizes of the Q and K quantisation scales (paper: 128, 64).
    pv_dtype: dtype of P and V in the PV matmul: bfloat16, float16 or float32.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  common.check_bias(bias, dims)
  checks.positive_int("block_q", block_q)
  checks.positive_int("block_k", block_k)
  try:
    pv = jnp.dtype(pv_dtype)
  except TypeError:
    pv = None
  if pv not in [jnp.dtype(d) for d in PV_DTYPES]:
    raise ValueError(f"pv_dtype must be bfloat16, float16 or float32, got {pv_dtype!r}")
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                               local_window_size=local_window_size)
  gmask = common.grouped(full_mask, dims)
  gbias = common.grouped(bias, dims)
  scale = common.default_scale(dims.head_dim, scale)

  @jax.custom_vjp
  def attend(q, k, v, b, m):
    return _int8_attention(q, k, v, b, m, dims, scale, block_q, block_k, pv, is_causal)

  def attend_fwd(q, k, v, b, m):
    return attend(q, k, v, b, m), (q, k, v, b, m)

  def attend_bwd(residuals, cotangent):
    *arrays, m = residuals
    float_fn = lambda q, k, v, b: _float_attention(q, k, v, b, m, dims, scale)
    return (*jax.vjp(float_fn, *arrays)[1](cotangent), None)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(query, key, value, gbias, gmask)
