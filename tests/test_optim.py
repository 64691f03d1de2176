"""The memory-saving Adafactor and the head/body weight decay of Scaling Vision Transformers,
against a float64 NumPy reference of the update written from the paper's description."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_attn.train import optim

LR = 0.05


def adafactor_reference(params, grads_per_step, *, lr, weight_decay, momentum, decay_exponent,
                        beta2_cap, clip_threshold, epsilon=1e-30, min_dim=4):
  """Parameters after one update per gradient: factored V̂ = R Cᵀ / mean(R) for a matrix, full V
  otherwise; u = g / sqrt(V̂) clipped to rms `clip_threshold`; m = β1 m + (1 - β1) u;
  p -= lr (m + wd p) for matrices (no decay of vectors)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  state = {k: dict(r=0.0, c=0.0, v=0.0, m=0.0) for k in p}
  for k_step, grads in enumerate(grads_per_step, start=1):
    beta2 = min(1.0 - k_step ** (-decay_exponent), beta2_cap)
    for name, g in grads.items():
      g = np.asarray(g, np.float64)
      s = state[name]
      sq = g * g + epsilon
      if g.ndim == 2 and min(g.shape) >= min_dim:
        s["r"] = beta2 * s["r"] + (1 - beta2) * sq.mean(axis=1)
        s["c"] = beta2 * s["c"] + (1 - beta2) * sq.mean(axis=0)
        v_hat = np.outer(s["r"], s["c"]) / s["r"].mean()
      else:
        s["v"] = beta2 * s["v"] + (1 - beta2) * sq
        v_hat = s["v"]
      u = g / np.sqrt(v_hat)
      u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip_threshold)
      s["m"] = momentum * s["m"] + (1 - momentum) * u
      decay = weight_decay if g.ndim >= 2 else 0.0
      p[name] = p[name] - lr * (s["m"] + decay * p[name])
  return p


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
            "bias": rng.normal(size=(5,)).astype(np.float32)}
  grads = [{k: (rng.normal(size=v.shape) * 10 ** rng.uniform(-2, 1)).astype(np.float32)
            for k, v in params.items()} for _ in range(4)]
  return params, grads


def adafactor(**kwargs):
  return optim.make_optimizer("adafactor", kwargs,
                              optim.make_schedule(LR, dict(decay_type="constant"), 10))


def run(tx, params, grads):
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(jnp.add, p, updates)
  return p, state


@pytest.mark.parametrize("clip_threshold", [1.0, 0.05])
def test_adafactor_matches_reference(problem, clip_threshold):
  params, grads = problem
  kwargs = dict(weight_decay=0.3, momentum=0.9, decay_exponent=0.8, beta2_cap=0.6,
                clip_threshold=clip_threshold)
  got, _ = run(adafactor(**kwargs, momentum_dtype="float32", min_dim_size_to_factor=4),
               params, grads)
  expected = adafactor_reference(params, grads, lr=LR, **kwargs)
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_adafactor_memory_saving_state(problem):
  params, grads = problem
  tx = adafactor(min_dim_size_to_factor=4)
  _, state = run(tx, params, grads)
  leaves = [x for x in jax.tree.leaves(state) if x.size > 1]
  # Factored second moment of the 6x5 kernel (6 + 5 numbers), full one for the bias (5); the
  # first moment in bfloat16.
  sizes = sorted(int(x.size) for x in leaves if x.dtype == jnp.float32)
  assert sizes == [5, 5, 6], sizes
  assert sorted(x.shape for x in leaves if x.dtype == jnp.bfloat16) == [(5,), (6, 5)]
  # bfloat16 momentum stays within bfloat16's rounding of the float32 one.
  reference = adafactor_reference(params, grads, lr=LR, weight_decay=0.0, momentum=0.9,
                                  decay_exponent=0.8, beta2_cap=0.999, clip_threshold=1.0)
  got, _ = run(tx, params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], reference[k], rtol=1e-3, atol=2e-3 * LR, err_msg=k)
  no_momentum, _ = run(adafactor(momentum=None), params, grads[:1])
  # Without a first moment the first update is the clipped u itself: |u| ≈ 1 (V = g² at step 1).
  np.testing.assert_allclose(np.abs(params["bias"] - no_momentum["bias"]), LR, rtol=1e-5)


def test_head_and_body_weight_decay():
  params = {"head": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "Transformer": {"kernel": jnp.ones((4, 3)), "scale": jnp.ones((3,))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  schedule = optim.make_schedule(0.1, dict(decay_type="constant"), 10)
  for name in optim.OPTIMIZERS:
    tx = optim.make_optimizer(name, dict(weight_decay=0.5), schedule, 1.0,
                              head_weight_decay=2.0)
    # Zero gradients: the first update is -lr·wd·p (sgd's L2 term has the same first step).
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 2.0, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(updates["Transformer"]["kernel"], -0.1 * 0.5, rtol=1e-6,
                               err_msg=name)
    assert float(jnp.abs(updates["head"]["bias"]).max()) == 0, name
    assert float(jnp.abs(updates["Transformer"]["scale"]).max()) == 0, name
  tx = optim.make_optimizer("adamw", {}, schedule, head_weight_decay=1.0)
  with pytest.raises(ValueError, match="wd_head needs a model whose classifier is the "
                                       "top-level parameter collection 'head'"):
    tx.init({"classifier": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="wd_head must be >= 0"):
    optim.make_optimizer("adamw", {}, schedule, head_weight_decay=-1.0)
  for bad, match in ((dict(beta2_cap=1.5), "beta2_cap must be in"),
                     (dict(momentum=1.0), "momentum must be in"),
                     (dict(clip_threshold=0.0), "clip_threshold must be > 0")):
    with pytest.raises(ValueError, match=match):
      optim.make_optimizer("adafactor", bad, schedule)


@pytest.mark.parametrize("name,kwargs", [("adamw", dict(b2=0.95, weight_decay=0.1)),
                                         ("lion", dict(b1=0.95, weight_decay=0.1))])
def test_adamw_and_lion_keep_optax_state_and_updates(problem, name, kwargs):
  """Without `wd_head`, adamw and lion are `optax.adamw` / `optax.lion` with the decay mask:
  the same state tree (so workdirs saved before resume) and the same parameters."""
  schedule = optim.make_schedule(LR, dict(decay_type="constant"), 10)
  ours = optim.make_optimizer(name, kwargs, schedule)
  kwargs = dict(kwargs)
  wd = kwargs.pop("weight_decay")
  theirs = getattr(optax, name)(schedule, weight_decay=wd, mask=optim.decay_mask, **kwargs)
  (p_ours, s_ours), (p_theirs, s_theirs) = (run(tx, *problem) for tx in (ours, theirs))
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  for a, b in zip(jax.tree.leaves((p_ours, s_ours)), jax.tree.leaves((p_theirs, s_theirs))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
