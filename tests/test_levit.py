"""LeViT model family: variants and parameter counts (and timm's layer shapes), its attention,
shrinking attention and MLP against float64 references of the paper's formulas, the stages'
grids, the distillation head, ops by name, a training step, bad arguments, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import models
from big_attn.models import levit
from big_attn.ops import spatial
from tests import reference as ref
from tests.model_checks import (OnGrid, assert_matches_in_eval, check_training_step,
                                checked_configs, random_batch_stats, train_digits_config)
from tests.test_convnext import abstract, count, full_size_count, random_params
from tests.test_train import _config_module

# 8x8 images, 2x2 stem: a 4x4 map, shrunk to 2x2 and 1x1.
TINY = dict(widths=(8, 12, 16), key_dim=4, num_heads=(2, 3, 2), depths=(1, 1, 1), patch_size=2)
PAPER = {"128S": 7.8e6, "128": 9.2e6, "192": 11.0e6, "256": 18.9e6, "384": 39.1e6}
TOL = dict(rtol=2e-4, atol=2e-4)
EPS = 1e-5


def test_registry_and_decode_variant():
  assert "levit" in models.names() and models.get("levit") is levit
  assert levit.decode_variant("LeViT-256") == dict(widths=(256, 384, 512), key_dim=32,
                                                   num_heads=(4, 6, 8), depths=(4, 4, 4))
  assert levit.decode_variant("128S") == levit.decode_variant("LeViT-128S")
  with pytest.raises(ValueError, match="128S, 128, 192, 256, 384"):
    levit.decode_variant("512")


def test_parameter_count_of_128s():
  params = abstract(levit.Model(num_classes=1000, variant="128S", distillation=True),
                    jnp.zeros((1, 224, 224, 3)))
  assert count(params) == 7_777_058 and abs(count(params) - 7.8e6) / 7.8e6 < 0.02
  block = params["stage_0_block_0_attention"]
  assert block["qkv"]["linear"]["kernel"].value.shape == (128, 4 * (16 + 16 + 32))
  assert block["op_params"]["attention_bias"].value.shape == (4, 14, 14)
  shrink = params["shrink_1"]  # 128 / 16 = 8 heads, values 4 x 16 wide, keys on 14x14
  assert shrink["kv"]["linear"]["kernel"].value.shape == (128, 8 * (16 + 64))
  assert shrink["attention_bias"].value.shape == (8, 14, 14)
  assert params["stage_2_block_3_mlp"]["expand"]["linear"]["kernel"].value.shape == (384, 768)


@pytest.mark.extended
@pytest.mark.parametrize("variant", ["128", "192", "256", "384"])
def test_parameter_count_matches_the_paper(variant):
  n = full_size_count(levit.Model(num_classes=1000, variant=variant, distillation=True))
  assert abs(n - PAPER[variant]) / PAPER[variant] < 0.02, (variant, n)


def _shapes(tree):
  """Sorted multiset of parameter shapes, each with its dimensions sorted (so PyTorch's
  `[out, in, kh, kw]` and Flax's `[kh, kw, in, out]` agree); a `[heads, h, w]` bias table as
  timm's `[heads, h·w]`."""
  shapes = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(leaf.shape)
    if "attention_bias" in jax.tree_util.keystr(path) and len(shape) == 3:
      shape = (shape[0], shape[1] * shape[2])
    shapes.append(tuple(sorted(shape)))
  return sorted(shapes)


@pytest.mark.extended
@pytest.mark.parametrize("variant", ["128S", "384"])
def test_layer_shapes_are_timms(variant):
  """timm's `levit_*` (the authors' code, with the distillation head), where timm is
  installed: the same parameter shapes, layer for layer."""
  timm = pytest.importorskip("timm")
  torch_model = timm.create_model(f"levit_{variant.lower()}", pretrained=False)
  theirs = _shapes({name: p.detach().numpy() for name, p in torch_model.named_parameters()})
  ours = _shapes(nn.meta.unbox(abstract(
      levit.Model(num_classes=1000, variant=variant, distillation=True),
      jnp.zeros((1, 224, 224, 3)))))
  assert ours == theirs


def _bn(y, p, stats):
  return (y - stats["mean"]) / jnp.sqrt(stats["var"] + EPS) * p["scale"] + p["bias"]


def _linear_bn(x, p, stats):
  return _bn(x @ p["linear"]["kernel"], p["norm"], stats["norm"])


def _bias_offsets(grid, stride):
  """|y_q − y_k|, |x_q − x_k| for queries at every `stride`-th row and column."""
  h, w = grid
  q = [(y, x) for y in range(0, h, stride) for x in range(0, w, stride)]
  k = [(y, x) for y in range(h) for x in range(w)]
  return (np.array([[abs(a[0] - c[0]) for c in k] for a in q]),
          np.array([[abs(a[1] - c[1]) for c in k] for a in q]))


def _ref_attention(x, p, stats, grid, heads, key_dim, value_dim, stride):
  """float64, the paper's formula: per head softmax(q·k/√key_dim + B[|Δy|, |Δx|]) v, queries of
  the map subsampled by `stride`; Hardswish; LinearBN to the output."""
  b, t, c = x.shape
  if stride == 1:
    qkv = _linear_bn(x, p["qkv"], stats["qkv"]).reshape(b, t, heads, -1)
    q, k, v = qkv[..., :key_dim], qkv[..., key_dim:2 * key_dim], qkv[..., 2 * key_dim:]
    table = p["op_params"]["attention_bias"]
  else:
    kv = _linear_bn(x, p["kv"], stats["kv"]).reshape(b, t, heads, -1)
    k, v = kv[..., :key_dim], kv[..., key_dim:]
    sub = x.reshape(b, *grid, c)[:, ::stride, ::stride].reshape(b, -1, c)
    q = _linear_bn(sub, p["query"], stats["query"]).reshape(b, -1, heads, key_dim)
    table = p["attention_bias"]
  dy, dx = _bias_offsets(grid, stride)
  assert v.shape[-1] == value_dim
  out = ref.softmax_attention(q, k, v, bias=table[:, dy, dx][None])
  out = out.reshape(b, -1, heads * value_dim)
  out = out * jnp.clip(out + 3, 0, 6) / 6  # Hardswish
  return _linear_bn(out, p["out"], stats["out"])


@pytest.mark.parametrize("stride,grid", [(1, (3, 2)), (2, (3, 4))])
def test_attention_matches_the_papers_formula(stride, grid):
  heads, key_dim, value_dim = 2, 3, 6 if stride == 1 else 12
  x = ref.normal(5, (2, grid[0] * grid[1], 5))
  layer = OnGrid(levit.LeViTAttention(heads, key_dim, value_dim, features=7, stride=stride),
                 grid)
  params = assert_matches_in_eval(layer, x, lambda x, p, s: _ref_attention(
      x, p["layer"], s["layer"], grid, heads, key_dim, value_dim, stride), TOL)
  table = (params["layer"]["op_params"] if stride == 1 else params["layer"])["attention_bias"]
  assert table.shape == (heads, *grid)


def test_mlp_matches_its_formula():
  x = ref.normal(6, (2, 5, 4))

  def reference(x, p, s):
    y = _linear_bn(x, p["expand"], s["expand"])
    return _linear_bn(y * jnp.clip(y + 3, 0, 6) / 6, p["project"], s["project"])

  assert_matches_in_eval(levit.MLP(hidden=8), x, reference, TOL)


def test_shrink_bias_and_grids():
  table = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  dy, dx = _bias_offsets((3, 4), 2)
  np.testing.assert_array_equal(levit.shrink_bias(table, (3, 4), 2), table[:, dy, dx])
  assert levit.subsampled_grid((7, 4)) == (4, 2)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, levit.LeViTAttention) and context.method_name == "__call__":
      seen.append((context.module.name, args[0].shape[1:], args[1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    abstract(levit.Model(num_classes=3, **TINY), jnp.zeros((1, 8, 8, 3)))
  assert seen == [("stage_0_block_0_attention", (16, 8), (4, 4)), ("shrink_1", (16, 8), (4, 4)),
                  ("stage_1_block_0_attention", (4, 12), (2, 2)), ("shrink_2", (4, 12), (2, 2)),
                  ("stage_2_block_0_attention", (1, 16), (1, 1))]


def test_heads_and_features():
  x = ref.normal(4, (2, 8, 8, 3))
  model = levit.Model(num_classes=3, distillation=True, **TINY)
  params = random_params(model, x)
  stats = random_batch_stats(model, x)
  variables = {"params": params, "batch_stats": stats}
  logits = jax.jit(model.apply)(variables, x)
  features = jax.jit(levit.Model(num_classes=0, **TINY).apply)(
      {"params": {k: v for k, v in params.items() if not k.startswith("head")},
       "batch_stats": {k: v for k, v in stats.items() if not k.startswith("head")}}, x)
  assert features.shape == (2, 16)

  def head(name):
    y = _bn(np.asarray(features, np.float64), params[f"{name}_norm"], stats[f"{name}_norm"])
    return y @ params[name]["kernel"] + params[name]["bias"]

  np.testing.assert_allclose(logits, (head("head") + head("head_dist")) / 2, rtol=1e-5,
                             atol=1e-5)


def test_other_ops_and_refusals():
  x = jnp.zeros((1, 8, 8, 3))
  params = abstract(levit.Model(num_classes=2, attention="softmax", **TINY), x)
  assert "op_params" not in params["stage_0_block_0_attention"]
  op = sorted(spatial.EQUAL_WIDTH_OPS)[0]
  with pytest.raises(spatial.OpRefused, match="needs values as wide"):
    abstract(levit.Model(num_classes=2, attention=op, **TINY), x)


def test_training_step():
  # 8x12 images: a 1x2 map in the last stage, whose bias table learns.
  check_training_step(levit.Model(num_classes=3, **TINY), ref.normal(4, (4, 8, 12, 3)))


def test_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda **kw: abstract(levit.Model(num_classes=2, **dict(TINY, **kw)), x)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    build(patch_size=16)
  with pytest.raises(ValueError, match="power of two"):
    build(patch_size=6)
  with pytest.raises(ValueError, match="divisible by key_dim"):
    build(widths=(8, 10, 16))
  with pytest.raises(ValueError, match="depths must be"):
    build(depths=(1, 1))
  with pytest.raises(ValueError, match="mlp_ratio must be a positive int"):
    build(mlp_ratio=0)
  with pytest.raises(TypeError, match="distillation must be a bool"):
    build(distillation=1)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    build(attention_args=[3])
  with pytest.raises(ValueError, match="images must be"):
    abstract(levit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="widths, key_dim, num_heads, depths"):
    abstract(levit.Model(num_classes=2), x)
  with pytest.raises(ValueError, match="are not the grid"):
    levit.LeViTAttention(2, 4, 8, 8).init(jax.random.key(0), jnp.zeros((1, 5, 8)), (2, 2))


def test_every_config_builds():
  cases = (("levit_digits", None), ("levit_digits", "attention=softmax,runlocal"),
           ("levit_i1k", None), ("levit_i1k", "variant=128S"), ("levit_i1k", "runlocal"))
  for name, arg, config in checked_configs(cases):
    model = levit.Model(**dict(dict(num_classes=10), **config.model.to_dict()))
    if "digits" in name:
      assert count(abstract(model, jnp.zeros((1, 16, 16, 1)))) > 0
    elif arg == "runlocal":
      assert count(abstract(model, jnp.zeros((1, 32, 32, 3)))) > 0
    else:
      assert model.distillation and model.widths == levit.decode_variant(
          config.model.variant)["widths"]
  model = levit.Model(**_config_module("levit_i1k").get_config("variant=128S").model.to_dict())
  assert full_size_count(model) == 7_777_058
  with pytest.raises(ValueError, match="128S, 128"):
    _config_module("levit_i1k").get_config("variant=512")


def test_digits_config_trains_through_main(tmp_path):
  train_digits_config(tmp_path, "levit_digits")
