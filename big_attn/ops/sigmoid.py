"""Sigmoid attention: an element-wise sigmoid in place of the row-wise softmax."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, register
from big_attn.ops.softmax import pallas_attention

IMPLEMENTATIONS = (None, "xla", "pallas")


def _default_logit_bias(kv_len: int) -> float:
  """The paper's b = -log n for n keys (0 for no keys: the sum over keys is empty)."""
  return -math.log(max(kv_len, 1))


def _check_logit_bias(logit_bias, kv_len: int) -> jax.Array:
  """The scalar `b` as a float32 array; `-log(kv_len)` when None (0 for no keys: the sum over
  keys is empty)."""
  if logit_bias is None:
    return jnp.float32(_default_logit_bias(kv_len))
  if not isinstance(logit_bias, (int, float)) and not hasattr(logit_bias, "dtype"):
    raise TypeError(
        f"logit_bias must be a number or a scalar array, got {type(logit_bias).__name__}")
  b = jnp.asarray(logit_bias)
  if b.ndim != 0:
    raise ValueError(f"logit_bias must be a scalar, got shape {b.shape}")
  if not jnp.issubdtype(b.dtype, jnp.floating) and not jnp.issubdtype(b.dtype, jnp.integer):
    raise TypeError(f"logit_bias must be real, got dtype {b.dtype}")
  return b.astype(jnp.float32)


def _flash_sigmoid(query, key, value, *, mask, bias, logit_bias, scale, **kwargs):
  """`sigmoid_attention` through the FlashSigmoid kernel of `pallas_kernels.flash_attention`."""
  if logit_bias is not None and (isinstance(logit_bias, bool)
                                 or not isinstance(logit_bias, (int, float))):
    raise TypeError("sigmoid implementation='pallas' takes logit_bias as a Python number, got "
                    f"{type(logit_bias).__name__}")
  dims = common.check_qkv(query, key, value)
  return pallas_attention(
      query, key, value, mask=mask, bias=bias, caller="sigmoid ",
      scale=common.default_scale(dims.head_dim, scale), normalizer="sigmoid",
      sigmoid_bias=None if logit_bias is None else float(logit_bias), **kwargs)


def _sigmoid_block_form(query, key, scale, *, logit_bias=None, logits_soft_cap=None):
  """Sigmoid attention in blocks whose outputs add (there is no normaliser); b = -log n with n
  the whole sequence's `kv_len`, and b a Python number (a constant of the merge)."""
  if logit_bias is not None and (isinstance(logit_bias, bool)
                                 or not isinstance(logit_bias, (int, float))):
    raise TypeError("sequence-parallel sigmoid attention takes logit_bias as a Python number "
                    f"or None, got {type(logit_bias).__name__}")
  if logits_soft_cap is not None:
    logits_soft_cap = checks.positive_float("logits_soft_cap", logits_soft_cap)
  b = _default_logit_bias(key.shape[1]) if logit_bias is None else float(logit_bias)
  return BlockForm("sigmoid", query, key, scale, {"logit_bias": b, "soft_cap": logits_soft_cap})


@register("sigmoid", segment_ids=True, implementation=True, bias=True,
          block_form=_sigmoid_block_form)
def sigmoid_attention(query, key, value, *, mask=None, is_causal=False, scale=None, bias=None,
                      logit_bias=None, segment_ids=None, local_window_size=None,
                      logits_soft_cap=None, implementation=None):
  """Sigmoid attention (Theory, Analysis, and Best Practices for Sigmoid Self-Attention).

  out_i = Σ_j m_ij σ(cap·tanh(s·q_i·k_j/cap) + B_ij + b) v_j, with b = -log n

  where m is the combined mask (masked keys contribute 0), B the additive `bias` and n the
  number of keys (`kv_len`), the paper's recommended bias that keeps the initial row sums of
  the weights near 1. There is no normalisation over the keys, so a query row with nothing to
  attend to returns zeros. The arguments mean what they mean in `dot_product_attention`
  (the soft cap is applied before `bias`, then `b` is added); the sigmoid is evaluated in
  float32 for any input dtype.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`, `num_heads % num_kv_heads == 0`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: optional boolean mask (True = may attend), broadcastable to
      `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends to keys j <= i.
    scale: logit scale; `1/sqrt(head_dim)` when None.
    bias: optional additive logit bias broadcastable like `mask`.
    logit_bias: the scalar b (a number or a scalar array, differentiable); `-log(kv_len)`
      when None.
    segment_ids: `[batch, seq]` ints or a pair `(q_segment_ids, kv_segment_ids)`.
    local_window_size: int or `(left, right)`: query i attends keys in `[i-left, i+right]`.
    logits_soft_cap: if set, logits become `cap * tanh(logits / cap)` (before the biases).
    implementation: None or "xla": the XLA computation; "pallas": the FlashSigmoid kernel
      (`pallas_kernels.flash_attention(normalizer="sigmoid")`, FlashSigmoid, Ramapuram et al.
      2024; in the Pallas interpreter on CPU), which takes `logit_bias` as a Python number and
      expresses masks as `is_causal`, `segment_ids` and `local_window_size` (no `mask` or
      `bias` array).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas":
    return _flash_sigmoid(query, key, value, mask=mask, bias=bias, is_causal=is_causal,
                          scale=scale, logit_bias=logit_bias, segment_ids=segment_ids,
                          local_window_size=local_window_size, logits_soft_cap=logits_soft_cap)
  dims, logits, gmask = common.scores(
      query, key, value, scale=scale, bias=bias, mask=mask, is_causal=is_causal,
      segment_ids=segment_ids, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap)
  b = _check_logit_bias(logit_bias, dims.kv_len)
  weights = jax.nn.sigmoid(logits + b)
  if gmask is not None:
    weights = jnp.where(gmask, weights, 0.0)
  return common.weighted_values(weights, value, dims).astype(query.dtype)
