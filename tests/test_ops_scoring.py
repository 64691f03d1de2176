"""Clipped-softmax (Quantizable Transformers), gated (Gated Attention for Large Language
Models), Cog (More Expressive Attention with Negative Weights) and normalized (Normalized
Attention Without Probability Cage) attention against float64 references
(`tests/score_checks.py`, written from the papers' formulas).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests.reference import full_mask
from tests.score_checks import (B, CASES, N, S, T, assert_bfloat16_matches_reference,
                                assert_causal_past_ignores_future,
                                assert_fully_masked_rows_give_zeros_and_finite_grads,
                                assert_matches_reference, check_against_reference, inputs,
                                mask_scenario, random_gate)

OPS = ("clipped_softmax", "gated_attention", "cog", "normalized")


@pytest.mark.parametrize("kv_heads,scenario", CASES)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference(name, kv_heads, scenario):
  assert_matches_reference(name, kv_heads, scenario)


@pytest.mark.parametrize("zeta,gamma", [(1.1, -0.03), (1.0, None)])
def test_clipped_softmax_stretch(zeta, gamma):
  q, k, v = inputs(4, kv_heads=1)
  bias = np.random.RandomState(6).randn(B, 1, T, S).astype(np.float32)
  mask_kwargs, m = mask_scenario("mask", T, S)
  op_kwargs = {"zeta": zeta, "gamma": gamma, "bias": jnp.asarray(bias), **mask_kwargs}
  ref_kwargs = {"zeta": zeta, "gamma": gamma}
  check_against_reference("clipped_softmax", q, k, v, op_kwargs, ref_kwargs, m,
                          arrays=("bias",))


def test_clipped_softmax_alpha_rule_and_softmax_limit():
  q, k, v = (jnp.asarray(x) for x in inputs(5))
  op = ops.get("clipped_softmax")
  np.testing.assert_allclose(op(q, k, v, alpha=2.0), op(q, k, v, gamma=-2.0 / S), atol=1e-6)
  # zeta = 1, gamma = 0 is plain softmax attention.
  np.testing.assert_allclose(op(q, k, v, gamma=0.0), ops.dot_product_attention(q, k, v),
                             atol=1e-5)


def test_gated_attention_bias_and_layout():
  q, k, v = inputs(6, kv_heads=2)
  bias = np.random.RandomState(7).randn(B, N, T, S).astype(np.float32)
  g = random_gate(1)
  op_kwargs = {"gate_logits": jnp.asarray(g), "bias": jnp.asarray(bias), "scale": 0.3}
  ref_kwargs = {"gate_logits": g, "scale": 0.3}
  check_against_reference("gated_attention", q, k, v, op_kwargs, ref_kwargs,
                          full_mask(B, N, T, S), arrays=("gate_logits", "bias"))


@pytest.mark.parametrize("normalization", ["standardize", "scale"])
def test_normalized_options(normalization):
  q, k, v = inputs(8, t=S, kv_heads=1)
  mask_kwargs, m = mask_scenario("causal", S, S)
  op_kwargs = {"normalization": normalization, "epsilon": 1e-2, "gain": jnp.float32(1.5),
               "shift": jnp.float32(0.25), **mask_kwargs}
  ref_kwargs = {"normalization": normalization, "epsilon": 1e-2}
  check_against_reference("normalized", q, k, v, op_kwargs, ref_kwargs, m,
                          arrays=("gain", "shift"))


def test_cog_has_negative_weights():
  # With V = identity over keys the output rows are the weights themselves.
  q, k, _ = inputs(9, kv_heads=1)
  v = np.broadcast_to(np.eye(S, dtype=np.float32)[None, :, None, :], (B, S, 1, S))
  w = np.asarray(ops.get("cog")(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  assert (w < 0).any() and (w > 0).any()
  np.testing.assert_allclose(np.abs(w).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", OPS)
def test_causal_past_ignores_future(name):
  assert_causal_past_ignores_future(name)


@pytest.mark.parametrize("name", OPS)
def test_fully_masked_rows_give_zeros_and_finite_grads(name):
  assert_fully_masked_rows_give_zeros_and_finite_grads(name)


@pytest.mark.parametrize("name", OPS)
def test_bfloat16(name):
  assert_bfloat16_matches_reference(name)


# ----------------------------------------------------------------------------- layer

def test_layer_gated_attention_params_and_gate():
  x = jnp.asarray(np.random.RandomState(13).randn(B, T, 16).astype(np.float32))
  attn = layers.Attention(num_heads=4, op="gated_attention")
  variables = attn.init(jax.random.key(0), x)
  gate = variables["params"]["op_params"]
  assert gate["gate_kernel"].value.shape == (4, 4)
  np.testing.assert_allclose(jax.nn.sigmoid(gate["gate_bias"].value), 0.25, rtol=1e-6)
  out = attn.apply(variables, x, is_causal=True)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  # A closed gate zeroes the layer; a fully open one gives the softmax layer's output.
  def with_gate(bias_value):
    params = dict(variables["params"])
    params["op_params"] = {
        "gate_kernel": gate["gate_kernel"].replace_boxed(jnp.zeros((4, 4))),
        "gate_bias": gate["gate_bias"].replace_boxed(jnp.full((4,), bias_value))}
    return {"params": params}

  np.testing.assert_allclose(np.asarray(attn.apply(with_gate(-1e4), x)), 0.0, atol=1e-6)
  softmax_params = {n: p for n, p in variables["params"].items() if n != "op_params"}
  np.testing.assert_allclose(
      np.asarray(attn.apply(with_gate(1e4), x)),
      np.asarray(layers.Attention(num_heads=4).apply({"params": softmax_params}, x)),
      rtol=1e-5, atol=1e-6)


def test_layer_normalized_cog_and_clipped_softmax():
  x = jnp.asarray(np.random.RandomState(14).randn(B, T, 16).astype(np.float32))
  for op, n_op_params in (("normalized", 2), ("cog", 0), ("clipped_softmax", 0)):
    attn = layers.Attention(num_heads=4, num_kv_heads=2, op=op)
    variables = attn.init(jax.random.key(1), x)
    assert len(variables["params"].get("op_params", {})) == n_op_params, op
    out = attn.apply(variables, x, is_causal=True)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out))), op


def test_gated_params_need_divisible_features():
  x = jnp.ones((B, T, 10))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    layers.Attention(num_heads=4, head_dim=4, op="gated_attention").init(jax.random.key(0), x)
  assert ops.params_module("gated_attention") is ops.scoring.GatedAttentionParams


def test_bad_inputs_raise():
  q, k, v = (jnp.asarray(x) for x in inputs(15))
  with pytest.raises(ValueError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v, gate_logits=jnp.zeros((B, T, N - 1)))
  with pytest.raises(ValueError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v)
  with pytest.raises(TypeError, match="gate_logits"):
    ops.get("gated_attention")(q, k, v, gate_logits=jnp.zeros((B, T, N), jnp.int32))
  with pytest.raises(ValueError, match="gamma"):
    ops.get("clipped_softmax")(q, k, v, gamma=0.1)
  with pytest.raises(ValueError, match="zeta"):
    ops.get("clipped_softmax")(q, k, v, zeta=0.5)
  with pytest.raises(ValueError, match="not both"):
    ops.get("clipped_softmax")(q, k, v, gamma=-0.1, alpha=2.0)
  with pytest.raises(ValueError, match="normalization"):
    ops.get("normalized")(q, k, v, normalization="softmax")
  with pytest.raises(ValueError, match="gain"):
    ops.get("normalized")(q, k, v, gain=jnp.ones((3,)))
  with pytest.raises(ValueError, match="query heads"):
    ops.get("cog")(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(TypeError, match="mask"):
    ops.get("normalized")(q, k, v, mask=jnp.ones((B, N, T, S), jnp.float32))
