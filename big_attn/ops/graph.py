"""Attention read as message passing on the graph of its weights A = softmax(s·QKᵀ, masked).

`relational_attention` sends relations along with the values, `reversed_attention` sends
along the transposed graph (children to parents) and `gin_attention` aggregates with a Graph
Isomorphism Network update. Their weights are arguments; the parameter modules below own them
for the `Attention` layer. Masks, `is_causal` (where a causal form exists) and `segment_ids`
combine as in `dot_product_attention`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, OpParams, register, register_params


def _weights(query, key, value, *, mask, is_causal, scale, segment_ids):
  """Checked sizes and the float32 attention weights `[b, k, g, t, s]`."""
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  return dims, common.masked_softmax(logits, full_mask)


def _check_self_attention(name: str, dims: common.Dims) -> None:
  if dims.q_len != dims.kv_len:
    raise ValueError(f"{name} sends messages between the tokens of one sequence: q_len must "
                     f"equal kv_len, got {dims.q_len} and {dims.kv_len}")


def _check_relational(dims: common.Dims, rel_query, rel_key, rel_out, num_relations,
                      relation_dim) -> tuple[int, int]:
  """`(R, P)` of the relational arguments, checked against `dims`."""
  r, p = getattr(rel_query, "shape", (None,) * 4)[2:]
  for name, given, size in (("num_relations", num_relations, r),
                            ("relation_dim", relation_dim, p)):
    if given is not None and given != size:
      raise ValueError(f"{name} ({given}) must equal its size in rel_query.shape ({size})")
  common.check_weight("rel_query", rel_query, (dims.batch, dims.q_len, r, p),
                      "[batch, q_len, R, P]")
  common.check_weight("rel_key", rel_key, (dims.batch, dims.kv_len, r, p),
                      "[batch, kv_len, R, P]")
  common.check_weight("rel_out", rel_out, (dims.num_heads, r, dims.value_dim),
                      "[num_heads, R, value_dim]")
  return r, p


def _relational(sensory, pooled, rel_query, rel_out):
  """Σ_j α_ij v_j + Σ_ℓ ⟨φ_ℓ x_i, Σ_j α_ij ψ_ℓ x_j⟩ (W_r)_ℓ in float32, from the pooled values
  `sensory [b, t, n, dv]` and pooled relation keys `pooled [b, t, n, R, P]`."""
  relations = jnp.einsum("btrp,btnrp->btnr", rel_query.astype(jnp.float32), pooled)
  return sensory + jnp.einsum("btnr,nrd->btnd", relations, rel_out.astype(jnp.float32))


def _relational_block_form(query, key, scale, *, rel_query=None, rel_key=None, rel_out=None,
                           num_relations=None, relation_dim=None) -> BlockForm:
  """Softmax blocks over the values with the relation keys ψ_ℓ x_j appended on every key head
  (the value map), merged through the log-sum-exp; the output map splits the merged rows into
  Σ_j α_ij v_j and Σ_j α_ij ψ_ℓ x_j and adds the relational term of the query token."""
  def with_relation_keys(value):
    dims = common.check_qkv(query, key, value)
    _check_relational(dims, rel_query, rel_key, rel_out, num_relations, relation_dim)
    b, s, k = value.shape[:3]
    flat = rel_key.reshape(b, s, 1, -1).astype(value.dtype)
    return jnp.concatenate([value, jnp.broadcast_to(flat, (b, s, k, flat.shape[-1]))], axis=3)

  def relational_output(out, value):
    dv = value.shape[-1]
    pooled = out[..., dv:].astype(jnp.float32).reshape(out.shape[:3] + rel_query.shape[2:])
    return _relational(out[..., :dv].astype(jnp.float32), pooled, rel_query,
                       rel_out).astype(out.dtype)

  return BlockForm("softmax", query, key, scale, value_map=with_relation_keys,
                   output_map=relational_output)


@register("relational_attention", segment_ids=True, block_form=_relational_block_form)
def relational_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         rel_query=None, rel_key=None, rel_out=None, num_relations=None,
                         relation_dim=None, segment_ids=None):
  """Relational attention (Disentangling and Integrating Relational and Sensory Information in
  Transformer Architectures, Altabaa et al. 2024): attention that retrieves the relation
  between the query and each key along with the key's sensory value.

    out_i = Σ_j α_ij (r_ij W_r + s_j W_s),   r_ijℓ = ⟨φ_ℓ x_i, ψ_ℓ x_j⟩,  ℓ = 1..R

  per head, with α = softmax(s·QKᵀ, masked) and s_j W_s the value v_j. The relations are
  shared by the heads (as the paper's r(x_i, x_j) ∈ R^R). The relational term is computed in
  the fused form Σ_ℓ ⟨φ_ℓ x_i, Σ_j α_ij ψ_ℓ x_j⟩ (W_r)_ℓ, which never materialises the
  `[t, s, R]` relation tensor (memory t·R·P per head beside the weights). Causal: α is masked,
  so only keys j <= i contribute.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    rel_query: φ_ℓ x_i, `[batch, q_len, R, P]`.
    rel_key: ψ_ℓ x_j, `[batch, kv_len, R, P]`.
    rel_out: W_r, `[num_heads, R, value_dim]`.
    num_relations, relation_dim: optional; checked against R and P of `rel_query`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims, probs = _weights(query, key, value, mask=mask, is_causal=is_causal, scale=scale,
                         segment_ids=segment_ids)
  r, p = _check_relational(dims, rel_query, rel_key, rel_out, num_relations, relation_dim)
  sensory = common.weighted_values(probs, value, dims).astype(jnp.float32)
  pooled = jnp.einsum("bkgts,bsrp->btkgrp", probs, rel_key.astype(jnp.float32))
  pooled = pooled.reshape(dims.batch, dims.q_len, dims.num_heads, r, p)
  return _relational(sensory, pooled, rel_query, rel_out).astype(query.dtype)


@register("reversed_attention", causal=False, segment_ids=True)
def reversed_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                       message=None, segment_ids=None):
  """Reversed attention (Visual Dependency Transformers: Dependency Tree Emerges from Reversed
  Attention, Ding et al. 2023): each child token chooses its parents and sends them its value.

    A = softmax_i(s·q_j·k_i, masked)  (row j: child j's distribution over parents i)
    out = Aᵀ(m ⊙ V),   out_i = Σ_j A_ji m_j v_j

  The softmax over parents is the paper's normalisation: each child sends one unit of
  message, split as a probability distribution; a parent receives the sum (no
  renormalisation), so leaves that no child picks receive nothing. m_j is the message
  controller (how much child j sends; 1 when None). A mask entry (j, i) allows child j to send
  to parent i. No causal form (`causal=False`): out_i sums over all children j, including those
  after i, and a child's distribution is normalised over every parent.

  Args:
    query: children's queries, key: parents' keys, value: `[batch, seq, heads, head_dim]`
      with one sequence (q_len == kv_len); key/value heads divide query heads.
    mask, scale, segment_ids: as `dot_product_attention`.
    message: m, `[batch, seq, num_heads]` or None.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("reversed_attention", is_causal)
  dims, probs = _weights(query, key, value, mask=mask, is_causal=False, scale=scale,
                         segment_ids=segment_ids)
  _check_self_attention("reversed_attention", dims)
  k, g = dims.num_kv_heads, dims.groups
  sent = jnp.broadcast_to(value.astype(jnp.float32)[:, :, :, None],
                          (dims.batch, dims.kv_len, k, g, dims.value_dim))
  if message is not None:
    common.check_weight("message", message, (dims.batch, dims.q_len, dims.num_heads),
                        "[batch, seq, num_heads]")
    sent = sent * message.astype(jnp.float32).reshape(dims.batch, dims.q_len, k, g, 1)
  out = jnp.einsum("bkgji,bjkgd->bikgd", probs, sent)
  return out.reshape(dims.batch, dims.kv_len, dims.num_heads,
                     dims.value_dim).astype(query.dtype)


def _check_gin(dims: common.Dims, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2,
               hidden_dim) -> None:
  n, dv = dims.num_heads, dims.value_dim
  hidden = getattr(mlp_w1, "shape", (None,))[-1]
  if hidden_dim is not None and hidden_dim != hidden:
    raise ValueError(f"hidden_dim ({hidden_dim}) must equal mlp_w1.shape[-1] ({hidden})")
  for name, x, shape, layout in (
      ("gin_eps", gin_eps, (n,), "[num_heads]"),
      ("mlp_w1", mlp_w1, (n, dv, hidden), "[num_heads, value_dim, hidden]"),
      ("mlp_b1", mlp_b1, (n, hidden), "[num_heads, hidden]"),
      ("mlp_w2", mlp_w2, (n, hidden, dv), "[num_heads, hidden, value_dim]"),
      ("mlp_b2", mlp_b2, (n, dv), "[num_heads, value_dim]")):
    common.check_weight(name, x, shape, layout)


def _gin_update(aggregated, value, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2):
  """MLP((1 + ε) v_i + aggregated_i) per head in float32; `aggregated [b, t, n, dv]`, the
  token's own `value [b, t, kv_heads, dv]`."""
  f32 = lambda x: x.astype(jnp.float32)
  own = jnp.repeat(f32(value), aggregated.shape[2] // value.shape[2], axis=2)
  nodes = (1.0 + f32(gin_eps))[:, None] * own + f32(aggregated)
  hidden_act = jax.nn.relu(jnp.einsum("btnd,ndh->btnh", nodes, f32(mlp_w1)) + f32(mlp_b1))
  return jnp.einsum("btnh,nhd->btnd", hidden_act, f32(mlp_w2)) + f32(mlp_b2)


def _gin_block_form(query, key, scale, *, gin_eps=None, mlp_w1=None, mlp_b1=None, mlp_w2=None,
                    mlp_b2=None, hidden_dim=None) -> BlockForm:
  """Softmax blocks merged through the log-sum-exp into Σ_j A_ij v_j; the output map is the
  GIN update of each token with its own value. With the sequence split, causal or within
  segments, every query sees at least itself, so no row is empty."""
  def checked(value):
    dims = common.check_qkv(query, key, value)
    _check_self_attention("gin_attention", dims)
    _check_gin(dims, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2, hidden_dim)
    return value

  def update(out, value):
    return _gin_update(out, value, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2).astype(out.dtype)

  return BlockForm("softmax", query, key, scale, value_map=checked, output_map=update)


@register("gin_attention", segment_ids=True, block_form=_gin_block_form)
def gin_attention(query, key, value, *, mask=None, is_causal=False, scale=None, gin_eps=None,
                  mlp_w1=None, mlp_b1=None, mlp_w2=None, mlp_b2=None, hidden_dim=None,
                  segment_ids=None):
  """GIN-Attention (Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers,
  Buehler 2025): the attention matrix as the adjacency of a Graph Isomorphism Network layer.

    out_i = MLP((1 + ε) v_i + Σ_j A_ij v_j),   A = softmax(s·QKᵀ, masked),
    MLP(h) = W2ᵀ ReLU(W1ᵀ h + b1) + b2

  per head, with the node features X = V (the GIN update replaces the plain aggregation A V)
  and ε learned per head. Causal: A is masked, v_i is the token's own value. Query rows with
  no key to attend to return zeros (as every op), not MLP((1 + ε) v_i).

  Args:
    query, key, value: `[batch, seq, heads, head_dim]` with one sequence (q_len == kv_len);
      key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    gin_eps: ε `[num_heads]`.
    mlp_w1, mlp_b1: `[num_heads, value_dim, hidden]`, `[num_heads, hidden]`.
    mlp_w2, mlp_b2: `[num_heads, hidden, value_dim]`, `[num_heads, value_dim]`.
    hidden_dim: optional; checked against `mlp_w1.shape[-1]`.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims, probs = _weights(query, key, value, mask=mask, is_causal=is_causal, scale=scale,
                         segment_ids=segment_ids)
  _check_self_attention("gin_attention", dims)
  _check_gin(dims, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2, hidden_dim)
  aggregated = common.weighted_values(probs, value, dims).astype(jnp.float32)
  out = _gin_update(aggregated, value, gin_eps, mlp_w1, mlp_b1, mlp_w2, mlp_b2)
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids)
  return common.apply_row_mask(out, full_mask, dims).astype(query.dtype)


def _lecun(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=0)


@register_params("relational_attention")
class RelationalAttentionParams(OpParams):
  """The relation maps of relational attention: φ_ℓ x = Φ_ℓ·(q of all heads) and ψ_ℓ x =
  Ψ_ℓ·(k of all K/V heads), linear maps of the token through the layer's query and key
  projections, `Φ [num_heads, head_dim, R, P]`, `Ψ [num_kv_heads, head_dim, R, P]`, and
  `rel_out` W_r `[num_heads, R, value_dim]`, LeCun-normal. R = `op_args["num_relations"]`
  (num_heads when absent), P = `op_args["relation_dim"]` (head_dim when absent). Returns
  `{"rel_query", "rel_key", "rel_out"}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q
    op_args = self.op_args or {}
    r = checks.positive_int("op_args['num_relations']",
                            op_args.get("num_relations", self.num_heads))
    p = checks.positive_int("op_args['relation_dim']", op_args.get("relation_dim",
                                                                   self.head_dim))
    axes = nn.with_logical_partitioning(_lecun((0, 1), (2, 3)), ("heads", "head_dim", None, None))
    phi = self.param("phi", axes, (self.num_heads, self.head_dim, r, p), self.param_dtype)
    psi = self.param("psi", axes, (self.num_kv_heads, self.head_dim, r, p), self.param_dtype)
    rel_out = self.param("rel_out", nn.with_logical_partitioning(
        _lecun(1, 2), ("heads", None, "head_dim")), (self.num_heads, r, value.shape[-1]),
                         self.param_dtype)
    query, key, phi, psi, rel_out = nn.dtypes.promote_dtype(query, key, phi, psi, rel_out,
                                                            dtype=self.dtype)
    return {"rel_query": jnp.einsum("btnd,ndrp->btrp", query, phi),
            "rel_key": jnp.einsum("bskd,kdrp->bsrp", key, psi), "rel_out": rel_out}


@register_params("reversed_attention")
class ReversedAttentionParams(OpParams):
  """DependencyViT's message controller m = sigmoid(x W_m + b_m) per token and head, from the
  layer's input `inputs_q` (self-attention), `W_m [features, num_heads]` LeCun-normal, `b_m`
  zeros. Returns `{"message"}` `[batch, seq, num_heads]`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    logits = nn.Dense(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "heads")),
                      name="message")(inputs_q)
    return {"message": jax.nn.sigmoid(logits)}


@register_params("gin_attention")
class GINAttentionParams(OpParams):
  """The GIN update of GIN-Attention per head: `gin_eps [num_heads]` = 0 (GIN's ε init), the
  MLP `mlp_w1 [num_heads, value_dim, hidden]`, `mlp_w2 [num_heads, hidden, value_dim]`
  LeCun-normal and biases zeros, hidden = `op_args["hidden_dim"]` (head_dim when absent).
  Returns the five arrays."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key
    hidden = checks.positive_int("op_args['hidden_dim']",
                                 (self.op_args or {}).get("hidden_dim", self.head_dim))
    n, d = self.num_heads, value.shape[-1]
    zeros = nn.initializers.zeros_init()
    weights = {
        "gin_eps": self.param("gin_eps", nn.with_logical_partitioning(zeros, ("heads",)), (n,),
                              self.param_dtype),
        "mlp_w1": self.param("mlp_w1", nn.with_logical_partitioning(
            _lecun(1, 2), ("heads", "head_dim", "mlp")), (n, d, hidden), self.param_dtype),
        "mlp_b1": self.param("mlp_b1", nn.with_logical_partitioning(zeros, ("heads", "mlp")),
                             (n, hidden), self.param_dtype),
        "mlp_w2": self.param("mlp_w2", nn.with_logical_partitioning(
            _lecun(1, 2), ("heads", "mlp", "head_dim")), (n, hidden, d), self.param_dtype),
        "mlp_b2": self.param("mlp_b2", nn.with_logical_partitioning(
            zeros, ("heads", "head_dim")), (n, d), self.param_dtype)}
    return dict(zip(weights, nn.dtypes.promote_dtype(*weights.values(), dtype=self.dtype)))
