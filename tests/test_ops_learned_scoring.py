"""`neural_attention` (Neural Attention: a learned MLP on [q_i; k_j]) and `gatv2` (How
Attentive are Graph Attention Networks?) against float64 references.

The references apply the Neural Attention MLP to explicitly concatenated [q_i; k_j] and GATv2's
aᵀ LeakyReLU(q_i + k_j) pair by pair; they never call `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

F32_TOL = ref.F32_TOL
_qkv = functools.partial(ref.qkv, t=21)


def _scored_attention(q, k, v, score_fn, full, scale=1.0):
  """softmax_j(scale·score_fn(q_i, k_j, head), masked) V; `score_fn` on one pair."""
  q, k, v = ref.f64(q, k, v)
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  pair = jax.vmap(jax.vmap(score_fn, (0, None, None)), (None, 0, None))  # -> [s, t]
  heads = jax.vmap(lambda qh, kh, h: pair(qh, kh, h).T, (1, 1, 0))      # -> [n, t, s]
  s = jax.vmap(lambda qb, kb: heads(qb, kb, jnp.arange(n)))(q, k) * scale
  s = jnp.where(full, s, -1e300)
  e = jnp.where(full, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
  return jnp.einsum("bnts,bsnd->btnd", p, v)


def _mlp_weights(n, d, hidden, dtype=jnp.float32):
  return (ref.normal(11, (n, 2 * d, hidden), dtype, 0.3), ref.normal(12, (n, hidden), dtype, 0.3),
          ref.normal(13, (n, hidden), dtype, 0.5))


@pytest.mark.parametrize("activation,is_causal,padding", [("relu", False, True),
                                                          ("gelu", True, False),
                                                          ("tanh", False, False)])
def test_neural_attention_matches_mlp_on_concatenation(activation, is_causal, padding):
  q, k, v = _qkv(t=11, s=11 if is_causal else 9)
  s = k.shape[1]
  mask = ref.key_padding(2, s, invalid=0) if padding else None
  full = ref.full_mask(2, 4, 11, s, mask=mask, is_causal=is_causal)
  act = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=True),
         "tanh": jnp.tanh}[activation]

  def ref_fn(q, k, v, w1, b1, w2):
    score = lambda qi, kj, h: act(jnp.concatenate([qi, kj]) @ w1[h] + b1[h]) @ w2[h]
    return _scored_attention(q, k, v, score, full, scale=0.5)

  def op_fn(q, k, v, w1, b1, w2):
    return ops.get("neural_attention")(
        q, k, v, w1=w1, b1=b1, w2=w2, activation=activation, scale=0.5, is_causal=is_causal,
        mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, *_mlp_weights(4, 8, 6)))
  if padding:
    assert np.all(out[0] == 0.0)


@pytest.mark.parametrize("nonlinearity,is_causal", [("leaky_relu", False), ("leaky_relu", True),
                                                    ("tanh", True)])
def test_gatv2_and_additive_scores(nonlinearity, is_causal):
  q, k, v = _qkv(t=13, s=13 if is_causal else 10, n=6, k=3)
  full = ref.full_mask(2, 6, 13, k.shape[1], is_causal=is_causal)
  attn_vec = ref.normal(21, (6, 8))
  phi = (jnp.tanh if nonlinearity == "tanh"
         else lambda x: jnp.where(x > 0, x, 0.2 * x))

  def ref_fn(q, k, v, a):
    return _scored_attention(q, k, v, lambda qi, kj, h: a[h] @ phi(qi + kj), full)

  op_fn = lambda q, k, v, a: ops.get("gatv2")(q, k, v, attn_vec=a, nonlinearity=nonlinearity,
                                              is_causal=is_causal)
  ref.assert_matches(op_fn, ref_fn, (q, k, v, attn_vec))


def _op_args(name, n=4, d=8):
  if name == "neural_attention":
    w1, b1, w2 = _mlp_weights(n, d, 5)
    return dict(w1=w1, b1=b1, w2=w2)
  return dict(attn_vec=ref.normal(21, (n, d)))


@pytest.mark.parametrize("name", ["neural_attention", "gatv2"])
def test_causal_ignores_future_keys(name):
  q, k, v = _qkv(t=17)
  op = jax.jit(functools.partial(ops.get(name), is_causal=True, **_op_args(name)))
  op_checks.assert_causal_ignores_future_keys(op, q, k, v, cut=9)


@pytest.mark.parametrize("name", ["neural_attention", "gatv2"])
def test_bfloat16_close_to_float32(name):
  op = functools.partial(ops.get(name), **_op_args(name))
  op_checks.assert_bfloat16_close_to_float32(op, *_qkv())


@pytest.mark.parametrize("name,op_args,param_shapes", [
    ("neural_attention", dict(hidden_dim=6), dict(w1=(4, 8, 6), b1=(4, 6), w2=(4, 6))),
    ("gatv2", dict(nonlinearity="tanh"), dict(attn_vec=(4, 4)))])
def test_layer_runs(name, op_args, param_shapes):
  op_checks.assert_layer_runs(name, op_args, param_shapes)


@pytest.mark.parametrize("name,kwargs,match", [
    ("neural_attention", dict(w1=None), "w1"),
    ("neural_attention", dict(b1=jnp.zeros((4, 7))), "b1"),
    ("neural_attention", dict(w2=jnp.zeros((3, 5))), "w2"),
    ("neural_attention", dict(hidden_dim=7), "hidden_dim"),
    ("neural_attention", dict(activation="swish"), "activation"),
    ("gatv2", dict(attn_vec=jnp.zeros((4, 3))), "attn_vec"),
    ("gatv2", dict(nonlinearity="relu"), "nonlinearity"),
    ("gatv2", dict(negative_slope=-1.0), "negative_slope")])
def test_bad_arguments(name, kwargs, match):
  q, k, v = _qkv(t=8)
  args = {**_op_args(name), **kwargs}
  with pytest.raises(ValueError, match=match):
    ops.get(name)(q, k, v, **args)
