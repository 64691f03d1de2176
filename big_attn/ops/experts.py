"""Mixture-of-experts attention: SwitchHead (value and output projections picked per token).

The top-k choices are discrete: gradients flow through the selected experts and their gate
values, not through the selection.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array


def sigmoid_topk_gate(logits: Array, topk: int) -> Array:
  """σ(logits) on the `topk` largest entries of the last axis, 0 elsewhere (float32).

  SwitchHead's non-competitive gate: the selected scores are not renormalised.
  """
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), topk)
  selected = jnp.sum(jax.nn.one_hot(chosen, scores.shape[-1], dtype=scores.dtype), axis=-2)
  return scores * selected


def _experts(dims: common.Dims, value_experts, router_logits_v, router_logits_o, out_experts,
             topk, num_experts):
  """SwitchHead's mixed values v_j `[batch, kv_len, num_kv_heads, value_dim]` and output map
  o ↦ y, after the argument checks of `switchhead_attention` against `dims`."""
  if value_experts is None or getattr(value_experts, "ndim", 0) != 5:
    raise ValueError("switchhead needs value_experts [batch, kv_len, num_kv_heads, E, "
                     f"value_dim], got {getattr(value_experts, 'shape', value_experts)!r}")
  num, dv = value_experts.shape[3:]
  common.check_weight("value_experts", value_experts,
                      (dims.batch, dims.kv_len, dims.num_kv_heads, num, dv),
                      "[batch, kv_len, num_kv_heads, E, value_dim]")
  if num_experts is not None and num_experts != num:
    raise ValueError(f"num_experts={num_experts!r} disagrees with value_experts of shape "
                     f"{value_experts.shape} (E = {num})")
  common.check_weight("router_logits_v", router_logits_v,
                      (dims.batch, dims.kv_len, dims.num_kv_heads, num),
                      "[batch, kv_len, num_kv_heads, E]")
  common.check_weight("router_logits_o", router_logits_o,
                      (dims.batch, dims.q_len, dims.num_heads, num),
                      "[batch, q_len, num_heads, E]")
  if out_experts is None or getattr(out_experts, "ndim", 0) != 4:
    raise ValueError("switchhead needs out_experts [num_heads, E, value_dim, out_dim], got "
                     f"{getattr(out_experts, 'shape', out_experts)!r}")
  common.check_weight("out_experts", out_experts,
                      (dims.num_heads, num, dv, out_experts.shape[-1]),
                      "[num_heads, E, value_dim, out_dim]")
  topk = checks.int_in_range("topk", topk, 1, num)

  gate_v = sigmoid_topk_gate(router_logits_v, topk)
  mixed = jnp.einsum("bske,bsked->bskd", gate_v.astype(value_experts.dtype), value_experts,
                     preferred_element_type=jnp.float32).astype(value_experts.dtype)
  gate_o = sigmoid_topk_gate(router_logits_o, int(topk))

  def output(heads):
    return jnp.einsum("btne,btnd,nedo->btno", gate_o, heads.astype(jnp.float32),
                      out_experts.astype(jnp.float32)).astype(heads.dtype)

  return mixed, output


def _switchhead_block_form(query, key, scale, *, value_experts=None, router_logits_v=None,
                           router_logits_o=None, out_experts=None, topk=2,
                           num_experts=None) -> BlockForm:
  """Softmax blocks over the mixed values v_j (the value map; the dense values only fix the
  layout, which the keys share), merged through the log-sum-exp, then the output experts of
  each query token (the output map)."""
  mixed, output = _experts(common.check_qkv(query, key, key), value_experts, router_logits_v,
                           router_logits_o, out_experts, topk, num_experts)
  return BlockForm("softmax", query, key, scale, value_map=lambda value: mixed,
                   output_map=lambda out, _: output(out))


@register("switchhead", segment_ids=True, block_form=_switchhead_block_form)
def switchhead_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         value_experts=None, router_logits_v=None, router_logits_o=None,
                         out_experts=None, topk=2, num_experts=None, segment_ids=None):
  """SwitchHead: Accelerating Transformers with Mixture-of-Experts Attention (Csordás et al.,
  2024), the attention of MoEUT.

  Each head h has E value projections and E output projections; a sigmoid router picks the
  top-k of each per token, non-competitively (σ scores, no renormalisation):

      s^V_j = σ(x_j W^V_S),   v_j = Σ_{e ∈ topk(s^V_j)} s^V_{j,e} x_j W^V_e,
      o_i = Σ_j softmax_j(s·q_i·k_j) v_j,
      s^O_i = σ(x_i W^O_S),   y_i = Σ_{e ∈ topk(s^O_i)} s^O_{i,e} o_i W^O_e,

  per head (queries and keys are dense, as in the paper's final form).

  Split of responsibilities: this op receives the per-expert projected values x_j W^V_e
  (`value_experts`), the router logits and the output-expert matrices; the Linen module
  `SwitchHeadParams` (below) owns W^V_e, W^V_S, W^O_S and W^O_e and computes
  the first three from `inputs_q` (self-attention). The op returns y per head; summing the heads
  gives the paper's output (`big_attn.layers.Attention` applies its shared output projection
  after it). The dense `value` argument only fixes the layout (batch, kv_len, kv heads); its
  entries are not used.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, any]`, layout only.
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends keys j <= i.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    value_experts: x_j W^V_e `[batch, kv_len, num_kv_heads, E, value_dim]`.
    router_logits_v: x_j W^V_S `[batch, kv_len, num_kv_heads, E]`.
    router_logits_o: x_i W^O_S `[batch, q_len, num_heads, E]`.
    out_experts: W^O_e `[num_heads, E, value_dim, out_dim]`.
    topk: experts chosen per token and head, in [1, E].
    num_experts: E, checked against the arrays when given.
    segment_ids: as in `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, out_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  mixed, output = _experts(dims, value_experts, router_logits_v, router_logits_o, out_experts,
                           topk, num_experts)
  heads = dot_product_attention(query, key, mixed, mask=mask, scale=scale, is_causal=is_causal,
                                segment_ids=segment_ids, implementation="xla")
  return output(heads).astype(query.dtype)


