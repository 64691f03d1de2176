"""`relational_attention` (Disentangling and Integrating Relational and Sensory Information in
Transformer Architectures), `reversed_attention` (Visual Dependency Transformers) and
`gin_attention` (Graph-Aware Isomorphic Attention) against float64 references.

The references materialise what the ops avoid or fuse: the relation tensor r_ijℓ, the
transposed attention matrix Aᵀ, and the GIN update on the explicit adjacency A; they never
call `big_attn`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _attention(q, k, full):
  return ref.masked_softmax(ref.attention_logits(q, k), full)  # [b, n, t, s]


@pytest.mark.parametrize("t,s,is_causal,masked", [(9, 9, True, False), (7, 10, False, True)])
def test_relational_matches_materialised_relations(t, s, is_causal, masked):
  q, k, v = ref.qkv(t=t, s=s, dv=6)
  rel_q, rel_k = ref.normal(3, (2, t, 3, 5)), ref.normal(4, (2, s, 3, 5))
  rel_out = ref.normal(5, (4, 3, 6), std=0.5)
  mask = ref.key_padding(2, s, first_valid=True, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=is_causal)

  def ref_fn(q, k, v, rq, rk, w_r):
    relations = jnp.einsum("btlp,bslp->btsl", rq, rk)             # r_ijℓ
    messages = (jnp.einsum("btsl,nld->bntsd", relations, w_r)
                + jnp.swapaxes(ref.repeat_kv(v, 4), 1, 2)[:, :, None])  # r_ij W_r + s_j W_s
    return jnp.einsum("bnts,bntsd->btnd", _attention(q, k, full), messages)

  def op_fn(q, k, v, rq, rk, w_r):
    return ops.get("relational_attention")(q, k, v, rel_query=rq, rel_key=rk, rel_out=w_r,
                                           is_causal=is_causal,
                                           mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, rel_q, rel_k, rel_out))
  if masked:
    assert np.all(out[1] == 0.0)


@pytest.mark.parametrize("with_message,masked", [(True, True), (False, False)])
def test_reversed_matches_transposed_attention(with_message, masked):
  q, k, v = ref.qkv(t=11)
  message = jax.nn.sigmoid(ref.normal(6, (2, 11, 4)))
  mask = ref.key_padding(2, 11, first_valid=True) if masked else None
  full = ref.full_mask(2, 4, 11, 11, mask=mask)

  def ref_fn(q, k, v, m):
    a = _attention(q, k, full)                                     # a[b, n, child, parent]
    sent = jnp.swapaxes(ref.repeat_kv(v, 4) * (m[..., None] if with_message else 1.0), 1, 2)
    return jnp.swapaxes(jnp.swapaxes(a, -1, -2) @ sent, 1, 2)      # Aᵀ (m ⊙ V)

  def op_fn(q, k, v, m):
    return ops.get("reversed_attention")(q, k, v, message=m if with_message else None,
                                         mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, message))
  if masked:  # A parent no child may send to receives nothing.
    dropped = ~np.asarray(mask)[:, 0, 0]
    assert np.all(out[dropped] == 0.0)


@pytest.mark.parametrize("is_causal,masked", [(True, False), (False, True)])
def test_gin_matches_adjacency_update(is_causal, masked):
  q, k, v = ref.qkv(t=10, k=4)
  eps = ref.normal(7, (4,), std=0.5)
  w1, b1 = ref.normal(8, (4, 8, 5), std=0.4), ref.normal(9, (4, 5), std=0.3)
  w2, b2 = ref.normal(10, (4, 5, 8), std=0.4), ref.normal(11, (4, 8), std=0.3)
  mask = ref.key_padding(2, 10, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, 10, 10, mask=mask, is_causal=is_causal)

  def ref_fn(q, k, v, eps, w1, b1, w2, b2):
    x = jnp.swapaxes(v, 1, 2)                                      # node features [b, n, t, d]
    h = (1 + eps)[None, :, None, None] * x + _attention(q, k, full) @ x
    hidden = jnp.maximum(jnp.einsum("bntd,ndh->bnth", h, w1) + b1[None, :, None], 0.0)
    out = jnp.einsum("bnth,nhd->bntd", hidden, w2) + b2[None, :, None]
    return jnp.swapaxes(jnp.where(full.any(-1)[..., None], out, 0.0), 1, 2)

  def op_fn(q, k, v, eps, w1, b1, w2, b2):
    return ops.get("gin_attention")(q, k, v, gin_eps=eps, mlp_w1=w1, mlp_b1=b1, mlp_w2=w2,
                                    mlp_b2=b2, is_causal=is_causal,
                                    mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, eps, w1, b1, w2, b2))
  if masked:
    assert np.all(out[1] == 0.0)


def test_reversed_has_no_causal_form():
  op_checks.assert_no_causal_form("reversed_attention", *ref.qkv(t=4))


@pytest.mark.parametrize("name,op_args,param_shapes,is_causal", [
    ("relational_attention", dict(num_relations=3, relation_dim=2),
     dict(phi=(4, 4, 3, 2), psi=(2, 4, 3, 2), rel_out=(4, 3, 4)), True),
    ("gin_attention", dict(hidden_dim=6), dict(gin_eps=(4,), mlp_w1=(4, 4, 6), mlp_b1=(4, 6),
                                               mlp_w2=(4, 6, 4), mlp_b2=(4, 4)), True)])
def test_layer_runs(name, op_args, param_shapes, is_causal):
  op_checks.assert_layer_runs(name, op_args, param_shapes, is_causal=is_causal)


def _bad_calls():
  q, k, v = ref.qkv(t=6)
  short_k, short_v = ref.qkv(t=6, s=5)[1:]
  rel = dict(rel_query=jnp.ones((2, 6, 3, 2)), rel_key=jnp.ones((2, 6, 3, 2)),
             rel_out=jnp.ones((4, 3, 8)))
  gin = dict(gin_eps=jnp.zeros((4,)), mlp_w1=jnp.ones((4, 8, 5)), mlp_b1=jnp.ones((4, 5)),
             mlp_w2=jnp.ones((4, 5, 8)), mlp_b2=jnp.ones((4, 8)))
  relational, reverse, gin_op = (ops.get(n) for n in ("relational_attention",
                                                       "reversed_attention", "gin_attention"))
  return [(lambda: relational(q, k, v, **dict(rel, rel_key=jnp.ones((2, 6, 3, 3)))), "rel_key"),
          (lambda: relational(q, k, v, **dict(rel, rel_out=jnp.ones((4, 2, 8)))), "rel_out"),
          (lambda: relational(q, k, v, **rel, num_relations=4), "num_relations"),
          (lambda: reverse(q, short_k, short_v), "q_len"),
          (lambda: reverse(q, k, v, message=jnp.ones((2, 6, 2))), "message"),
          (lambda: gin_op(q, short_k, short_v, **gin), "q_len"),
          (lambda: gin_op(q, k, v, **dict(gin, mlp_b2=jnp.ones((4, 5)))), "mlp_b2"),
          (lambda: gin_op(q, k, v, **gin, hidden_dim=4), "hidden_dim")]


@pytest.mark.parametrize("case", range(8))
def test_bad_arguments(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
