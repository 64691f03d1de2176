"""Plain-JAX reference for `flash_attention`: float32 einsums with explicit masks.

Its matmuls run at `Precision.HIGHEST`: on a GPU the default rounds float32 operands to TF32
(10-bit mantissa), which put the reference 1e-3 away from the kernels' IEEE float32 on an H200.

Same signature and semantics as `pallas_kernels.flash_attention`; it builds the full
`[batch, heads, q_len, kv_len]` logits, so it is the correctness baseline and the XLA fallback
for short sequences, not a long-sequence path. `block_sizes`, `backend` and `interpret` are
accepted and ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.flash_attention import gpu_triton

_PRECISION = jax.lax.Precision.HIGHEST


def flash_attention_reference(query, key, value, *, segment_ids=None, is_causal=False,
                              scale=None, local_window_size=None, logits_soft_cap=None,
                              normalizer="softmax", sigmoid_bias=None, block_sizes=None,
                              backend=None, interpret=False, return_residuals=False):
  """softmax(S) V, σ(S + b) V or (sign(S) ∘ softmax(|S|)) V with S = cap·tanh(scale·QKᵀ/cap),
  masked, in float32.

  Masked keys get zero weight; a query row with nothing to attend to returns zeros. K/V heads
  are shared by groups of query heads (GQA) through a grouped einsum, never repeated.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; with `return_residuals`,
    `(out, lse)` with the float32 natural-log log-sum-exp `[batch, q_len, num_heads]` of the
    visible logits (-inf for a row with nothing to attend to, not differentiated).
  """
  del backend, interpret
  dims, _, scale, window, cap, sigmoid_bias, _ = gpu_triton.check_args(
      query, key, value, segment_ids=segment_ids, scale=scale,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      normalizer=normalizer, sigmoid_bias=sigmoid_bias, block_sizes=block_sizes,
      max_head_dim=None, return_residuals=return_residuals)
  mask = common.make_mask(dims, is_causal=is_causal, segment_ids=segment_ids,
                          local_window_size=window)
  mask = common.grouped(mask, dims)
  logits = common.attention_logits(query, key, dims, scale, precision=_PRECISION)  # [b,k,g,t,s]
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  if normalizer == "sigmoid":
    weights = jax.nn.sigmoid(logits + sigmoid_bias)
    if mask is not None:
      weights = jnp.where(mask, weights, 0.0)
  elif normalizer == "signed":
    weights = jnp.sign(logits) * common.masked_softmax(jnp.abs(logits), mask)
  else:
    weights = common.masked_softmax(logits, mask)
  out = common.weighted_values(weights, value, dims, precision=_PRECISION).astype(query.dtype)
  if not return_residuals:
    return out
  visible = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(visible, axis=-1)  # [b, k, g, t]
  lse = lse.reshape(dims.batch, dims.num_heads, dims.q_len).transpose(0, 2, 1)
  return out, jax.lax.stop_gradient(lse)
