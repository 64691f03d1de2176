"""Checks that several model test files share: the token grids a model's ViT blocks pass their
2-D op, configs that build, and a digits config trained for a few steps through
`big_attn.main`."""
import flax.linen as nn
import ml_collections
import numpy as np

from big_attn import main as main_lib
from big_attn.models import vit
from big_attn.train import config_lib
from tests.test_convnext import abstract
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
