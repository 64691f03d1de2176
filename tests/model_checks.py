"""Checks that several model test files share: the token grids a model's ViT blocks pass their
2-D op, a layer in evaluation mode against a float64 reference, a training step, configs that
build, and a digits config trained for a few steps through `big_attn.main`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_attn import main as main_lib
from big_attn.models import vit
from big_attn.train import config_lib
from tests import reference as ref
from tests.test_convnext import abstract, random_params, train_steps
from tests.test_train import _config_module, losses


def encoder_grids(model, x):
  """(token shape, op grid) that each ViT block of `model` passes its 2-D op, in call order
  (traced by `jax.eval_shape`)."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Encoder1DBlock) and context.method_name == "__call__":
      seen.append((args[0].shape[1:], dict(context.module.attention_args)["grid"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    abstract(model, x)
  return seen


def train_digits_config(workdir, name, steps=3, arg="runlocal"):
  """`configs/{name}.py:{arg}` for `steps` steps of batch 16 on one device through main,
  without evaluation: finite losses logged at every step."""
  config = _config_module(name).get_config(arg)
  config.input.batch_size = 16
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.total_steps, config.log_every, config.ckpt_every = steps, 1, steps
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  assert main_lib.train_and_evaluate(config, str(workdir)) == {"step": steps,
                                                               "preempted": False}
  loss = losses(str(workdir))
  assert sorted(loss) == list(range(1, steps + 1)) and np.all(np.isfinite(list(loss.values())))


def checked_configs(cases):
  """`(name, arg, config)` of `configs/{name}.py:{arg}` for each `(name, arg)` of `cases`, each
  passing main's check, with base_config's keys and its path in the module docstring."""
  for name, arg in cases:
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
    yield name, arg, config


class OnGrid(nn.Module):
  """`layer(x, grid)` as a module of one argument."""
  layer: nn.Module
  grid: tuple[int, int]

  def __call__(self, x):
    return self.layer(x, self.grid)


def random_batch_stats(module, x, seed=3):
  """`module`'s running BatchNorm statistics filled by NumPy (means N(0, 0.3²), variances in
  [0.5, 1.5]); `{}` without BatchNorm."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x)).get("batch_stats", {})
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                                  else rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def assert_matches_in_eval(module, x, ref_fn, tol, scale=0.2):
  """`module` in evaluation mode (random parameters of std `scale`, random running statistics)
  against the float64 `ref_fn(x, params, batch_stats)`, forward and gradient wrt the input and
  every parameter. Returns the parameters."""
  params = random_params(module, x, scale=scale)
  stats = random_batch_stats(module, x)
  leaves, tree = jax.tree.flatten(params)
  ref.assert_matches(
      lambda x, *leaves: module.apply({"params": jax.tree.unflatten(tree, leaves),
                                       "batch_stats": stats}, x),
      lambda x, *leaves: ref_fn(x, jax.tree.unflatten(tree, leaves),
                                jax.tree.map(lambda s: jnp.asarray(s, jnp.float64), stats)),
      [x, *leaves], tol=tol)
  return params


def check_training_step(model, x):
  """Two update steps of `model` on `x` (3 classes): finite, falling losses, every parameter
  changed."""
  labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % 3, 3)
  before, after, losses = train_steps(model, x, labels, steps=2)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed
