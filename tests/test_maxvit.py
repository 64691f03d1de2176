"""MaxViT model family: variants, parameter counts, forward, ops by name, training, configs."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import maxvit
from big_attn.train import config_lib
from tests.test_train import _config_module, read_metrics

# Two stages on 16x16 images: stem 8x8, stages 4x4 and 2x2, 2x2 windows and grid.
TINY = dict(embed_dims=(16, 32), depths=(1, 1), stem_width=8, head_hidden=24, head_dim=8,
            partition_size=2)
# One stage on 8x8 images: stem 4x4, stage 2x2 (one window, one grid group).
IMAGENET = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
ONE_STAGE = dict(embed_dims=(16,), depths=(1,), stem_width=8, head_dim=8, partition_size=2)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "conv_height",
                 "conv_width", "channels_in", "classes", None}


def _images(batch=2, size=16, seed=0):
  """NumPy inputs (eager JAX ops would each compile a kernel)."""
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _abstract(model, images):
  """Boxed parameter shapes (jax.eval_shape: traced, never compiled or allocated)."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


def _init(model, images, seed=1):
  """Random NumPy parameters of the right shapes (no init is compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                      nn.meta.unbox(_abstract(model, images)))


def _batch_stats(model, images, params=None):
  """`{"batch_stats": ...}`: as init makes them (means 0, variances 1), or with `params` the
  statistics of `images` (one training-mode pass with momentum 0)."""
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["batch_stats"]
  stats = {"batch_stats": jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, float(path[-1].key == "var"), s.dtype), abstract)}
  if params is None:
    return stats
  _, updates = jax.jit(lambda p, x: model.clone(batch_norm_momentum=0.0).apply(
      {"params": p, **stats}, x, train=True, mutable=["batch_stats"]))(params, images)
  return jax.device_get(updates)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def _expected_count(dims, depths, stem, head_hidden, classes, partition, head_dim=32):
  """The parameter count of MaxViT written out from the paper's layers (timm's shapes)."""
  n = 27 * stem + stem + 2 * stem + 9 * stem * stem + stem         # conv, norm, conv
  c_in = stem
  for c, depth in zip(dims, depths):
    for _ in range(depth):
      m, r = 4 * c, c // 4
      n += 2 * c_in + (c_in * c + c if c_in != c else 0)          # pre-norm, shortcut 1x1
      n += c_in * m + 2 * m + 9 * m + 2 * m                         # expand, norm, dw, norm
      n += (m * r + r) + (r * m + m) + (m * c + c)                  # SE, projection
      attn = 4 * c + 4 * (c * c + c) + (c // head_dim) * (2 * partition - 1) ** 2
      n += 2 * (attn + (c * 4 * c + 4 * c) + (4 * c * c + c))      # block, grid + MLPs
      c_in = c
  n += 2 * c_in
  if head_hidden:
    n += c_in * head_hidden + head_hidden
    c_in = head_hidden
  return n + c_in * classes + classes


def test_registry_and_decode_variant():
  assert "maxvit" in models.names() and models.get("maxvit") is maxvit
  assert maxvit.decode_variant("T") == dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 5, 2),
                                            stem_width=64, head_hidden=512)
  assert maxvit.decode_variant("L")["stem_width"] == 128
  for bad in ("XL", "t", "T/16", "", None):
    with pytest.raises(ValueError, match="T, S, B, L"):
      maxvit.decode_variant(bad)


def test_parameter_counts_of_the_variants():
  # MaxViT (Tu et al. 2022), ImageNet-1K table: T/S/B/L have 31M/69M/120M/212M parameters;
  # timm's ports of the authors' weights (maxvit_*_tf_224) 30.9M/68.9M/119.5M/211.8M.
  for variant, reported in (("T", 30.9e6), ("S", 68.9e6), ("B", 119.5e6), ("L", 211.8e6)):
    count = _count(_abstract(maxvit.Model(num_classes=1000, variant=variant), IMAGENET))
    assert abs(count - reported) / reported < 0.02, (variant, count)
    if variant == "T":
      assert count == _expected_count((64, 128, 256, 512), (2, 2, 5, 2), 64, 512, 1000, 7)


def test_tiny_parameter_count_and_logical_names():
  x = _images()
  boxed = _abstract(maxvit.Model(num_classes=10, **TINY), x)
  assert _count(boxed) == _expected_count((16, 32), (1, 1), 8, 24, 10, 2, head_dim=8)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim, leaf.names
  block = boxed["stage_0_block_0"]
  for kind in ("block_attention", "grid_attention"):
    rpb = block[kind]["MultiHeadAttention"]["op_params"]["rpb"]
    assert rpb.value.shape == (2, 3, 3) and rpb.names == ("heads", None, None)
  no_head = _abstract(maxvit.Model(num_classes=10, **dict(TINY, head_hidden=0)), x)
  assert "pre_logits" not in no_head and no_head["head"]["kernel"].value.shape == (32, 10)


def test_forward_and_the_ops_get_each_stage_grid_and_partition():
  x = _images(size=8)
  model = maxvit.Model(num_classes=10, head_zeroinit=False, **ONE_STAGE)
  params = _init(model, x)
  stats = _batch_stats(model, x, params)
  run = jax.jit(lambda p, images: model.apply({"params": p, **stats}, images))
  logits = run(params, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.abs(logits).max() > 0
  # Examples never interact (no batch statistics).
  other = x.copy()
  other[0] = _images(batch=1, size=8, seed=3)[0]
  np.testing.assert_array_equal(run(params, other)[1], logits[1])
  # The model hands the stage's feature map and the partition size to the ops: with the
  # relative position biases zeroed, window and grid attention over the one 2x2 partition of
  # a 2x2 map are full attention, so the model equals its twin with softmax in both places.
  zero_bias = jax.tree.map(lambda v: v, params)
  dense_params = jax.tree.map(lambda v: v, params)
  for kind in ("block_attention", "grid_attention"):
    zero_bias["stage_0_block_0"][kind]["MultiHeadAttention"]["op_params"] = {
        "rpb": np.zeros((2, 3, 3), np.float32)}
    del dense_params["stage_0_block_0"][kind]["MultiHeadAttention"]["op_params"]
  dense = maxvit.Model(num_classes=10, block_attention="softmax", grid_attention="softmax",
                       **ONE_STAGE)
  assert jax.tree.structure(dense_params) == jax.tree.structure(
      nn.meta.unbox(_abstract(dense, x)))
  out = run(zero_bias, x)
  np.testing.assert_allclose(out, jax.jit(lambda p: dense.apply({"params": p, **stats}, x))(
      dense_params),
                             rtol=1e-5, atol=1e-5)
  assert np.abs(out - logits).max() > 1e-4  # the (random) biases reach the ops


def test_stochastic_depth():
  # Rates rise linearly from 0 at the first block to drop_path at the last, as in timm.
  np.testing.assert_allclose(np.concatenate(maxvit.drop_path_rates((3, 1), 0.3)),
                             [0.0, 0.1, 0.2, 0.3])
  assert maxvit.drop_path_rates((1,), 0.3) == [[0.0]]
  y = np.random.default_rng(0).normal(size=(4, 2, 2, 16)).astype(np.float32)
  block = maxvit.PartitionAttention(num_heads=2, op="window", drop_path=0.5,
                                    op_args=dict(grid=(2, 2), window_size=2))
  params = _init(block, y)
  run = jax.jit(lambda rng, deterministic: block.apply(  # pylint: disable=g-long-lambda
      {"params": params}, y, deterministic, rngs={"dropout": rng}), static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(0), True), run(jax.random.key(1), True))
  dropped = np.stack([run(jax.random.key(i), False) for i in range(6)])
  assert np.abs(dropped - dropped[0]).max() > 1e-4
  # A branch is dropped for a whole example or kept (and scaled by 2): per example, every
  # output is one of four combinations of the attention and MLP branches.
  assert all(len({tuple(np.round(d[b].ravel(), 4)) for d in dropped}) <= 4 for b in range(4))


def test_training_step_changes_params():
  x = _images(batch=4, size=8)
  labels = np.eye(3, dtype=np.float32)[np.arange(4) % 3]
  model = maxvit.Model(num_classes=3, **ONE_STAGE)
  params = _init(model, x)
  stats = _batch_stats(model, x)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p: optax.softmax_cross_entropy(
      model.apply({"params": p, **stats}, x, train=True, mutable=["batch_stats"])[0],
      labels).mean()))
  loss, grads = value_and_grad(params)
  assert np.isfinite(loss)
  new = jax.tree.map(lambda p, g: p - 0.05 * np.asarray(g), params, grads)  # one SGD step
  changed = {jax.tree_util.keystr(path): bool(np.any(a != b)) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new))}
  # The key bias adds q·b_k to a whole row of logits: softmax ignores it, its gradient is 0.
  key_bias = {k for k in changed if k.endswith("['key']['bias']")}
  # So is a bias that a training-mode BatchNorm's batch mean removes: the stem conv's, and the
  # pre-norm's (the 1x1 expansion after it has no bias, BatchNorm follows).
  key_bias |= {"['stem_conv_0']['bias']", "['stage_0_block_0']['MBConv']['pre_norm']['bias']"}
  assert len(key_bias) == 4 and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(v for k, v in changed.items() if k not in key_bias), changed
  assert value_and_grad(new)[0] < loss


def test_remat_bf16_and_shapes_without_compiling():
  x = _images()
  small = _images(size=8)
  remat = maxvit.Model(num_classes=0, remat_policy="nothing_saveable", **ONE_STAGE)
  params = nn.meta.unbox(_abstract(remat, small))
  stats = _batch_stats(remat, small)
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(remat.apply({"params": p, **stats}, small) ** 2)))(params))
  assert sum(len(re.findall(p, jaxpr)) for p in (r"\bremat2?\[", r"\bcheckpoint\[")) == 1
  bf16 = maxvit.Model(num_classes=5, dtype=jnp.bfloat16, **TINY)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.meta.unbox(_abstract(bf16, x))))
  out = jax.eval_shape(lambda x: bf16.init_with_output(jax.random.key(0), x)[0], x)
  assert out.shape == (2, 5) and out.dtype == jnp.float32
  # Odd sizes work where the partition divides every stage: 224 -> 56, 28, 14, 7 as the paper.
  big = maxvit.Model(num_classes=0, embed_dims=(32, 32, 32, 32), depths=(1, 1, 1, 1))
  assert jax.eval_shape(lambda x: big.init_with_output(jax.random.key(0), x)[0],
                        IMAGENET).shape == (1, 32)


def test_bad_arguments():
  x = _images()

  def model(**overrides):
    return maxvit.Model(num_classes=2, **{**TINY, **overrides})

  for sizes, match in ((dict(variant="M"), "T, S, B, L"), ({}, "embed_dims, depths")):
    with pytest.raises(ValueError, match=match):  # when the model is built
      maxvit.Model(num_classes=2, **sizes)
  cases = [
      (model(depths=(1,)), x, ValueError, "equal length"),
      (model(embed_dims=(12, 32)), x, ValueError, "multiples of head_dim"),
      (model(head_dim=0), x, ValueError, "multiples of head_dim"),
      (model(), _images(size=12), ValueError, r"must divide every stage.*\(3, 3\)"),
      (model(partition_size=(2, 0)), x, ValueError, "partition_size"),
      (model(block_attention_args={"window_size": 4}), x, ValueError, "may not set"),
      (model(grid_attention_args=[1]), x, TypeError, "grid_attention_args must be a dict"),
      (model(grid_attention="no_such_op"), x, KeyError, "no_such_op"),
      (model(remat_policy="some"), x, ValueError, "remat_policy"),
      (model(drop_path=1.0), x, ValueError, "drop_path"),
      (model(head_hidden=-1), x, ValueError, "head_hidden"),
      (model(stem_width=0), x, ValueError, "stem_width"),
      (model(), x[0], ValueError, "images must be"),
  ]
  for bad, images, error, match in cases:
    with pytest.raises(error, match=match):
      _abstract(bad, images)
  explicit = maxvit.Model(num_classes=2, variant="T", depths=(1, 1, 1, 1), head_hidden=0)
  assert (explicit.embed_dims, explicit.depths, explicit.stem_width, explicit.head_hidden) == (
      (64, 128, 256, 512), (1, 1, 1, 1), 64, 0)


def test_every_config_builds():
  for name, arg in (("maxvit_digits", None), ("maxvit_digits", "runlocal"),
                    ("maxvit_i1k", None), ("maxvit_i1k", "variant=L,remat=dots_saveable"),
                    ("maxvit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  config = _config_module("maxvit_i1k").get_config(None)
  assert config.model.variant == "T" and config.model.drop_path == 0.2
  model = maxvit.Model(**dict(config.model.to_dict(), dtype=jnp.bfloat16))
  count = _count(_abstract(model, IMAGENET))
  assert abs(count - 30.9e6) / 30.9e6 < 0.02
  with pytest.raises(ValueError, match="T, S, B, L"):
    _config_module("maxvit_i1k").get_config("variant=H")
  with pytest.raises(ValueError, match="unknown config arg"):
    _config_module("maxvit_digits").get_config("attention=window")


@pytest.mark.slow
def test_tiny_config_trains_through_main(tmp_path):
  """configs/maxvit_digits.py shrunk to one stage on 8x8 digits, 10 steps on one device."""
  config = _config_module("maxvit_digits").get_config("runlocal")
  config.input.image_size = 8
  config.input.batch_size = 32
  config.input.augment = dict(crop_padding=1, flip=False)
  config.model = dict(config.model.to_dict(), **ONE_STAGE, head_hidden=16, head_zeroinit=False)
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.total_steps = 10
  config.log_every = 1
  config.ckpt_every = 10
  config.lr = 1e-2
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  result = main_lib.train_and_evaluate(config, str(tmp_path))
  assert result == {"step": 10, "preempted": False}
  records = read_metrics(str(tmp_path))
  loss = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(loss) == 10 and np.all(np.isfinite(loss))
  assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.1, loss