@register_params("switchhead")
class SwitchHeadParams(OpParams):
  """The experts and routers of SwitchHead (Csordás et al. 2024; MoEUT's attention).

  `op_args["num_experts"]` E (4 by default) and `op_args["topk"]` k (2 by default). Owns, per
  head, the value experts `value_expert_kernel [features, num_kv_heads, E, value_dim]`, the
  routers `router_v [features, num_kv_heads, E]` and `router_o [features, num_heads, E]`, and
  the output experts `out_experts [num_heads, E, value_dim, value_dim]` (value_dim the width of
  the layer's values, head_dim in most models), all fan-in scaled
  normal (variance 1/fan_in). From `inputs_q` (self-attention: keys and values come from the
  same tokens) it returns `value_experts`, `router_logits_v`, `router_logits_o` and
  `out_experts` for the `switchhead` op. The layer's dense value projection is then unused by
  the op, and its output projection follows the output experts.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query
    op_args = self.op_args or {}
    num = checks.positive_int("op_args['num_experts']", op_args.get("num_experts", 4))
    checks.int_in_range("op_args['topk']", op_args.get("topk", 2), 1, num)
    if inputs_q.shape[1] != key.shape[1]:
      raise ValueError("switchhead's parameters are computed from inputs_q: it supports "
                       f"self-attention only, got q_len {inputs_q.shape[1]} and kv_len "
                       f"{key.shape[1]}")
    features, d = inputs_q.shape[-1], value.shape[-1]
    init = lambda fan_in: nn.initializers.normal(stddev=fan_in ** -0.5)  # pylint: disable=g-long-lambda
    kernel = self.param("value_expert_kernel", nn.with_logical_partitioning(
        init(features), ("embed", "kv_heads", "experts", "head_dim")),
                        (features, self.num_kv_heads, num, d), self.param_dtype)
    router_v = self.param("router_v", nn.with_logical_partitioning(
        init(features), ("embed", "kv_heads", "experts")),
                          (features, self.num_kv_heads, num), self.param_dtype)
    router_o = self.param("router_o", nn.with_logical_partitioning(
        init(features), ("embed", "heads", "experts")),
                          (features, self.num_heads, num), self.param_dtype)
    out_experts = self.param("out_experts", nn.with_logical_partitioning(
        init(d), ("heads", "experts", "head_dim", None)),
                             (self.num_heads, num, d, d), self.param_dtype)
    x, kernel, router_v, router_o, out_experts = nn.dtypes.promote_dtype(
        inputs_q, kernel, router_v, router_o, out_experts, dtype=self.dtype)
    return {"value_experts": jnp.einsum("bsf,fked->bsked", x, kernel),
            "router_logits_v": jnp.einsum("bsf,fke->bske", x, router_v),
            "router_logits_o": jnp.einsum("bsf,fne->bsne", x, router_o),
            "out_experts": out_experts}
