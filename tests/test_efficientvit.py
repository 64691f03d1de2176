"""EfficientViT model family: variants and parameter counts, its cascaded group attention layer
against a float64 reference of the paper's formula, windows, the interpretability hooks, the
refusal of ops that need values as wide as the keys, a training step, bad arguments, configs,
main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.interpret import capture
from big_attn.models import efficientvit
from big_attn.ops import spatial
from big_attn.train import config_lib
from tests import reference as ref
from tests.test_convnext import (abstract, count, full_size_count, random_params,
                                 run_tiny_config, train_steps)
from tests.test_mixer_families import _assert_block_matches
from tests.test_token_mixers import conv, same
from tests.test_train import _config_module

# 2x2 patches, 2x2 windows; 8x16 images: 4x8, 2x4 and 1x2 maps.
TINY = dict(widths=(8, 12, 16), depths=(1, 1, 1), num_heads=(2, 3, 2), key_dim=4,
            kernel_size=3, window_size=2, patch_size=2)
PAPER = {"M0": 2.3e6, "M1": 3.0e6, "M2": 4.2e6, "M3": 6.9e6, "M4": 8.8e6, "M5": 12.4e6}


def test_registry_and_decode_variant():
  assert "efficientvit" in models.names() and models.get("efficientvit") is efficientvit
  assert efficientvit.decode_variant("EfficientViT-M5") == dict(
      widths=(192, 288, 384), depths=(1, 3, 4), num_heads=(3, 3, 4))
  assert efficientvit.decode_variant("M0") == efficientvit.decode_variant("EfficientViT-M0")
  with pytest.raises(ValueError, match="M0, M1, M2, M3, M4, M5"):
    efficientvit.decode_variant("M6")


def test_parameter_count_of_m4():
  params = abstract(efficientvit.Model(num_classes=1000, variant="M4"),
                    jnp.zeros((1, 224, 224, 3)))
  assert count(params) == 8_799_096 and abs(count(params) - 8.8e6) / 8.8e6 < 0.02
  attention = params["stage_2_block_2_attention"]
  assert attention["query_kernel"].value.shape == (4, 96, 16)  # per head: its 384/4 channels
  assert attention["value_kernel"].value.shape == (4, 96, 96)
  assert attention["query_conv"].value.shape == (5, 5, 4, 16)
  assert params["subsample_1_se_reduce"]["kernel"].value.shape == (1, 1, 512, 128)


@pytest.mark.extended
@pytest.mark.parametrize("variant", ["M0", "M1", "M2", "M3", "M5"])
def test_parameter_count_matches_the_paper(variant):
  n = full_size_count(efficientvit.Model(num_classes=1000, variant=variant))
  assert abs(n - PAPER[variant]) / PAPER[variant] < 0.02, (variant, n)


def _ref_cascaded_group_attention(x, p, grid, num_heads):
  """float64, the paper's formula: head j takes its channel group X_j plus the previous head's
  output, projects it (q, k: key_dim; v: the group's width), convolves q depthwise on the grid,
  attends with softmax(q kᵀ / sqrt(key_dim)); the heads' outputs, concatenated, go through a
  ReLU and the output layer."""
  b, t, width = x.shape
  groups = x.reshape(b, t, num_heads, width // num_heads)
  outs, previous = [], 0.0
  for j in range(num_heads):
    xj = groups[:, :, j] + previous
    q, k, v = (xj @ p[f"{n}_kernel"][j] + p[f"{n}_bias"][j] for n in ("query", "key", "value"))
    kernel = p["query_conv"][:, :, j][:, :, None]  # [k, k, 1, key_dim]: depthwise
    q = conv(q.reshape(b, *grid, -1), kernel, same(kernel.shape[0])).reshape(b, t, -1)
    previous = ref.softmax_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
    outs.append(previous)
  out = jax.nn.relu(jnp.concatenate(outs, axis=-1))
  return out @ p["out"]["kernel"] + p["out"]["bias"]


def test_cascaded_group_attention_matches_the_papers_formula():
  grid = (3, 2)
  x = ref.normal(5, (2, 6, 9))
  layer = efficientvit.CascadedGroupAttention(num_heads=3, key_dim=4, kernel_size=3)
  params = _assert_block_matches(
      _Bound(layer, grid), x, lambda x, p: _ref_cascaded_group_attention(x, p["layer"], grid, 3))
  params = params["layer"]
  assert params["value_kernel"].shape == (3, 3, 3) and params["query_conv"].shape == (3, 3, 3, 4)


class _Bound(nn.Module):
  """The layer on a fixed grid (a module of one argument for `_assert_block_matches`)."""
  layer: nn.Module
  grid: tuple[int, int]

  def __call__(self, x):
    return self.layer(x, self.grid)


def test_windows_and_ops():
  x = ref.normal(4, (4, 8, 16, 3))
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, efficientvit.CascadedGroupAttention)
        and context.method_name == "__call__"):
      seen.append((args[0].shape, args[1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):  # 4x8 and 2x4 maps in 2x2 windows, then 1x2
    abstract(efficientvit.Model(num_classes=3, **TINY), x)
  assert seen == [((32, 4, 8), (2, 2)), ((8, 4, 12), (2, 2)), ((4, 2, 16), (1, 2))]
  model = efficientvit.Model(num_classes=3, attention="softmax", **dict(TINY, window_size=3))
  assert abstract(model, x)["stage_0_block_0_attention"].keys() == {
      "query_kernel", "query_bias", "key_kernel", "key_bias", "value_kernel", "value_bias",
      "out"}


def test_hooks_capture_the_attention_maps():
  """`capture_attention` sees the layer's op through `Attention.attend`: the map is the float64
  softmax of the layer's own per-head projections of its tokens."""
  grid, heads, key_dim = (3, 2), 3, 4
  x = ref.normal(5, (2, 6, 9))
  layer = _Bound(efficientvit.CascadedGroupAttention(num_heads=heads, key_dim=key_dim,
                                                     attention="softmax"), grid)
  params = random_params(layer, x)
  maps = capture.capture_attention(layer, {"params": params}, x)
  assert list(maps) == ["layer/attention_op"]
  p = {k: np.asarray(a, np.float64) for k, a in params["layer"].items() if k != "out"}
  tokens = np.asarray(x, np.float64).reshape(2, 6, heads, -1)
  q, k = (np.einsum("bthc,hcd->bthd", tokens, p[f"{role}_kernel"]) + p[f"{role}_bias"]
          for role in ("query", "key"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(key_dim)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(maps["layer/attention_op"], want / want.sum(-1, keepdims=True),
                             rtol=1e-4, atol=1e-6)


def test_an_op_with_learned_arguments_matches_its_formula():
  """gated_attention in the layer: its gate G(x) (`op_params`, from the layer's tokens) scales
  each head's softmax attention; float64 reference of the layer, forward and gradient."""
  grid, heads, key_dim = (2, 2), 2, 4
  x = ref.normal(6, (2, 4, 6))
  layer = _Bound(efficientvit.CascadedGroupAttention(num_heads=heads, key_dim=key_dim,
                                                     attention="gated_attention"), grid)

  def reference(x, p):
    tokens = x.reshape(2, 4, heads, -1)
    q, k, v = (jnp.einsum("bthc,hcd->bthd", tokens, p[f"{role}_kernel"]) + p[f"{role}_bias"]
               for role in ("query", "key", "value"))
    gate = jax.nn.sigmoid(jnp.einsum("bthc,hc->bth", tokens, p["op_params"]["gate_kernel"])
                          + p["op_params"]["gate_bias"])
    out = ref.softmax_attention(q, k, v) * gate[..., None]
    return jax.nn.relu(out.reshape(2, 4, -1)) @ p["out"]["kernel"] + p["out"]["bias"]

  params = _assert_block_matches(layer, x, lambda x, p: reference(x, p["layer"]))
  assert params["layer"]["op_params"]["gate_kernel"].shape == (heads, 3)


def test_the_model_s_ops_run_through_the_hooks():
  """Every block's op, the cascade's maps among its arguments, reaches the hooks."""
  x = ref.normal(4, (1, 8, 16, 3))
  model = efficientvit.Model(num_classes=3, **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  seen = []

  def hook(path, op_fn, query, key, value, op_kwargs):
    seen.append((path, sorted(k for k in op_kwargs if k.startswith("cascade"))))
    return op_fn(query, key, value, **op_kwargs)

  with capture.hook_ops(hook):
    jax.eval_shape(model.apply, variables, x)
  assert seen == [(f"stage_{stage}_block_0_attention/attention_op",
                   ["cascade_key", "cascade_query", "cascade_value"]) for stage in range(3)]


@pytest.mark.parametrize("op", sorted(spatial.EQUAL_WIDTH_OPS))
def test_ops_needing_values_as_wide_as_keys(op):
  """Refused up front, naming the op and the reason, when a stage's width / num_heads exceeds
  key_dim; built when every stage's values are key_dim wide."""
  x = jnp.zeros((1, 8, 16, 1))
  with pytest.raises(spatial.OpRefused, match=f"'{op}' needs values as wide as its queries"):
    abstract(efficientvit.Model(num_classes=2, attention=op, **TINY), x)
  params = abstract(efficientvit.Model(num_classes=2, attention=op,
                                       **dict(TINY, num_heads=(2, 3, 4))), x)
  assert params["stage_2_block_0_attention"]["value_kernel"].value.shape == (4, 4, 4)


def test_forward_and_training_step():
  x = ref.normal(4, (4, 8, 16, 3))
  model = efficientvit.Model(num_classes=3, **TINY)
  before, after, losses = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3), steps=2)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed


def test_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda model: abstract(model, x)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    build(efficientvit.Model(num_classes=2, **dict(TINY, patch_size=16)))
  with pytest.raises(ValueError, match="power of two"):
    build(efficientvit.Model(num_classes=2, **dict(TINY, patch_size=6)))
  with pytest.raises(ValueError, match="must be divisible by num_heads"):
    build(efficientvit.Model(num_classes=2, **dict(TINY, num_heads=(3, 3, 2))))
  with pytest.raises(ValueError, match="depths must be"):
    build(efficientvit.Model(num_classes=2, **dict(TINY, depths=(1, 1))))
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    build(efficientvit.Model(num_classes=2, attention_args=[3], **TINY))
  with pytest.raises(ValueError, match="images must be"):
    abstract(efficientvit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="widths, depths, num_heads"):
    build(efficientvit.Model(num_classes=2))


def test_every_config_builds():
  for name, arg in (("efficientvit_digits", None), ("efficientvit_digits",
                                                    "attention=softmax,runlocal"),
                    ("efficientvit_i1k", None), ("efficientvit_i1k", "variant=M0"),
                    ("efficientvit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
    model = efficientvit.Model(**dict(dict(num_classes=10), **config.model.to_dict()))
    if "digits" in name:
      assert count(abstract(model, jnp.zeros((1, 16, 16, 1)))) > 0
    elif arg == "runlocal":
      assert count(abstract(model, jnp.zeros((1, 32, 32, 3)))) > 0
    else:
      assert model.widths == efficientvit.decode_variant(config.model.variant)["widths"]
  with pytest.raises(ValueError, match="M0, M1"):
    _config_module("efficientvit_i1k").get_config("variant=M9")


@pytest.mark.extended
def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("efficientvit_digits", tmp_path, steps=6)
