"""`hard_attention` (Show, Attend and Tell; Latent Alignment and Variational Attention) and
`variational_attention` against float64 references: the deterministic forms, the sampled
alignment (from the attention or the amortised posterior), the REINFORCE gradient, whose Monte
Carlo mean is compared with the exact gradient of the expected output, and the KL term."""
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


VARIATIONAL = ops.get("variational_attention")


def test_variational_attention_evaluates_the_priors_expectation():
  """Without rng (no target at test time): Σ_j p_j v_j under the prior, forward and gradient."""
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4, seed=2)
  full, valid = _mask()
  op = functools.partial(VARIATIONAL, mask=valid, is_causal=True, segment_ids=SEGMENTS,
                         posterior_query=ref.normal(9, q.shape))
  ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=full), (q, k, v))


@pytest.fixture(scope="module")
def posterior_samples():
  """4096 samples of variational attention and its gradients of Σ out·c wrt the prior query,
  the posterior query, k and v (tiny GQA input, key 2 padded), one jit; the float64
  posterior and the exact gradient of Σ E_q[out]·c."""
  q, k, v = ref.qkv(b=1, t=3, s=4, n=4, k=2, d=4, seed=21)
  post = ref.normal(24, q.shape)
  c = ref.normal(25, (1, 3, 4, 4))
  mask = jnp.asarray(np.array([[[[True, True, False, True]]]]))

  def one(rng):
    loss = lambda q, post, k, v: jnp.sum(
        VARIATIONAL(q, k, v, mask=mask, rng=rng, posterior_query=post) * c)
    return (VARIATIONAL(q, k, v, mask=mask, rng=rng, posterior_query=post),
            jax.grad(loss, argnums=(0, 1, 2, 3))(q, post, k, v))

  outs, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 4096))
  with ref.x64():
    posterior = lambda post, k: jax.nn.softmax(jnp.where(mask, ref.attention_logits(post, k),
                                                         -1e300))
    expected = lambda post, k, v: jnp.sum(jnp.einsum(
        "bnts,bsnd->btnd", posterior(post, k), ref.repeat_kv(v, 4)) * ref.f64(c))
    exact = jax.grad(expected, argnums=(0, 1, 2))(*ref.f64(post, k, v))
    probs = np.asarray(posterior(*ref.f64(post, k)))
  return dict(v=v, probs=probs, exact=[np.asarray(g) for g in exact], outs=outs, grads=grads)


def test_variational_attention_samples_the_posterior(posterior_samples):
  outs = np.asarray(posterior_samples["outs"])
  vv = np.asarray(ref.repeat_kv(posterior_samples["v"], 4))[0]
  match = np.all(outs[:, 0, :, :, None] == np.transpose(vv, (1, 0, 2))[None, None], axis=-1)
  assert np.all(match.sum(-1) == 1)
  freq = match.mean(0)
  assert np.all(freq[..., 2] == 0)
  np.testing.assert_allclose(freq, np.transpose(posterior_samples["probs"][0], (1, 0, 2)),
                             atol=0.055)


def test_variational_attention_gradient_is_the_elbo_terms(posterior_samples):
  """The REINFORCE estimates wrt the posterior query, k and v average (4096 samples, within 5
  standard errors) to the exact gradient of Σ E_q[out]·c; the prior query gets none (it enters
  through the KL)."""
  dq, *grads = posterior_samples["grads"]
  assert np.all(np.asarray(dq) == 0.0)
  for name, g, want in zip(("posterior_query", "k", "v"), grads, posterior_samples["exact"]):
    g = np.asarray(g, np.float64)
    mean, err = g.mean(0), g.std(0) / np.sqrt(g.shape[0])
    bad = np.abs(mean - want) > 5 * err + 1e-5
    assert not bad.any(), f"d{name}: {mean[bad]} vs {want[bad]} (stderr {err[bad]})"


def test_variational_kl_matches_the_formula():
  """KL(q ‖ p) = Σ_j q_j log(q_j / p_j) per row, 0 for a row without keys; forward and
  gradient wrt the prior query, the posterior query and the keys."""
  q, k, _ = ref.qkv(t=7, n=4, k=2, d=4, seed=13)
  post = ref.normal(14, q.shape)
  full, valid = _mask()

  def want(q, k, post):
    def log_softmax(logits):  # over the visible keys; masked logits are finite (−1e300)
      logits = jnp.where(full, logits, -1e300)
      return logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    log_p = log_softmax(ref.attention_logits(q, k))
    log_q = log_softmax(ref.attention_logits(post, k))
    return jnp.swapaxes(jnp.where(full, jnp.exp(log_q) * (log_q - log_p), 0.0).sum(-1), 1, 2)

  kl = ref.assert_matches(
      lambda q, k, post: ops.variational_kl(q, k, post, mask=valid, is_causal=True,
                                            segment_ids=SEGMENTS), want, (q, k, post))
  assert np.all(kl[1, 0] == 0.0) and np.all(kl >= -1e-6)
  same = ops.variational_kl(q, k, q, mask=valid, is_causal=True, segment_ids=SEGMENTS)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=3, n=2, k=2, d=4)
  rng = jax.random.key(0)
  return [(lambda: OP(q, k, v, eval_mode="mode"), "eval_mode"),
          (lambda: OP(q, k, v, baseline="mean"), "baseline"),
          (lambda: OP(q, k, v, rng=3), "rng"),
          (lambda: VARIATIONAL(q, k, v, rng=rng), "posterior_query"),
          (lambda: VARIATIONAL(q, k, v, rng=rng, posterior_query=q[:, :2]), "posterior_query"),
          (lambda: VARIATIONAL(q, k, v, rng=rng, posterior_query=q, baseline="mean"),
           "baseline")]


@pytest.mark.parametrize("case", range(6))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
