"""CrossViT model family: variants, parameter counts, the cross-attention fusion against its
formula in float64 (forward and gradients), the branch grids of 2-D ops, a training step, bad
arguments, configs, the digits config through `big_attn.main`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import crossvit
from big_attn.train import config_lib
from tests import reference as ref
from tests.model_checks import encoder_grids, train_digits_config
from tests.test_convnext import abstract, count, full_size_count, images
from tests.test_mixer_families import TOL, _gelu, _layer_norm
from tests.test_token_mixers import dense
from tests.test_train import _config_module
from tests.test_vit import check_trains

# 8x8 images: the small branch 2x2 patches (a 4x4 grid, width 8), the large 4x4 (2x2, width 12);
# one stage of a block per branch and the two fusions.
TINY = dict(widths=(8, 12), num_heads=(2, 3), depths=(1, 1), num_stages=1, mlp_ratio=2,
            patch_sizes=(2, 4))


def _fusion_reference(cls, other, p, num_heads):
  """float64 JAX of CrossViT's fusion: the class token projected to the other width (LN,
  GELU, Dense), attending as the one query to itself and the other branch's patch tokens,
  plus itself, projected back (LN, GELU, Dense)."""
  c = dense(_gelu(_layer_norm(cls, p["proj_norm"])), p["proj"])
  t = _layer_norm(jnp.concatenate([c, other[:, 1:]], axis=1), p["LayerNorm_0"])
  a = p["MultiHeadAttention"]
  q, k, v = (jnp.einsum("btc,chd->bthd", x, a[name]["kernel"]) + a[name]["bias"]
             for name, x in (("query", t[:, :1]), ("key", t), ("value", t)))
  assert q.shape[2] == num_heads
  y = jnp.einsum("bthd,hdc->btc", ref.softmax_attention(q, k, v), a["out"]["kernel"])
  y = c + y + a["out"]["bias"]
  return dense(_gelu(_layer_norm(y, p["revert_norm"])), p["revert_proj"])


def test_registry_and_decode_variant():
  assert "crossvit" in models.names() and models.get("crossvit") is crossvit
  assert crossvit.decode_variant("CrossViT-18") == dict(
      widths=(224, 448), num_heads=(7, 7), depths=(1, 6), mlp_ratio=3, num_stages=3,
      patch_sizes=(12, 16), image_sizes=(240, 224))
  assert crossvit.decode_variant("Ti") == crossvit.decode_variant("CrossViT-Ti")
  with pytest.raises(ValueError, match="Ti, S, B, 9, 15, 18"):
    crossvit.decode_variant("CrossViT-L")


# The paper's Table 2; timm's crossvit_*_240 (the authors' code) less the position embeddings of
# the two class tokens.
PAPER = {"Ti": (6.9e6, 7_014_800 - 288), "S": (26.7e6, 26_856_272 - 576),
         "B": (104.7e6, 105_025_232 - 1152), "9": (8.6e6, 8_553_296 - 384),
         "15": (27.4e6, 27_528_464 - 576), "18": (43.3e6, 43_271_408 - 672)}


@pytest.mark.parametrize("variant", [
    v if v == "S" else pytest.param(v, marks=pytest.mark.extended) for v in PAPER])
def test_parameter_counts_of_the_variants(variant):
  (paper, timm), n = PAPER[variant], full_size_count(crossvit.Model(num_classes=1000,
                                                                    variant=variant))
  assert abs(n - paper) / paper < 0.02 and n == timm, (variant, n)


@pytest.mark.parametrize("widths,heads,tokens", [
    ((4, 6), 3, 5), pytest.param((6, 6), 2, 2, marks=pytest.mark.extended)])
def test_fusion_matches_its_formula_forward_and_gradient(widths, heads, tokens):
  cls = jax.random.normal(jax.random.key(0), (2, 1, widths[0]))
  other = jax.random.normal(jax.random.key(1), (2, tokens, widths[1]))
  fusion = crossvit.CrossAttentionFusion(num_heads=heads, approximate_gelu=False)
  rng = np.random.default_rng(2)  # random parameters of the right shapes, nonzero biases
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.4, s.shape), s.dtype),
                        nn.meta.unbox(jax.eval_shape(
                            lambda: fusion.init(jax.random.key(0), cls, other))["params"]))
  leaves, tree = jax.tree.flatten(params)
  out = ref.assert_matches(
      lambda c, o, *l: fusion.apply({"params": jax.tree.unflatten(tree, l)}, c, o),
      lambda c, o, *l: _fusion_reference(c, o, jax.tree.unflatten(tree, l), heads),
      [cls, other, *leaves], tol=TOL)
  assert out.shape == cls.shape
  with pytest.raises(ValueError, match=r"cls must be \[batch, 1, width\]"):
    fusion.apply({"params": params}, other, other)


def test_branch_grids_and_training_step():
  x = images(batch=3, size=8)
  assert encoder_grids(crossvit.Model(num_classes=3, attention="neighborhood", **TINY), x) == [
      ((17, 8), (4, 4)), ((5, 12), (2, 2))]  # a 2-D op sees each branch's grid
  params = check_trains(crossvit.Model(num_classes=3, head_zeroinit=False, **TINY), x)
  assert params["stage_0_fusion_0"]["proj"]["kernel"].shape == (8, 12)
  assert params["posemb_0"]["pos_embedding"].shape == (16, 8)
  features = abstract(crossvit.Model(num_classes=0, image_sizes=(8, 12), **TINY), x)
  assert features["posemb_1"]["pos_embedding"].value.shape == (9, 12)  # resized to 12x12


def test_bad_arguments():
  x = images(size=8)
  bad = {"widths": (8,), "patch_sizes": (2, 0), "num_stages": 0}
  for name, value in bad.items():
    with pytest.raises(ValueError, match=name):
      abstract(crossvit.Model(num_classes=2, **dict(TINY, **{name: value})), x)
  with pytest.raises(ValueError, match="must be divisible by its patch size 3"):
    abstract(crossvit.Model(num_classes=2, **dict(TINY, patch_sizes=(2, 3))), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(crossvit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(TypeError, match="fusion_attention_args must be a dict"):
    abstract(crossvit.Model(num_classes=2, fusion_attention_args=[1], **TINY), x)
  with pytest.raises(ValueError, match="widths, num_heads, depths"):
    abstract(crossvit.Model(num_classes=2), x)


def test_every_config_builds():
  for name, arg in (("crossvit_digits", None), ("crossvit_digits", "runlocal"),
                    ("crossvit_i1k", None), ("crossvit_i1k", "variant=18"),
                    ("crossvit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  model = crossvit.Model(**dict(_config_module("crossvit_i1k").get_config("variant=9")
                                .model.to_dict(), dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 8.6e6) / 8.6e6 < 0.02
  digits = _config_module("crossvit_digits").get_config(None).model.to_dict()
  params = abstract(crossvit.Model(num_classes=10, **dict(digits, dtype=jnp.float32)),
                    jnp.zeros((1, 16, 16, 1)))
  assert params["head_1"]["kernel"].value.shape == (64, 10) and count(params) > 0
  with pytest.raises(ValueError, match="Ti, S, B, 9, 15, 18"):
    _config_module("crossvit_i1k").get_config("variant=L")


@pytest.mark.extended
def test_digits_config_trains_through_main(tmp_path):
  train_digits_config(tmp_path, "crossvit_digits")
