"""MetaFormer family: mixer registry, every mixer's forward and train step, per-stage mixers,
PoolFormer parameter counts, the tiny config through `big_attn.main`, configs and bad arguments.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import metaformer
from big_attn.train import config_lib
from tests import reference as ref
from tests.test_train import _config_module, losses

# Two stages on 16x16 images: 4x4 then 2x2 tokens.
TINY = dict(depths=(1, 1), dims=(8, 16), layer_scale_init=1.0, head_zeroinit=False,
            mixer_args=dict(attention=dict(head_dim=8)))
MIXERS = ("attention", "conv", "hyena", "identity", "mlp_mixer", "pool", "shift")


def _count(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


def _init(model, x, seed=1):
  """Boxed parameter shapes and random parameters of those shapes filled by NumPy (fast: no
  init is compiled)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                        nn.unbox(boxed))
  return boxed, params


def _mixer(name, x, **args):
  """A mixer alone, initialised and applied to `x` in one jit."""
  module = metaformer.get_mixer(name)(**args)

  @jax.jit
  def run(x):
    variables = module.init(jax.random.key(0), x)
    return variables, module.apply(variables, x)

  return run(x)


def test_registries():
  assert "metaformer" in models.names() and models.get("metaformer") is metaformer
  assert set(MIXERS) <= set(metaformer.mixer_names())
  with pytest.raises(KeyError, match=", ".join(metaformer.mixer_names())):
    metaformer.get_mixer("no_such_mixer")
  with pytest.raises(ValueError, match="already registered"):
    metaformer.register_mixer("pool")(metaformer.IdentityMixer)
  with pytest.raises(TypeError, match="non-empty string"):
    metaformer.register_mixer("")


def test_decode_variant():
  assert metaformer.decode_variant("S12") == dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512),
                                                  mlp_ratio=4.0)
  assert metaformer.decode_variant("M48")["dims"] == (96, 192, 384, 768)
  for bad in ("S13", "s12", "", None):
    with pytest.raises(ValueError, match="S12, S24, S36, M36, M48"):
      metaformer.decode_variant(bad)


def test_poolformer_parameter_counts():
  # MetaFormer Is Actually What You Need for Vision, Table 1: PoolFormer-S12/S24/S36/M36/M48.
  paper = {"S12": 11.9e6, "S24": 21.4e6, "S36": 30.9e6, "M36": 56.1e6, "M48": 73.4e6}
  for variant, want in paper.items():
    got = _count(metaformer.Model(num_classes=1000, variant=variant), 224)
    assert abs(got - want) / want < 0.02, (variant, got)


def test_pool_shift_identity_mixers_by_formula():
  x = np.asarray(ref.normal(0, (2, 3, 4, 24)))
  _, pool = _mixer("pool", jnp.asarray(x))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  counts = np.pad(np.ones((3, 4)), 1)
  want = np.zeros_like(x)
  for i in range(3):
    for j in range(4):
      want[:, i, j] = padded[:, i:i + 3, j:j + 3].sum((1, 2)) / counts[i:i + 3, j:j + 3].sum()
  np.testing.assert_allclose(pool, want - x, rtol=1e-5, atol=1e-6)
  _, same = _mixer("identity", jnp.asarray(x))
  np.testing.assert_array_equal(same, x)
  _, shifted = _mixer("shift", jnp.asarray(x))  # 24 channels: groups of 2
  shifted = np.asarray(shifted)
  np.testing.assert_array_equal(shifted[:, :, :3, 0:2], x[:, :, 1:, 0:2])   # left
  np.testing.assert_array_equal(shifted[:, :, 3, 0:2], 0.0)
  np.testing.assert_array_equal(shifted[:, :, 1:, 2:4], x[:, :, :3, 2:4])   # right
  np.testing.assert_array_equal(shifted[:, :2, :, 4:6], x[:, 1:, :, 4:6])   # up
  np.testing.assert_array_equal(shifted[:, 1:, :, 6:8], x[:, :2, :, 6:8])   # down
  np.testing.assert_array_equal(shifted[:, 0, :, 6:8], 0.0)
  np.testing.assert_array_equal(shifted[..., 8:], x[..., 8:])


