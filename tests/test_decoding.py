"""Decoding with a cache, for every causal op the LM takes: a prefill of several tokens then one
token at a time equals the full forward at every position, in each op's decoding form
(`big_attn.ops.decoding_form`: key/value cache, recurrent state or cached layer inputs)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.layers import Attention
from big_attn.models import lm
from big_attn.ops import spatial

LENGTH, PREFILL = 7, 3
TINY = dict(vocab_size=32, width=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=32)


def _lm_ops():
  usable = []
  for name in ops.names():
    try:
      spatial.check_op(name, "LM", causal=True, grid=False)
    except spatial.OpRefused:
      continue
    usable.append(name)
  return usable


LM_OPS = _lm_ops()


def test_every_causal_op_has_a_decoding_form_and_the_others_are_refused():
  forms = {name: ops.decoding_form(name) for name in ops.names()}
  assert forms["softmax"] == forms["ngpt"] == "kv_cache"
  assert forms["performer"] == forms["retention"] == "state"
  assert forms["sigmoid"] == forms["hyena"] == "inputs"
  for name, form in forms.items():
    assert (form is None) == (not ops.spec(name).causal), name
  with pytest.raises(ValueError, match="'channel_attention' has no decoding form.*later tokens"):
    ops.check_form("channel_attention", "decoding")
  with pytest.raises(ValueError, match="'agent' has no sequence-parallel form"):
    ops.check_form("agent", "sequence-parallel")
  with pytest.raises(ValueError, match="mode must be"):
    ops.check_form("softmax", "parallel")
  with pytest.raises(ValueError, match="'agent' has no decoding form"):
    jax.eval_shape(Attention(num_heads=2, op="agent", decode=True, cache_len=4).init,
                   jax.random.key(0), jnp.ones((1, 4, 8)))


@pytest.mark.parametrize("op", LM_OPS)
def test_cached_decoding_equals_full_forward_at_every_position(op):
  model = lm.Model(**TINY, attention=op, rope_base=100.)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, LENGTH)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
  decoder = model.clone(decode=True, cache_len=LENGTH)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)

  # Eager: the tiny LM's primitives compile once per worker and serve every op's test, where a
  # jitted decoder compiles the whole model per op (about 3x the time).
  logits, cache = decoder.apply({"params": params}, tokens[:, :PREFILL],
                                positions=positions[:, :PREFILL], mutable=["cache"])
  steps = [logits]
  for t in range(PREFILL, LENGTH):
    out, cache = decoder.apply({"params": params, **cache}, tokens[:, t:t + 1],
                               positions=positions[:, t:t + 1], mutable=["cache"])
    steps.append(out)
  decoded, full = jnp.concatenate(steps, axis=1), model.apply({"params": params}, tokens)
  np.testing.assert_allclose(decoded, full, rtol=2e-4, atol=2e-5)


def test_generate_decodes_ops_from_cached_inputs():
  """`generate` through the `InputCache` path: greedy tokens and their logits are the full
  forward's."""
  model = lm.Model(**TINY, attention="sigmoid")
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 2)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"])
  tokens, logits = lm.generate(model, params, prompt, 4, temperature=0.0, return_logits=True)
  full = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, full[:, 1:-1], rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(tokens[:, 2:], jnp.argmax(full[:, 1:-1], axis=-1))


def test_decoding_from_cached_inputs_refuses_what_it_cannot_take():
  layer = Attention(num_heads=2, op="sigmoid", decode=True, cache_len=4)
  x = jnp.ones((1, 2, 8))
  for kwargs in (dict(is_causal=False), dict(is_causal=True, context=x),
                 dict(is_causal=True, segment_ids=jnp.zeros((1, 2), jnp.int32))):
    with pytest.raises(ValueError, match="'sigmoid' attends causally within one sequence"):
      jax.eval_shape(functools.partial(layer.init, **kwargs), jax.random.key(0), x)
