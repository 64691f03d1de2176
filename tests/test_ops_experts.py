"""`switchhead` (SwitchHead: Accelerating Transformers with Mixture-of-Experts Attention)
against an explicit loop over heads, tokens and experts in float64, which never calls
`big_attn`.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
_qkv = functools.partial(ref.qkv, t=15)


def _switchhead_ref(q, k, value_experts, rv, ro, out_experts, pick_v, pick_o, mask):
  """Per head h and token, the experts `pick_v`/`pick_o` (the top-k by router logit, picked
  in NumPy by the caller), then v = Σ σ·V_e, o = softmax attention, y = Σ σ·o W^O_e."""
  q, k, value_experts, rv, ro, out_experts = ref.f64(q, k, value_experts, rv, ro, out_experts)
  n = q.shape[2]
  kv_heads, num = value_experts.shape[2:4]
  values = []
  for h in range(kv_heads):
    v_h = 0.0
    for e in range(num):
      chosen = (pick_v[:, :, h] == e).any(-1)[..., None]  # [b, s, 1]
      v_h = v_h + jnp.where(chosen, jax.nn.sigmoid(rv[:, :, h, e])[..., None]
                            * value_experts[:, :, h, e], 0.0)
    values.append(v_h)
  v = jnp.stack(values, 2)
  heads = jnp.einsum("bnts,bsnd->btnd", ref.masked_softmax(ref.attention_logits(q, k), mask),
                     ref.repeat_kv(v, n))
  outs = []
  for h in range(n):
    y_h = 0.0
    for e in range(num):
      chosen = (pick_o[:, :, h] == e).any(-1)[..., None]
      y_h = y_h + jnp.where(chosen, jax.nn.sigmoid(ro[:, :, h, e])[..., None]
                            * (heads[:, :, h] @ out_experts[h, e]), 0.0)
    outs.append(y_h)
  return jnp.stack(outs, 2)


def _switchhead_inputs(t=9, s=None, n=4, k=2, num=3, dv=6, dout=5, seed=0):
  s = t if s is None else s
  q, key, _ = _qkv(t=t, s=s, n=n, k=k, seed=seed)
  return (q, key, ref.normal(seed + 3, (2, s, k, num, dv)), ref.normal(seed + 4, (2, s, k, num)),
          ref.normal(seed + 5, (2, t, n, num)), ref.normal(seed + 6, (n, num, dv, dout), std=0.4))


@pytest.mark.parametrize("t,s,kv_heads,topk,causal", [(9, 9, 2, 2, True), (7, 11, 1, 3, False)])
def test_switchhead_matches_expert_loop(t, s, kv_heads, topk, causal):
  arrays = _switchhead_inputs(t=t, s=s, k=kv_heads)
  mask = ref.key_padding(2, s, first_valid=True)
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=causal)
  dense_v = jnp.zeros((2, s, kv_heads, 1))

  def op(q, key, ve, rv, ro, oe):
    return ops.get("switchhead")(q, key, dense_v, mask=mask, is_causal=causal, value_experts=ve,
                                 router_logits_v=rv, router_logits_o=ro, out_experts=oe,
                                 topk=topk)

  pick_v, pick_o = (np.argsort(-np.asarray(r), -1)[..., :topk] for r in arrays[3:5])
  ref.assert_matches(op, lambda *a: _switchhead_ref(*a, pick_v, pick_o, full), arrays)


def test_switchhead_causal_ignores_future_and_bf16():
  q, key, ve, rv, ro, oe = _switchhead_inputs()
  op = jax.jit(functools.partial(ops.get("switchhead"), is_causal=True, out_experts=oe,
                                 num_experts=3))
  dense_v = jnp.zeros((2, 9, 2, 1))
  out = op(q, key, dense_v, value_experts=ve, router_logits_v=rv, router_logits_o=ro)
  changed = op(q, key.at[:, 5:].set(2.0), dense_v, value_experts=ve.at[:, 5:].set(-1.0),
               router_logits_v=rv.at[:, 5:].set(3.0), router_logits_o=ro)
  np.testing.assert_allclose(out[:, :5], changed[:, :5], **F32_TOL)
  assert not np.allclose(out[:, 5:], changed[:, 5:], atol=1e-3)
  bf = lambda x: x.astype(jnp.bfloat16)
  low = op(bf(q), bf(key), bf(dense_v), value_experts=bf(ve), router_logits_v=rv,
           router_logits_o=ro)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), out, rtol=5e-2, atol=1e-1)


@pytest.mark.parametrize("change,match", [
    (dict(value_experts=None), "value_experts"),
    (dict(value_experts=jnp.zeros((2, 9, 1, 3, 6))), "value_experts"),
    (dict(router_logits_v=jnp.zeros((2, 9, 2, 4))), "router_logits_v"),
    (dict(router_logits_o=jnp.zeros((2, 9, 2, 3))), "router_logits_o"),
    (dict(out_experts=jnp.zeros((4, 3, 5, 5))), "out_experts"),
    (dict(topk=4), "topk"),
    (dict(topk=0), "topk"),
    (dict(num_experts=2), "num_experts"),
])
def test_switchhead_bad_args(change, match):
  q, key, ve, rv, ro, oe = _switchhead_inputs()
  args = dict(value_experts=ve, router_logits_v=rv, router_logits_o=ro, out_experts=oe)
  with pytest.raises(ValueError, match=match):
    ops.get("switchhead")(q, key, jnp.zeros((2, 9, 2, 1)), **{**args, **change})


def test_switchhead_layer():
  x = ref.normal(0, (2, 9, 32))
  layer = layers.Attention(num_heads=4, num_kv_heads=2, op="switchhead",
                           op_args=dict(num_experts=3, topk=2))
  params = jax.jit(layer.init)(jax.random.key(0), x)
  apply = lambda p: layer.apply(p, x, is_causal=True)
  out, grads = jax.jit(lambda p: (apply(p), jax.grad(lambda p: jnp.sum(apply(p) ** 2))(p)))(
      params)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  assert set(params["params"]["op_params"]) == {"value_expert_kernel", "router_v", "router_o",
                                                "out_experts"}
  assert np.any(np.asarray(flax.linen.unbox(grads)["params"]["op_params"]["router_o"]) != 0)
