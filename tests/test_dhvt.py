"""DHVT model family: variants and parameter counts, head-interaction attention, DAFF and SOPE
against float64 references of the paper's formulas, 2-D ops, a training step, bad arguments,
configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import models
from big_attn.models import dhvt
from tests import reference as ref
from tests.model_checks import (OnGrid, assert_matches_in_eval, check_training_step,
                                checked_configs, train_digits_config)
from tests.test_convnext import abstract, count
from tests.test_token_mixers import conv, same
from tests.test_train import _config_module

TINY = dict(width=8, depth=1, num_heads=2, patch_size=2)
TOL = dict(rtol=2e-4, atol=2e-4)


def test_registry_and_decode_variant():
  assert "dhvt" in models.names() and models.get("dhvt") is dhvt
  assert dhvt.decode_variant("DHVT-S") == dict(width=384, depth=12, num_heads=6)
  assert dhvt.decode_variant("T") == dhvt.decode_variant("DHVT-T")
  with pytest.raises(ValueError, match="T, S"):
    dhvt.decode_variant("B")


def test_parameter_count_of_cifar_t():
  """DHVT-T on CIFAR-100 (32x32, patch 4, 4 heads): the paper's 6.0M."""
  params = abstract(dhvt.Model(num_classes=100, variant="T", num_heads=4, patch_size=4),
                    jnp.zeros((1, 32, 32, 3)))
  assert count(params) == 6_008_650 and abs(count(params) - 6.0e6) / 6.0e6 < 0.02
  assert params["block_0_attention"]["head_posemb"].value.shape == (4, 192)
  assert params["block_0_attention"]["head_proj"]["kernel"].value.shape == (48, 192)
  assert params["block_0_daff"]["depthwise"]["kernel"].value.shape == (3, 3, 1, 768)
  assert params["patch_embedding_0"]["conv"]["kernel"].value.shape == (3, 3, 3, 96)


@pytest.mark.extended
@pytest.mark.parametrize("variant,side,classes,kw,expected,paper", [
    ("T", 224, 1000, {}, 6_267_334, 6.2e6), ("S", 224, 1000, {}, 24_040_606, 23.8e6),
    ("S", 32, 100, dict(num_heads=8, patch_size=4), 23_425_450, 23.4e6)])
def test_parameter_counts_match_the_paper(variant, side, classes, kw, expected, paper):
  n = count(abstract(dhvt.Model(num_classes=classes, variant=variant, **kw),
                     jnp.zeros((1, side, side, 3))))
  assert n == expected and abs(n - paper) / paper < 0.02, (variant, n)


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def _ref_head_interaction(x, p, heads):
  """float64, the paper's HI-MHSA in its own token order [class, patches, head tokens]."""
  b, t, c = x.shape
  d = c // heads
  mean = x.reshape(b, t, heads, d).mean(1)
  head_tokens = (mean @ p["head_proj"]["kernel"] + p["head_proj"]["bias"]).reshape(
      b, heads, heads, d)
  head_tokens = _gelu(_layer_norm(head_tokens, p["head_norm"], 1e-5)).reshape(b, heads, c)
  tokens = jnp.concatenate([x, head_tokens + p["head_posemb"]], axis=1)
  a = p["MultiHeadAttention"]
  q, k, v = (jnp.einsum("btc,chd->bthd", tokens, a[n]["kernel"]) + a[n]["bias"]
             for n in ("query", "key", "value"))
  out = jnp.einsum("bthd,hdc->btc", ref.softmax_attention(q, k, v), a["out"]["kernel"])
  out = out + a["out"]["bias"]
  cls = out[:, :1] + out[:, t:].mean(1, keepdims=True)
  return jnp.concatenate([cls, out[:, 1:t]], axis=1)


def _bn(x, p, s):
  return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _ref_daff(x, p, s, grid):
  """float64, the paper's DAFF."""
  b, t, c = x.shape
  image = x[:, 1:].reshape(b, *grid, c)
  y = _gelu(_bn(conv(image, p["expand"]["kernel"], same(1), p["expand"]["bias"]),
                p["expand_norm"], s["expand_norm"]))
  y = y + _gelu(_bn(conv(y, p["depthwise"]["kernel"], same(3), p["depthwise"]["bias"]),
                    p["depthwise_norm"], s["depthwise_norm"]))
  y = _bn(conv(y, p["project"]["kernel"], same(1), p["project"]["bias"]), p["project_norm"],
          s["project_norm"])
  gate = _gelu(y.mean((1, 2)) @ p["compress"]["kernel"] + p["compress"]["bias"])
  gate = gate @ p["excite"]["kernel"] + p["excite"]["bias"]
  return jnp.concatenate([x[:, :1] * gate[:, None], y.reshape(b, t - 1, c)], axis=1)


