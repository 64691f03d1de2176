"""ConvNeXt model family: variants, parameter counts, blocks, training, configs, main."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import convnext
from big_attn.train import config_lib
from big_attn.train import step as step_lib
from tests.test_train import _config_module, read_metrics

# Two stages on 8x8 images: stem 2 -> 4x4, then 2x2.
TINY = dict(depths=(2, 1), dims=(8, 16), stem_size=2)
LOGICAL_NAMES = {"conv_height", "conv_width", "channels_in", "embed", "mlp", "norm", "classes",
                 None}


def images(batch=2, size=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def abstract(model, x):
  """Boxed parameter shapes (jax.eval_shape: traced, never compiled or allocated)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


def random_params(model, x, seed=1, scale=0.2):
  """Random parameters of the right shapes, filled by NumPy (no init is compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype),
                      nn.meta.unbox(abstract(model, x)))


def init_batch_stats(model, x):
  """`{"batch_stats": ...}` as init makes them (means 0, variances 1), or `{}` without
  BatchNorm; filled by NumPy."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  if "batch_stats" not in variables:
    return {}
  return {"batch_stats": jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, float(path[-1].key == "var"), s.dtype),
      variables["batch_stats"])}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def full_size_count(model):
  return count(abstract(model, jnp.zeros((1, 224, 224, 3))))


def train_steps(model, x, labels, steps=4, lr=1e-2, loss_fn=step_lib.classification_loss):
  """`steps` updates of the loop's own update step; returns (initial params, final params,
  losses)."""
  params = random_params(model, x, scale=0.1)
  tx = optax.adam(lr)
  step = jax.jit(step_lib.make_train_step(model, tx, lambda s: lr, loss_fn=loss_fn))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           **init_batch_stats(model, x)}
  batch = {"image": x, "labels": labels}
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["train/loss"]))
  return params, state["params"], losses


def run_tiny_config(name, workdir, steps=10, arg="runlocal", **model):
  """The family's digits config shrunk to `steps` steps on one device through main."""
  config = _config_module(name).get_config(arg)
  config.input.batch_size = 32
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.total_steps = steps
  config.log_every = 1
  config.ckpt_every = steps
  config.lr = 3e-3
  config.model.update(model)
  config.evals.eval = dict(type="classification", every=steps, split="test", batch_size=128)
  config = ml_collections.ConfigDict(config.to_dict())
  assert main_lib.train_and_evaluate(config, str(workdir)) == {"step": steps,
                                                               "preempted": False}
  records = read_metrics(str(workdir))
  loss = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(loss) == steps and np.all(np.isfinite(loss))
  assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss
  accuracy = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
  assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
  return records


def test_registry_and_decode_variant():
  assert "convnext" in models.names() and models.get("convnext") is convnext
  assert convnext.decode_variant("T") == dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
  assert convnext.decode_variant("XL") == dict(depths=(3, 3, 27, 3),
                                               dims=(256, 512, 1024, 2048))
  for bad in ("H", "t", "", None, "T/4"):
    with pytest.raises(ValueError, match="T, S, B, L, XL"):
      convnext.decode_variant(bad)


def test_parameter_counts_of_the_variants():
  # A ConvNet for the 2020s, Table 1 (ImageNet-1K, 224²): 28.6M, 50.2M, 88.6M, 197.8M, 350.2M.
  paper = {"T": 28.6e6, "S": 50.2e6, "B": 88.6e6, "L": 197.8e6, "XL": 350.2e6}
  for variant, expected in paper.items():
    n = full_size_count(convnext.Model(num_classes=1000, variant=variant))
    assert abs(n - expected) / expected < 0.02, (variant, n)
  assert full_size_count(convnext.Model(num_classes=1000, variant="T")) == 28_589_128


def test_tiny_parameter_count_and_logical_names():
  classes, (d1, d2) = 10, TINY["dims"]
  block = lambda d: 49 * d + d + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + d
  expected = (4 * 3 * d1 + d1 + 2 * d1                        # stem conv, LN
              + 2 * block(d1)
              + 2 * d1 + (4 * d1 * d2 + d2)                  # downsampling LN, 2x2 conv
              + block(d2) + 2 * d2 + d2 * classes + classes)  # head LN, head
  params = abstract(convnext.Model(num_classes=classes, **TINY), images())
  assert count(params) == expected
  names = {n for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
           for n in leaf.names}
  assert names <= LOGICAL_NAMES, names
  assert params["stage_0_block_0"]["dwconv"]["kernel"].value.shape == (7, 7, 1, d1)
  np.testing.assert_array_equal(
      jax.jit(lambda: nn.meta.unbox(convnext.Model(num_classes=classes, **TINY).init(
          jax.random.key(0), images())["params"]["stage_0_block_0"]["gamma"]))(),
      np.full(d1, 1e-6, np.float32))