def test_learned_mixers_shapes():
  x = jax.ShapeDtypeStruct((2, 3, 4, 8), jnp.float32)

  def shapes(name, **args):
    module = metaformer.get_mixer(name)(**args)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    assert jax.eval_shape(module.apply, variables, x).shape == x.shape
    return nn.unbox(variables)["params"]

  assert shapes("mlp_mixer", token_mlp_ratio=0.5)["token_0"]["kernel"].shape == (12, 6)
  params = shapes("conv", kernel_size=3)
  assert set(params) == {"pwconv1", "dwconv", "pwconv2", "star_scale", "star_bias"}
  assert params["dwconv"]["kernel"].shape == (3, 3, 1, 16)
  assert shapes("conv", separable=False)["dwconv"]["kernel"].shape == (7, 7, 1, 8)
  assert set(shapes("hyena")["hyena"]["hyena"]) == {"query", "key", "value", "out", "op_params"}
  # An op taking `grid` gets the stage's (h, w): window attention in windows of 1x2 tokens.
  params = shapes("attention", op="window", op_args=dict(window_size=(1, 2)), head_dim=4)
  assert params["attention"]["op_params"]["rpb"].shape == (2, 1, 3)


def test_every_mixer_forward_and_train_step():
  # One model with a stage per mixer (one compile): 32x32 images give 8x8 tokens in the first
  # stage, then 4x4, 2x2 and 1x1.
  x = ref.normal(0, (2, 32, 32, 3))
  labels = jax.nn.one_hot(jnp.arange(2) % 3, 3)
  order = ("hyena", "attention", "pool", "conv", "shift", "mlp_mixer", "identity")
  assert sorted(order) == sorted(MIXERS)
  model = metaformer.Model(num_classes=3, mixers=order, drop_path=0.1,
                           **dict(TINY, depths=(1,) * 7, dims=(8,) * 7))
  boxed, params = _init(model, x)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) and len(v.names) == v.value.ndim
             for v in leaves)
  for stage, mixer in enumerate(order):
    assert ("mixer" in params[f"stage_{stage}_block_0"]) == (
        mixer not in ("identity", "shift", "pool")), mixer
  assert "hyena" in params["stage_0_block_0"]["mixer"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
      return optax.softmax_cross_entropy(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  new, _, loss = step(params, tx.init(params))
  assert np.isfinite(loss)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
  assert all(jax.tree.leaves(changed)), changed


def test_per_stage_mixers_caformer_layout():
  x = ref.normal(0, (2, 32, 32, 3))
  model = metaformer.Model(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                           mixers=("conv", "conv", "attention", "attention"),
                           attention="sigmoid", mixer_args=dict(attention=dict(head_dim=8)))
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x)))["params"]
  assert "pwconv1" in shapes["stage_1_block_0"]["mixer"]
  assert "attention" in shapes["stage_2_block_0"]["mixer"]
  assert shapes["stage_3_block_0"]["layer_scale1"].shape == (16,)
  assert shapes["norm"]["scale"].shape == (16,) and "head" not in shapes
  assert jax.eval_shape(lambda p: model.apply({"params": p}, x), shapes).shape == (2, 16)


def test_drop_path_in_train_only():
  x = ref.normal(0, (2, 8, 8, 3))
  model = metaformer.Model(num_classes=3, depths=(2,), dims=(8,), mixers="identity",
                           drop_path=0.5)
  _, params = _init(model, x)
  apply = jax.jit(lambda key, train: model.apply({"params": params}, x, train=train,
                                                 rngs={"dropout": key}), static_argnums=1)
  a, b = jax.random.split(jax.random.key(0))
  np.testing.assert_array_equal(apply(a, False), apply(b, False))
  assert np.abs(apply(a, True) - apply(b, True)).max() > 1e-6