def test_head_interaction_attention_matches_the_papers_formula():
  x = ref.normal(5, (2, 7, 8))
  layer = OnGrid(dhvt.HeadInteractionAttention(num_heads=2), (2, 3))
  assert_matches_in_eval(layer, x, lambda x, p, s: _ref_head_interaction(x, p["layer"], 2), TOL)


def test_daff_matches_the_papers_formula():
  x = ref.normal(6, (2, 7, 8))
  layer = OnGrid(dhvt.DAFF(mlp_ratio=2), (2, 3))
  assert_matches_in_eval(layer, x, lambda x, p, s: _ref_daff(x, p["layer"], s["layer"], (2, 3)),
                         TOL)


def test_sope_and_2d_ops():
  """SOPE's convolutions and affine maps; a 2-D op sees the patch grid with the class and head
  tokens as extra tokens."""
  x = jnp.zeros((1, 16, 16, 3))
  params = abstract(dhvt.Model(num_classes=3, **dict(TINY, patch_size=8)), x)
  assert [params[f"patch_embedding_{i}"]["conv"]["kernel"].value.shape[-1]
          for i in range(3)] == [2, 4, 8]
  assert params["pre_affine_scale"].value.shape == (3,)
  assert params["post_affine_bias"].value.shape == (8,)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "attend":
      seen.append(dict(kwargs["op_args"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    abstract(dhvt.Model(num_classes=3, attention="neighborhood",
                        attention_args=dict(kernel_size=3), **TINY), x)
  assert [(a["grid"], a["extra_tokens"]) for a in seen] == [((8, 8), 3)]


def test_training_step():
  check_training_step(dhvt.Model(num_classes=3, **TINY), ref.normal(4, (4, 8, 8, 3)))


def test_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda **kw: abstract(dhvt.Model(num_classes=2, **dict(TINY, **kw)), x)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    build(patch_size=16, width=16)
  with pytest.raises(ValueError, match="power of two"):
    build(patch_size=6)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    build(num_heads=3)
  with pytest.raises(ValueError, match="divisible by 4 and by patch_size / 2"):
    build(width=6, num_heads=1)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    build(attention_args=[3])
  with pytest.raises(ValueError, match="images must be"):
    abstract(dhvt.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="width, depth, num_heads"):
    abstract(dhvt.Model(num_classes=2), x)
  with pytest.raises(ValueError, match="not a class token and the grid"):
    dhvt.HeadInteractionAttention(2).init(jax.random.key(0), jnp.zeros((1, 6, 8)), (2, 3))


def test_every_config_builds():
  cases = (("dhvt_digits", None), ("dhvt_digits", "attention=sigmoid,runlocal"), ("dhvt_i1k", None),
           ("dhvt_i1k", "variant=T"), ("dhvt_i1k", "runlocal"), ("dhvt_cifar100", None),
           ("dhvt_cifar100", "runlocal"))
  for name, arg, config in checked_configs(cases):
    model = dhvt.Model(**dict(dict(num_classes=10), **config.model.to_dict()))
    if "digits" in name:
      assert count(abstract(model, jnp.zeros((1, 16, 16, 1)))) > 0
    elif arg == "runlocal":
      assert count(abstract(model, jnp.zeros((1, 32, 32, 3)))) > 0
    else:
      assert model.width == dhvt.decode_variant(config.model.variant)["width"]
  model = dhvt.Model(**_config_module("dhvt_cifar100").get_config("variant=T").model.to_dict())
  assert count(abstract(model, jnp.zeros((1, 32, 32, 3)))) == 6_008_650  # the paper's 6.0M
  with pytest.raises(ValueError, match="T, S"):
    _config_module("dhvt_i1k").get_config("variant=B")


def test_digits_config_trains_through_main(tmp_path):
  train_digits_config(tmp_path, "dhvt_digits")
