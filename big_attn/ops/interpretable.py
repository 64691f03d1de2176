"""Interpretable multi-head attention of the Temporal Fusion Transformer."""
from __future__ import annotations

import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import register


@register("interpretable_mha", segment_ids=True)
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
  if shared_value is None:
    shared_value = jnp.mean(value.astype(jnp.float32), axis=2)
  else:
    common.check_weight("shared_value", shared_value, (dims.batch, dims.kv_len,
                                                       dims.value_dim),
                        "[batch, kv_len, value_dim]")
  mean_weights = jnp.mean(common.masked_softmax(logits, full_mask), axis=(1, 2))  # [b, t, s]
  out = jnp.einsum("bts,bsd->btd", mean_weights, shared_value.astype(jnp.float32))
  return jnp.broadcast_to(out[:, :, None], (dims.batch, dims.q_len, dims.num_heads,
                                            dims.value_dim)).astype(query.dtype)
