"""Super Attention: softmax attention over values mixed along the sequence by a learned ℓ×ℓ
alignment matrix (from the left), shared by the heads."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params


@register("super_attention", segment_ids=True, head_args={},
          block_refusal=(
              "its values are mixed along the whole sequence by the learned kv_len x kv_len "
              "alignment W_A before the attention weights apply, so a key block's share needs "
              "the values of every other block"))
def super_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                    alignment=None, segment_ids=None):
  """Super Attention (You Need to Pay Better Attention: Rethinking the Mathematics of Attention
  Mechanism, Hosseini & Hosseini 2024): the values are transformed from the left by a learned
  alignment matrix W_A `[ℓ, ℓ]` over the value sequence, shared by all heads,

      out_h = softmax(s·Q_h K_hᵀ + mask) · (W_A V_h),

  with W_A lower-triangular under `is_causal` (so no output reads a later value) and, with
  `segment_ids`, restricted to pairs of values in the same segment. The paper's Super Attention
  layer pairs this op with the "efficient" projections of `big_attn.layers.Attention` (keys and
  values are the input's head slices, only W_Q and W_O are learned): `2·d² + ℓ²` weights instead
  of standard attention's `4·d²`. ℓ is fixed by the weights: the op serves one sequence length.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention` (the mask acts on the
      attention weights).
    alignment: W_A `[kv_len, kv_len]`, row j the mix of values that key j carries.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; rows with no key give zeros.
  """
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  common.check_weight("alignment", alignment, (dims.kv_len, dims.kv_len), "[kv_len, kv_len]")
  mix = alignment.astype(jnp.float32)
  if is_causal:
    mix = jnp.tril(mix)
  mix = jnp.broadcast_to(mix, (1, dims.kv_len, dims.kv_len))
  if segment_ids is not None:
    _, kv_seg = common.normalize_segment_ids(segment_ids, dims)
    mix = jnp.where(kv_seg[:, :, None] == kv_seg[:, None, :], mix, 0.0)
  mixed = jnp.einsum("bjm,bmkd->bjkd", mix, value.astype(jnp.float32))
  probs = common.masked_softmax(logits, full_mask)
  return common.weighted_values(probs, mixed, dims).astype(query.dtype)


@register_params("super_attention")
class SuperAttentionParams(OpParams):
  """W_A `alignment` `[kv_len, kv_len]` at the length of the values the layer first sees,
  initialised to the identity (the op starts as attention over the unmixed values)."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key
    length = value.shape[1]
    alignment = self.param(
        "alignment", nn.with_logical_partitioning(
            lambda _, shape, dtype: jnp.eye(shape[0], dtype=dtype), (None, None)),
        (length, length), self.param_dtype)
    return {"alignment": nn.dtypes.promote_dtype(alignment, dtype=self.dtype)[0]}
