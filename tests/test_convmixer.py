"""ConvMixer (`big_attn.models.convmixer`): the paper's parameter counts, its layer against a
float64 plain-JAX reference of BN(GELU(DepthwiseConv(z))) + z -> BN(GELU(PointwiseConv(·))),
forward and gradients w.r.t. the input and every parameter, and the whole model in training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import models
from big_attn.models import convmixer
from tests import reference as ref
from tests.test_token_mixers import conv, same

PAPER = {"1536/20": 51.6e6, "768/32": 21.1e6, "1024/20": 24.4e6}


def count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_parameter_counts_match_the_paper(variant):
  model = convmixer.Model(num_classes=1000, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert round(count(shapes["params"]) / 1e5) / 10 == PAPER[variant] / 1e6


def erf_gelu(x):
  return 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))


def ref_layer(z, p, s, k):
  def conv_gelu_bn(x, q, r, kernel):
    y = erf_gelu(conv(x, q["conv"]["kernel"], same(kernel), q["conv"]["bias"]))
    return ((y - r["norm"]["mean"]) / jnp.sqrt(r["norm"]["var"] + 1e-5) * q["norm"]["scale"]
            + q["norm"]["bias"])
  z = z + conv_gelu_bn(z, p["depthwise"], s["depthwise"], k)
  return conv_gelu_bn(z, p["pointwise"], s["pointwise"], 1)


def test_layer_matches_its_formula_forward_and_gradient():
  z = ref.normal(0, (2, 5, 6, 8))
  layer = convmixer.ConvMixerLayer(kernel_size=3)
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), z))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype),
                        shapes["params"])
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype),
                       shapes["batch_stats"])
  leaves, tree = jax.tree.flatten(params)
  ref.assert_matches(
      lambda z, *l: layer.apply({"params": jax.tree.unflatten(tree, l), "batch_stats": stats}, z),
      lambda z, *l: ref_layer(z, jax.tree.unflatten(tree, l),
                              jax.tree.map(lambda a: a.astype(z.dtype), stats), 3),
      [z, *leaves], tol=dict(rtol=2e-4, atol=2e-4))


def test_model_trains_its_batch_statistics_and_checks_its_input():
  assert models.get("convmixer") is convmixer
  model = convmixer.Model(num_classes=3, dim=8, depth=2, kernel_size=3, patch_size=2)
  x = ref.normal(0, (2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  assert not np.allclose(updates["batch_stats"]["layer_1"]["pointwise"]["norm"]["mean"], 0)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    model.init(jax.random.key(0), x[:, :7])
  with pytest.raises(ValueError, match="kernel_size must be a positive int"):
    convmixer.Model(num_classes=3, dim=8, depth=2, kernel_size=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown ConvMixer variant"):
    convmixer.Model(num_classes=3, variant="B/16")


def test_digits_config_builds():
  from tests.test_train import _config_module  # pylint: disable=g-import-not-at-top
  config = _config_module("mixer_families_digits").get_config("family=convmixer")
  assert config.model_name == "convmixer"
  model = convmixer.Model(num_classes=10, **config.model.to_dict())
  assert count(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))) > 0


@pytest.mark.extended
def test_digits_config_trains_through_main(tmp_path):
  from tests.test_mixer_families import _train_digits_config  # pylint: disable=g-import-not-at-top
  _train_digits_config(tmp_path, "convmixer")