def test_block_matches_its_formula_and_drop_path():
  x = images(batch=4, size=4)[..., :3]
  block = convnext.Block(kernel_size=3, drop_path=0.5)
  params = random_params(block, x)
  out = np.asarray(block.apply({"params": params}, x), np.float64)
  # Reference in float64: depthwise 3x3 (same padding), LN over channels, MLP with exact GELU.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = np.asarray(x, np.float64)
  padded = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = p["dwconv"]["kernel"][:, :, 0]
  y = sum(padded[:, i:i + 4, j:j + 4] * k[i, j] for i in range(3) for j in range(3))
  y = y + p["dwconv"]["bias"]
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  y = (y - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  h = y @ p["pwconv1"]["kernel"] + p["pwconv1"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  y = (h @ p["pwconv2"]["kernel"] + p["pwconv2"]["bias"]) * p["gamma"]
  np.testing.assert_allclose(out, xs + y, rtol=1e-4, atol=1e-4)
  # Stochastic depth drops whole examples' branches (kept ones scaled by 2) in training only.
  train = np.asarray(block.apply({"params": params}, x, False,
                                 rngs={"dropout": jax.random.key(3)}), np.float64)
  dropped = []
  for row, ref in zip((train - xs).reshape(4, -1), y.reshape(4, -1)):
    dropped.append(bool(np.allclose(row, 0)))
    assert dropped[-1] or np.allclose(row, 2 * ref, rtol=1e-4, atol=1e-4)
  assert 0 < sum(dropped) < 4, dropped  # this key drops some examples and keeps others


def test_forward_features_and_examples_independent():
  model = convnext.Model(num_classes=5, **TINY)
  x = images(batch=3)
  params = random_params(model, x)
  apply = jax.jit(lambda m, p, x: m.apply({"params": p}, x), static_argnums=0)
  logits = apply(model, params, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(apply(model, params, x[1:2]), logits[1:2], rtol=1e-5, atol=1e-5)
  features = apply(convnext.Model(num_classes=0, **TINY),
                   {k: v for k, v in params.items() if k != "head"}, x)
  assert features.shape == (3, 16)
  np.testing.assert_allclose(features @ params["head"]["kernel"] + params["head"]["bias"],
                             logits, rtol=1e-4, atol=1e-4)
  bf16 = apply(convnext.Model(num_classes=5, dtype=jnp.bfloat16, **TINY), params, x)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, logits, rtol=0.1, atol=0.1)


def test_training_steps_change_params_and_lower_loss():
  x = images(batch=4)
  model = convnext.Model(num_classes=3, drop_path_rate=0.1, layer_scale_init=0.1, **TINY)
  before, after, losses = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_bad_arguments():
  x = images()
  with pytest.raises(ValueError, match="divisible by 4"):
    abstract(convnext.Model(num_classes=2, **TINY), images(size=6))
  with pytest.raises(ValueError, match="variant or explicit depths"):
    abstract(convnext.Model(num_classes=2, dims=(8,)), x)
  with pytest.raises(ValueError, match="equally long"):
    abstract(convnext.Model(num_classes=2, depths=(1, 1), dims=(8,)), x)
  with pytest.raises(ValueError, match="drop_path_rate"):
    abstract(convnext.Model(num_classes=2, drop_path_rate=1.0, **TINY), x)
  with pytest.raises(ValueError, match="stem_size"):
    abstract(convnext.Model(num_classes=2, **dict(TINY, stem_size=0)), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(convnext.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="unknown ConvNeXt variant"):
    abstract(convnext.Model(num_classes=2, variant="Q"), x)
  explicit = convnext.Model(num_classes=2, variant="B", depths=(1, 1, 1, 1))
  assert (explicit.depths, explicit.dims) == ((1, 1, 1, 1), (128, 256, 512, 1024))


def test_every_config_builds():
  for name, arg in (("convnext_digits", None), ("convnext_digits", "runlocal"),
                    ("convnext_i1k", None), ("convnext_i1k", "variant=L"),
                    ("convnext_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  config = _config_module("convnext_i1k").get_config(None)
  assert config.model.variant == "T" and config.model.drop_path_rate == 0.1
  model = convnext.Model(**dict(config.model.to_dict(), dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 28.6e6) / 28.6e6 < 0.02
  digits = _config_module("convnext_digits").get_config(None)
  model = convnext.Model(num_classes=10, **dict(digits.model.to_dict(), dtype=jnp.float32))
  assert abstract(model, jnp.zeros((1, 16, 16, 1)))["head"]["kernel"].value.shape == (128, 10)
  with pytest.raises(ValueError, match="T, S, B, L, XL"):
    _config_module("convnext_i1k").get_config("variant=H")
  with pytest.raises(ValueError, match="unknown config arg"):
    _config_module("convnext_digits").get_config("attention=softmax")


def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("convnext_digits", tmp_path, depths=(1, 1, 1), dims=(16, 32, 32))