def test_bad_arguments():
  x = ref.normal(0, (1, 16, 16, 3))

  def build(**kwargs):
    model = metaformer.Model(num_classes=2, **dict(TINY, **kwargs))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))

  with pytest.raises(ValueError, match="known mixers: " + ", ".join(metaformer.mixer_names())):
    build(mixers="avgpool")
  with pytest.raises(ValueError, match="one per stage"):
    build(mixers=("pool", "pool", "pool"))
  with pytest.raises(ValueError, match="unknown token mixer 'pooling'"):
    build(mixer_args=dict(pooling=dict(pool_size=3)))
  with pytest.raises(TypeError, match="mixer_args"):
    build(mixer_args=dict(pool=3))
  with pytest.raises(ValueError, match="equally long"):
    build(dims=(8, 16, 32))
  with pytest.raises(ValueError, match="needs a variant"):
    metaformer.Model(num_classes=2)
  with pytest.raises(ValueError, match="drop_path"):
    build(drop_path=1.0)
  with pytest.raises(ValueError, match="images must be"):
    metaformer.Model(num_classes=2, **TINY).init(jax.random.key(0), x[0])
  with pytest.raises(ValueError, match="pool_size"):
    build(mixer_args=dict(pool=dict(pool_size=2)))
  with pytest.raises(ValueError, match="divisible by head_dim"):
    build(mixers="attention", mixer_args=dict(attention=dict(head_dim=5)))
  with pytest.raises(KeyError, match="unknown attention op"):
    build(mixers="attention", attention="no_such_op", mixer_args=dict(attention=dict(head_dim=8)))
  with pytest.raises(TypeError, match="unexpected keyword"):
    build(mixer_args=dict(pool=dict(size=3)))


def test_every_config_builds():
  digits = _config_module("metaformer_digits")
  i1k = _config_module("poolformer_i1k")
  for name, module, arg in (("metaformer_digits", digits, None),
                            ("poolformer_i1k", i1k, "variant=M48")):
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  for arg in ("", "runlocal", "mixer=hyena",
              "mixer=conv+conv+attention+attention,attention=sigmoid"):
    config = digits.get_config(arg)
    model = metaformer.Model(num_classes=10, **config.model.to_dict())
    assert _count(model, config.input.image_size) > 0
  config = i1k.get_config("variant=S24")
  assert config.model.variant == "S24" and config.model.drop_path == 0.1
  assert metaformer.Model(**config.model.to_dict()).depths == (4, 4, 12, 4)
  local = i1k.get_config("runlocal")
  assert _count(metaformer.Model(**local.model.to_dict()), 32) > 0
  for module, bad in ((digits, "mixer=pool+conv"), (i1k, "variant=S13"), (i1k, "foo=1")):
    with pytest.raises(ValueError):
      module.get_config(bad)


def test_tiny_config_trains_through_main(tmp_path):
  config = _config_module("metaformer_digits").get_config("runlocal")
  config.input.image_size = 16
  config.input.batch_size = 16
  config.model = dict(depths=(1, 1), dims=(8, 16), mixers="pool", layer_scale_init=1.0,
                      head_zeroinit=False, dtype="float32")
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.lr = 3e-3
  config.total_steps = 10
  config.log_every = 1
  config.ckpt_every = 10
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  result = main_lib.train_and_evaluate(config, str(tmp_path))
  assert result == {"step": 10, "preempted": False}
  loss = losses(str(tmp_path))
  assert sorted(loss) == list(range(1, 11)) and all(np.isfinite(list(loss.values())))
  assert np.mean([loss[s] for s in (8, 9, 10)]) < np.mean([loss[s] for s in (1, 2, 3)])
