"""Interpretable multi-head attention of the Temporal Fusion Transformer."""
from __future__ import annotations

import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import BlockForm, register


def _shared_values(value, shared_value):
  """TFT's shared values `[batch, kv_len, value_dim]` in float32: `shared_value` (checked
  against `value`'s layout) or the mean of `value` over its key/value heads."""
  if shared_value is None:
    return jnp.mean(value.astype(jnp.float32), axis=2)
  b, s, _, dv = value.shape
  common.check_weight("shared_value", shared_value, (b, s, dv), "[batch, kv_len, value_dim]")
  return shared_value.astype(jnp.float32)


def _head_mean(out):
  """The mean over heads of `[batch, q_len, heads, d]`, on every head."""
  return jnp.broadcast_to(jnp.mean(out.astype(jnp.float32), axis=2, keepdims=True), out.shape)


def _interpretable_block_form(query, key, scale, *, shared_value=None) -> BlockForm:
  """Softmax blocks of every head over the shared values (on each key head), merged through
  the log-sum-exp; the mean over heads of the merged outputs is Ã (X W_V)."""
  def shared_on_heads(value):
    shared = _shared_values(value, shared_value)[:, :, None]
    return jnp.broadcast_to(shared, value.shape[:3] + shared.shape[-1:]).astype(value.dtype)

  return BlockForm("softmax", query, key, scale, value_map=shared_on_heads,
                   output_map=lambda out, _: _head_mean(out).astype(out.dtype))


@register("interpretable_mha", segment_ids=True, block_form=_interpretable_block_form)
def interpretable_mha(query, key, value, *, mask=None, is_causal=False, scale=None,
                      shared_value=None, segment_ids=None):
  """Interpretable multi-head attention (Temporal Fusion Transformers for Interpretable
  Multi-horizon Time Series Forecasting, Lim et al. 2021): the heads share one value
  projection and their weights are averaged, so one matrix Ã explains the output.

    Ã = (1/H) Σ_h softmax(s·Q_h K_hᵀ, masked),   out = Ã (X W_V)

  The shared values X W_V are `shared_value`, or (None) the mean of `value` over its K/V
  heads: the layer's value projection averaged over heads is one shared projection (exactly
  TFT's with num_kv_heads=1), so the op needs no weights of its own. The result, the same for
  every head, is returned on every head; the layer's output projection then sums W_H over
  heads (TFT's H̃ W_H). Causal: keys j > i are masked.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    shared_value: `[batch, kv_len, value_dim]` or None.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  shared = _shared_values(value, shared_value)
  mean_weights = jnp.mean(common.masked_softmax(logits, full_mask), axis=(1, 2))  # [b, t, s]
  out = jnp.einsum("bts,bsd->btd", mean_weights, shared)
  return jnp.broadcast_to(out[:, :, None], (dims.batch, dims.q_len, dims.num_heads,
                                            dims.value_dim)).astype(query.dtype)
