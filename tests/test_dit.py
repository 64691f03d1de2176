"""DiT / PixArt-α family: variants and parameter counts, adaLN-Zero identity at init, the noise
schedule and losses against float64 formulas, the DDIM sampler with guidance, cross-attention,
the diffusion evaluator, and the digits config through `big_attn.main`."""
import functools
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import evaluators, interpret, models
from big_attn import main as main_lib
from big_attn.models import dit
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=2)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "patch_h", "patch_w",
                 "channels_in", "classes", None}


def _images(batch=2, size=8, channels=1, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _abstract(model, images):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


def _init(model, images, seed=1, std=0.3):
  """Random parameters of the right shapes (no zero gates), filled by NumPy."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                      nn.meta.unbox(_abstract(model, images)))


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_registry_and_decode_variant():
  assert models.get("dit") is dit and "diffusion" in evaluators.names()
  assert dit.decode_variant("XL/2") == dict(width=1152, depth=28, num_heads=16, mlp_dim=4608,
                                            patch_size=(2, 2))
  assert dit.decode_variant("S/8")["patch_size"] == (8, 8)
  assert dit.decode_variant("L/4")["depth"] == 24
  for bad in ("XL/3", "H/2", "XL", "B/16", "", None):
    with pytest.raises(ValueError, match="DiT variant"):
      dit.decode_variant(bad)


def test_parameter_counts_match_paper():
  # DiT paper Table 1: S 33M, B 130M, L 458M, XL 675M (256x256 -> 32x32x4 latents, 1000
  # classes, learn_sigma). The patch size changes only the embedding and output layers.
  paper = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
  for variant in ("S/2", "B/2", "L/2", "XL/2", "XL/4", "XL/8"):
    want = paper[variant.split("/")[0]]
    got = dit.count_params(dit.Model(num_classes=1000, variant=variant))
    assert abs(got - want) / want < 0.02, (variant, got)
    if variant == "XL/2":
      # The official code's count (675,129,632) includes its frozen 256 x 1152 position
      # embedding, which is no parameter here.
      assert got == 675_129_632 - 256 * 1152
  # PixArt-α (Chen et al. 2023): 0.6B parameters for its XL/2 with T5 (4096-wide, 120 tokens).
  pixart = dit.Model(num_classes=1000, variant="XL/2", cross_attention=True, adaln_single=True,
                     class_adaln=False, cond_dim=4096, num_cond_tokens=120)
  got = dit.count_params(pixart)
  assert abs(got - 0.6e9) / 0.6e9 < 0.02, got


def test_tiny_parameter_count_formula():
  d, m, depth, classes, p, c = 16, 32, 2, 10, 2, 1
  block = 4 * (d * d + d) + (2 * d * m + m + d) + (6 * d * d + 6 * d)
  t_embed = 256 * d + d + d * d + d
  final = (2 * d * d + 2 * d) + (d * p * p * 2 * c + p * p * 2 * c)
  want = (p * p * c * d + d) + t_embed + (classes + 1) * d + depth * block + final
  assert dit.count_params(dit.Model(num_classes=classes, **TINY), (8, 8, 1)) == want
  cross = dit.Model(num_classes=classes, cross_attention=True, num_cond_tokens=3, **TINY)
  assert dit.count_params(cross, (8, 8, 1)) == want + depth * 4 * (d * d + d) + 11 * 3 * d


def test_adaln_zero_blocks_are_identity_at_init():
  # With cross-attention too: its output projection starts at zero (PixArt-α).
  model = dit.Model(num_classes=10, cross_attention=True, num_cond_tokens=2, **TINY)
  x = _images(batch=3)
  t, labels = jnp.array([0, 500, 999]), jnp.array([1, 2, 10])
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
  for i in range(2):
    np.testing.assert_array_equal(params[f"adaLN_{i}"]["kernel"], 0.0)
    np.testing.assert_array_equal(params[f"block_{i}"]["cross_attn"]["out"]["kernel"], 0.0)
  out, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))(
      {"params": params}, x, t, labels)
  inter = state["intermediates"]
  tokens = inter["x_embedder"]["__call__"][0].reshape(3, 16, 16)
  tokens = tokens + dit.posemb_sincos_2d(4, 4, 16)
  assert np.abs(tokens).max() > 0.1
  for i in range(2):
    np.testing.assert_allclose(inter[f"block_{i}"]["__call__"][0], tokens, atol=1e-6)
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised final layer


def test_forward_shapes_and_options():
  x = _images(batch=2, size=8, channels=3)
  t, labels = jnp.array([3, 700]), jnp.array([0, 4])
  for kwargs, channels in ((dict(), 6),
                           (dict(learn_sigma=False, adaln_single=True, dtype=jnp.bfloat16,
                                 patch_size=4, class_dropout=0.0,
                                 remat_policy="dots_saveable"), 3)):
    model = dit.Model(num_classes=5, **dict(TINY, **kwargs))
    params = _init(model, x)
    out = model.apply({"params": params}, x, t, labels)
    assert out.shape == (2, 8, 8, channels) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3
  single = _abstract(dit.Model(num_classes=5, adaln_single=True, **TINY), x)
  assert "t_block" in single and "adaLN_0" not in single
  assert single["scale_shift_table_1"].value.shape == (6, 16)


def test_logical_axis_names():
  boxed = _abstract(dit.Model(num_classes=10, cross_attention=True, cond_dim=12,
                              **TINY), _images())
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim, leaf.names


def test_timestep_and_labels_condition_the_output():
  model = dit.Model(num_classes=10, **TINY)
  x = _images()
  params = _init(model, x)
  apply = lambda t, y, **kw: model.apply({"params": params}, x, jnp.array(t), jnp.array(y), **kw)
  base = apply([10, 10], [1, 1])
  assert np.abs(apply([11, 10], [1, 1])[0] - base[0]).max() > 1e-4
  assert np.abs(apply([10, 10], [2, 1])[0] - base[0]).max() > 1e-4
  np.testing.assert_allclose(apply([10, 10], [2, 1])[1], base[1], atol=1e-5)
  # force_drop is the null class; train-time dropout with probability ~1 drops every label.
  null = apply([10, 10], [10, 10])
  np.testing.assert_allclose(apply([10, 10], [1, 1], force_drop=jnp.array([True, True])), null,
                             atol=1e-6)
  always = model.clone(class_dropout=0.999999)
  out = always.apply({"params": params}, x, jnp.array([10, 10]), jnp.array([1, 1]), train=True,
                     rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(out, null, atol=1e-6)


def test_attention_op_by_name():
  x = _images()
  t, labels = jnp.array([5, 50]), jnp.array([1, 2])
  model = dit.Model(num_classes=4, **TINY)
  params = _init(model, x)
  out = model.apply({"params": params}, x, t, labels)
  sigmoid = dit.Model(num_classes=4, attention="sigmoid", **TINY)
  out_sigmoid = sigmoid.apply({"params": params}, x, t, labels)
  assert np.all(np.isfinite(out_sigmoid)) and np.abs(out_sigmoid - out).max() > 1e-4
  with pytest.raises(KeyError, match="softmax"):
    dit.Model(num_classes=4, attention="no_such_op", **TINY).apply({"params": params}, x, t,
                                                                  labels)


def test_clear_circular_window_attention():
  """CLEAR's circular local attention (`neighborhood` with `radius`): each patch of the 4x4
  grid attends exactly to the patches within distance r of it."""
  x = _images()
  t, labels = jnp.array([5, 50]), jnp.array([1, 2])
  model = dit.Model(num_classes=4, attention="neighborhood", attention_args={"radius": 1.5},
                    **TINY)
  params = _init(model, x)
  maps = interpret.capture_attention(model, {"params": params}, x, t, labels)
  coords = np.stack(np.unravel_index(np.arange(16), (4, 4)), -1)
  inside = ((coords[:, None] - coords[None]) ** 2).sum(-1) <= 1.5 ** 2
  assert list(maps) == ["block_0/attn", "block_1/attn"]
  for m in maps.values():
    assert m.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(np.asarray(m) > 0, np.broadcast_to(inside, m.shape))
    np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, rtol=1e-5)


def test_cross_attention_uses_condition_tokens():
  x = _images()
  t = jnp.array([5, 50])
  # Per-class learned tokens, with the class only in cross-attention.
  model = dit.Model(num_classes=4, class_adaln=False, cross_attention=True, num_cond_tokens=2,
                    **TINY)
  params = _init(model, x)
  assert params["class_tokens"].shape == (5, 2, 16) and "y_embedder" not in params
  a = model.apply({"params": params}, x, t, jnp.array([1, 1]))
  b = model.apply({"params": params}, x, t, jnp.array([3, 1]))
  assert np.abs(a[0] - b[0]).max() > 1e-4
  np.testing.assert_allclose(a[1], b[1], atol=1e-5)
  no_cross = {k: v for k, v in params.items() if k != "class_tokens"}
  for i in range(2):
    no_cross[f"block_{i}"] = {k: v for k, v in params[f"block_{i}"].items() if k != "cross_attn"}
  plain = dit.Model(num_classes=4, class_adaln=False, **TINY).apply({"params": no_cross}, x, t,
                                                                   jnp.array([1, 1]))
  assert np.abs(plain - a).max() > 1e-4
  # Caller-given tokens (text-like), a padding mask, and the learned null condition.
  text = dit.Model(num_classes=4, cross_attention=True, cond_dim=12, num_cond_tokens=3, **TINY)
  params = _init(text, x)
  labels = jnp.array([0, 0])
  tokens = jax.random.normal(jax.random.key(3), (2, 3, 12))
  run = lambda tok, **kw: text.apply({"params": params}, x, t, labels, cond_tokens=tok, **kw)
  out = run(tokens)
  assert np.abs(run(tokens.at[0].multiply(-1.0))[0] - out[0]).max() > 1e-4
  mask = jnp.array([[True, True, False], [True, True, True]])
  masked = run(tokens, cond_mask=mask)
  other = run(tokens.at[0, 2].set(100.0), cond_mask=mask)
  np.testing.assert_allclose(masked, other, atol=1e-5)
  null = text.apply({"params": params}, x, t, jnp.array([4, 4]))  # null class and tokens
  np.testing.assert_allclose(run(tokens, force_drop=jnp.array([True, True])), null, atol=1e-5)


def test_noise_schedule_and_q_sample_by_hand():
  s = dit.noise_schedule(1000)
  betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
  np.testing.assert_allclose(s["betas"], betas, rtol=1e-12)
  ab = 1.0
  for k in range(1000):
    ab *= 1.0 - betas[k]
    if k in (0, 1, 499, 999):
      np.testing.assert_allclose(s["alphas_cumprod"][k], ab, rtol=1e-10)
  assert abs(s["alphas_cumprod"][-1] - 4.0358e-5) < 1e-8  # the linear schedule's ᾱ_T
  t = 500
  ab_t, ab_p = s["alphas_cumprod"][t], s["alphas_cumprod"][t - 1]
  np.testing.assert_allclose(s["posterior_variance"][t], betas[t] * (1 - ab_p) / (1 - ab_t))
  np.testing.assert_allclose(s["posterior_log_variance_clipped"][0],
                             math.log(s["posterior_variance"][1]))
  x0, noise = _images(batch=3), _images(batch=3, seed=1)
  ts = jnp.array([0, 500, 999])
  got = dit.q_sample(x0, ts, noise, s)
  for i, k in enumerate((0, 500, 999)):
    want = math.sqrt(s["alphas_cumprod"][k]) * np.asarray(x0[i]) + math.sqrt(
        1 - s["alphas_cumprod"][k]) * np.asarray(noise[i])
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dit.noise_schedule(100)["betas"][[0, -1]], [1e-3, 0.2])
  assert list(dit.ddim_timesteps(1000, 50)[:3]) == [0, 20, 40]
  with pytest.raises(ValueError, match="num_timesteps"):
    dit.noise_schedule(1)
  with pytest.raises(ValueError, match="num_steps"):
    dit.ddim_timesteps(1000, 1001)


def test_vlb_terms_against_float64_formulas():
  s = dit.noise_schedule(1000)
  rng = np.random.default_rng(0)
  x0 = np.clip(rng.normal(0, 0.5, (3, 4, 4, 1)), -1, 1).astype(np.float32)
  x0[0, 0, 0, 0], x0[0, 0, 1, 0] = -1.0, 1.0  # the decoder's edge bins
  noise = rng.normal(size=x0.shape).astype(np.float32)
  eps = (noise + rng.normal(0, 0.3, x0.shape)).astype(np.float32)
  v = rng.uniform(-1, 1, x0.shape).astype(np.float32)
  t = np.array([0, 1, 600])
  x_t = np.asarray(dit.q_sample(x0, jnp.asarray(t), noise, s))
  got = dit.vlb_terms(x0, x_t, jnp.asarray(t), eps, v, s)
  with reference.x64():
    # Improved DDPM's tanh approximation of the normal CDF (its code, and DiT's).
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    for i, k in enumerate(t):
      ab, ab_prev, beta = (s["alphas_cumprod"][k], s["alphas_cumprod_prev"][k], s["betas"][k])
      post_var = beta * (1 - ab_prev) / (1 - ab)
      log_min = math.log(s["posterior_variance"][1] if k == 0 else post_var)
      log_var = (v[i] + 1) / 2 * math.log(beta) + (1 - v[i]) / 2 * log_min
      pred_x0 = (x_t[i] - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
      def mean(a, ab=ab, ab_prev=ab_prev, beta=beta, x_t=x_t[i]):
        return (math.sqrt(ab_prev) * beta * a + math.sqrt(1 - beta) * (1 - ab_prev) * x_t) / (
            1 - ab)

      mu_q, mu_p = mean(x0[i].astype(np.float64)), mean(pred_x0.astype(np.float64))
      if k == 0:
        sd = np.exp(0.5 * log_var)
        hi = np.where(x0[i] > 0.999, 1.0, cdf((x0[i] + 1 / 255 - mu_p) / sd))
        lo = np.where(x0[i] < -0.999, 0.0, cdf((x0[i] - 1 / 255 - mu_p) / sd))
        want = -np.mean(np.log(np.maximum(hi - lo, 1e-12))) / math.log(2)
      else:
        var_q, var_p = math.exp(log_min), np.exp(log_var)
        kl = 0.5 * (np.log(var_p / var_q) + var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1)
        want = np.mean(kl) / math.log(2)
      np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-5)
  # The true noise and the posterior variance (v = -1) give a zero KL.
  exact = dit.vlb_terms(x0, x_t, jnp.asarray(t), noise, -np.ones_like(v), s)
  np.testing.assert_allclose(exact[1:], 0.0, atol=1e-4)


def test_train_steps_lower_the_loss():
  model = dit.Model(num_classes=10, **dict(TINY, depth=1))
  x = jnp.clip(_images(batch=8), -1, 1)
  batch = {"image": x, "labels": jax.nn.one_hot(jnp.arange(8) % 10, 10)}
  params = _init(model, x, std=0.1)
  tx = optax.adam(3e-3)
  rng = jax.random.key(4)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: dit.TASK.loss(model, p, batch, rng))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  new = params
  for _ in range(5):
    new, opt_state, loss = step(new, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
  assert changed["y_embedder"] and changed["block_0"]["attn"]["query"]["kernel"]
  spec = dit.TASK.batch_spec(dict(image_shape=(8, 8, 1), num_classes=10), 4)
  assert spec == {"image": ((4, 8, 8, 1), jnp.float32), "labels": ((4, 10), jnp.float32)}


def test_sampler_guidance():
  model = dit.Model(num_classes=3, **TINY)
  x = _images(batch=2)
  params = _init(model, x, std=0.1)
  labels, rng = jnp.array([0, 2]), jax.random.key(7)
  x_t = jax.random.normal(jax.random.split(rng)[1], (2, 8, 8, 1))  # the sampler's x_T

  def eps(x, t, **kw):
    return model.apply({"params": params}, x, jnp.full((2,), t), labels, **kw)[..., :1]

  one = dit.sample(model, params, labels, rng, 4, 1.0, image_shape=(8, 8, 1))
  assert one.shape == (2, 8, 8, 1)
  np.testing.assert_allclose(one, reference.ddim(eps, x_t, 4), rtol=1e-4, atol=1e-4)
  guided = dit.sample(model, params, labels, rng, 4, 3.0, image_shape=(8, 8, 1),
                      clip_denoised=True)
  drop = jnp.array([True, True])
  want = reference.ddim(lambda x, t: eps(x, t, force_drop=drop) + 3.0 * (
      eps(x, t) - eps(x, t, force_drop=drop)), x_t, 4, clip=True)
  np.testing.assert_allclose(guided, want, rtol=1e-4, atol=1e-4)
  assert np.abs(guided).max() <= 1.0 + 1e-5
  assert np.abs(guided - one).max() > 1e-3
  no_null = model.clone(class_dropout=0.0)
  with pytest.raises(ValueError, match="null class"):
    dit.sample(no_null, params, labels, rng, 4, 2.0, image_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="num_steps"):
    dit.sample(model, params, labels, rng, 0, 2.0, image_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="labels"):
    dit.sample(model, params, labels[:, None], rng, 4, 2.0, image_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="image_shape"):
    dit.sample(model, params, labels, rng, 4, 2.0, image_shape=(8, 8))


def test_bad_arguments_raise():
  x = _images()
  t, labels = jnp.array([1, 2]), jnp.array([0, 1])
  cases = [
      (dict(num_classes=3), "variant or explicit"),
      (dict(num_classes=3, variant="XL/3"), "DiT variant"),
      (dict(num_classes=0, **TINY), "num_classes"),
      (dict(num_classes=3, **dict(TINY, patch_size=3)), "divisible by patch_size"),
      (dict(num_classes=3, **dict(TINY, patch_size=(2, 0))), "patch_size"),
      (dict(num_classes=3, class_dropout=1.0, **TINY), "class_dropout"),
      (dict(num_classes=3, remat_policy="bad", **TINY), "remat_policy"),
      (dict(num_classes=3, cond_dim=8, **TINY), "cross_attention"),
      (dict(num_classes=3, cross_attention=True, num_cond_tokens=0, **TINY), "num_cond_tokens"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      dit.Model(**kwargs).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="attention_args"):
    dit.Model(num_classes=3, attention_args=[1], **TINY).init(jax.random.key(0), x)
  model = dit.Model(num_classes=3, **TINY)
  params = _init(model, x)
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  with pytest.raises(ValueError, match="images"):
    apply(x[0], t, labels)
  with pytest.raises(ValueError, match="t must"):
    apply(x, t[:1], labels)
  with pytest.raises(ValueError, match="labels must"):
    apply(x, t, labels[:, None])
  with pytest.raises(ValueError, match="cond_tokens given"):
    apply(x, t, labels, cond_tokens=jnp.zeros((2, 1, 4)))
  text = dit.Model(num_classes=3, cross_attention=True, cond_dim=4, **TINY)
  text_params = _init(text, x)
  with pytest.raises(ValueError, match="cond_tokens must be"):
    text.apply({"params": text_params}, x, t, labels, cond_tokens=jnp.zeros((2, 1, 5)))
  with pytest.raises(ValueError, match="num_cond_tokens"):
    text.apply({"params": text_params}, x, t, labels, cond_tokens=jnp.zeros((2, 2, 4)))


def test_configs_build():
  digits = _config_module("dit_digits")
  for arg in (None, "runlocal", "conditioning=cross,attention=sigmoid", "conditioning=both"):
    config = digits.get_config(arg)
    main_lib.check_config(config)
    assert config.model_name == "dit" and config.evals.eval.type == "diffusion"
    model = dit.Model(num_classes=10, **config.model.to_dict())
    assert 1e5 < dit.count_params(model, (8, 8, 1)) < 1e6
  with pytest.raises(ValueError, match="conditioning"):
    digits.get_config("conditioning=text")
  full = _config_module("dit_xl2_i256")
  for arg in (None, "runlocal", "variant=B/4,cross_attention=True,attention=sigmoid"):
    config = full.get_config(arg)
    main_lib.check_config(config)
    assert config.input.image_size == 32 and config.input.name == "tfds:imagenet256_latents"
    assert config.model.num_classes == 1000 and config.model.learn_sigma
  assert full.get_config(None).model.variant == "XL/2"  # counted in test_parameter_counts
  kwargs = full.get_config("runlocal").model.to_dict()
  kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  assert dit.count_params(dit.Model(**kwargs), (32, 32, 4)) == dit.count_params(
      dit.Model(num_classes=1000, variant="S/8"))
  with pytest.raises(ValueError, match="unknown config arg"):
    full.get_config("bogus=1")


def test_digits_config_through_main(tmp_path):
  config = _config_module("dit_digits").get_config("runlocal,conditioning=both")
  config.model.update(width=16, depth=1, num_heads=2, mlp_dim=32)
  config.input.batch_size = 16
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.total_steps = 10
  config.log_every = 5
  config.ckpt_every = 10
  sample_dir = str(tmp_path / "samples")
  config.evals.eval.update(every=10, batch_size=100, sample_steps=2, samples_per_class=2,
                           sample_dir=sample_dir,
                           attention_reuse={"method": "pab", "timesteps": (-1, 1000)})
  config = ml_collections.ConfigDict(config.to_dict())
  out = main_lib.train_and_evaluate(config, str(tmp_path / "work"))
  assert out["step"] == 10
  with open(tmp_path / "work" / "metrics.jsonl", encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  train = [m["train/loss"] for m in metrics if "train/loss" in m]
  evals = [m for m in metrics if "eval/loss" in m]
  assert len(train) == 2 and all(np.isfinite(train))
  assert len(evals) == 1 and 0 < evals[0]["eval/mse"] < 2 and "eval/vb" not in evals[0]
  assert os.listdir(sample_dir) == ["samples_10.png"]
