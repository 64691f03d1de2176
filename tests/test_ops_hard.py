"""`hard_attention` (Show, Attend and Tell; Latent Alignment and Variational Attention) against
float64 references: the deterministic forms, the sampled alignment and the REINFORCE gradient,
whose Monte Carlo mean is compared with the exact gradient of the expected output."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import op_checks
from tests import reference as ref

OP = ops.get("hard_attention")
SEGMENTS = np.array([[0] * 3 + [1] * 4, [0] * 7])


def _mask(b=2, t=7, s=7):
  """Causal, segments and key padding; row 0 of example 1 has no key."""
  valid = np.ones((b, 1, 1, s), bool)
  valid[1, ..., 0] = False
  return ref.full_mask(b, 1, t, s, mask=valid, is_causal=True, segment_ids=SEGMENTS), valid


def test_expectation_mode_is_soft_attention():
  """rng=None, eval_mode="expectation": E[v_z] = softmax attention, forward and gradient."""
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4)
  full, valid = _mask()
  op = functools.partial(OP, mask=valid, is_causal=True, segment_ids=SEGMENTS)
  out = ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=full),
                           (q, k, v))
  assert np.all(out[1, 0] == 0.0)


def test_argmax_mode_returns_the_most_probable_keys_value():
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4, seed=3)
  full, valid = _mask()
  out = np.asarray(OP(q, k, v, mask=valid, is_causal=True, segment_ids=SEGMENTS,
                      eval_mode="argmax"))
  with ref.x64():
    logits = np.asarray(ref.attention_logits(q, k))
  z = np.argmax(np.where(full, logits, -np.inf), axis=-1)  # [b, n, t]
  vv = np.asarray(ref.repeat_kv(v, 4))
  want = np.take_along_axis(vv, np.transpose(z, (0, 2, 1))[..., None], axis=1)
  want = np.where(np.transpose(full.any(-1), (0, 2, 1))[..., None], want, 0.0)
  np.testing.assert_array_equal(out, want)


@pytest.fixture(scope="module")
def sampled():
  """2048 samples of the op and of its REINFORCE gradients of Σ out·c (with and without the
  baseline) on a tiny GQA input (1 example, 3 queries, 4 heads over 2 kv heads, 4 keys), one
  jit."""
  q, k, v = ref.qkv(b=1, t=3, s=4, n=4, k=2, d=4, seed=11)
  c = ref.normal(12, (1, 3, 4, 4))
  mask = jnp.asarray(np.array([[[[True, True, False, True]]]]))  # Key 2 is padding.

  def one(rng):
    grads = {}
    for baseline in ("expectation", "none"):
      loss = lambda q, k, v: jnp.sum(OP(q, k, v, mask=mask, rng=rng, baseline=baseline) * c)
      grads[baseline] = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return OP(q, k, v, mask=mask, rng=rng), grads

  outs, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 2048))
  with ref.x64():
    probs = np.asarray(jax.nn.softmax(jnp.where(mask, ref.attention_logits(q, k), -1e300)))
    exact = jax.grad(lambda *a: jnp.sum(ref.softmax_attention(*a, mask=mask) * ref.f64(c)),
                     argnums=(0, 1, 2))(*ref.f64(q, k, v))
  return dict(v=v, probs=probs, exact=[np.asarray(g) for g in exact], outs=outs, grads=grads)


def test_samples_are_values_drawn_with_the_attention_probabilities(sampled):
  outs = np.asarray(sampled["outs"])  # [N, 1, t, n, d]
  vv = np.asarray(ref.repeat_kv(sampled["v"], 4))[0]  # [s, n, d]
  # Each output row is exactly one key's value: recover z.
  match = np.all(outs[:, 0, :, :, None] == np.transpose(vv, (1, 0, 2))[None, None], axis=-1)
  assert np.all(match.sum(-1) == 1)  # [N, t, n, s] one-hot
  freq = match.mean(0)  # [t, n, s]
  want = np.transpose(sampled["probs"][0], (1, 0, 2))
  assert np.all(freq[..., 2] == 0)  # The padded key is never drawn.
  # Binomial standard error √(p(1−p)/N) <= 0.011 for N = 2048: 5 standard errors.
  np.testing.assert_allclose(freq, want, atol=0.055)


@pytest.mark.parametrize("baseline", ["expectation", "none"])
def test_reinforce_gradient_is_unbiased(sampled, baseline):
  """The mean of the score-function estimates over 2048 fixed-seed samples is within 5
  standard errors of the mean (plus float32 round-off) of the exact gradient of Σ E[out]·c."""
  grads = sampled["grads"][baseline]
  for name, g, want in zip("qkv", grads, sampled["exact"]):
    g = np.asarray(g, np.float64)
    mean, err = g.mean(0), g.std(0) / np.sqrt(g.shape[0])
    bad = np.abs(mean - want) > 5 * err + 1e-5
    assert not bad.any(), f"d{name}: {mean[bad]} vs {want[bad]} (stderr {err[bad]})"


def test_baseline_reduces_the_estimators_variance(sampled):
  var = {b: sum(float(np.var(np.asarray(g), axis=0).sum()) for g in sampled["grads"][b][:2])
         for b in ("expectation", "none")}
  assert var["expectation"] < var["none"]


def test_layer_samples_with_a_dropout_stream_and_is_deterministic_without():
  model = layers.Attention(num_heads=4, num_kv_heads=2, op="hard_attention")
  x = ref.normal(0, (2, 9, 16))
  params = jax.jit(model.init)(jax.random.key(0), x)
  sample = jax.jit(lambda p, rng: model.apply(p, x, is_causal=True, rngs={"dropout": rng}))
  evaluate = jax.jit(lambda p: model.apply(p, x, is_causal=True))
  soft = evaluate(params)
  assert np.all(np.isfinite(soft))
  first, second = sample(params, jax.random.key(1)), sample(params, jax.random.key(2))
  assert not np.allclose(first, soft) and not np.allclose(first, second)
  np.testing.assert_array_equal(soft, evaluate(params))


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=3, n=2, k=2, d=4)
  return [(lambda: OP(q, k, v, eval_mode="mode"), "eval_mode"),
          (lambda: OP(q, k, v, baseline="mean"), "baseline"),
          (lambda: OP(q, k, v, rng=3), "rng")]


@pytest.mark.parametrize("case", range(3))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
