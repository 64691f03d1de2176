"""TNT model family: variants, parameter counts, the pixel embedding against NumPy, the word
and patch grids of 2-D ops, a training step, bad arguments, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import tnt
from big_attn.train import config_lib
from tests.test_convnext import abstract, count, full_size_count, images
from tests.model_checks import encoder_grids, train_digits_config
from tests.test_train import _config_module
from tests.test_vit import check_affine_map, check_trains

# 8x8 images: 4x4 patches (a 2x2 grid, width 8), each 2x2 words (stride 2, inner width 4).
TINY = dict(width=8, depth=1, num_heads=2, inner_width=4, inner_heads=2, patch_size=4,
            pixel_stride=2, mlp_ratio=2, inner_mlp_ratio=2)
# The paper's Table 1; timm's tnt_*_patch16_224 plus query/key/value biases less the class
# token's position embedding.
PAPER = {"S": (23.8e6, 23_768_584 + 12 * 3 * (384 + 24) - 384),
         "B": (65.6e6, 65_428_680 + 12 * 3 * (640 + 40) - 640)}


def _pixel_embed_reference(x, kernel, bias, patch, stride):
  """float64 NumPy of TNT's pixel embedding: every patch (row-major) on its own, zero-padded
  by 3, cross-correlated with the 7x7 kernel at `stride`, outputs flattened row-major."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  n, height, width, _ = x.shape
  side = -(-patch // stride)
  out = []
  for b in range(n):
    for py in range(height // patch):
      for px in range(width // patch):
        img = np.pad(x[b, py * patch:(py + 1) * patch, px * patch:(px + 1) * patch],
                     ((3, 3), (3, 3), (0, 0)))
        words = [np.einsum("ijc,ijco->o", img[y * stride:y * stride + 7,
                                              xx * stride:xx * stride + 7], kernel)
                 for y in range(side) for xx in range(side)]
        out.append(np.stack(words) + np.asarray(bias, np.float64))
  return np.stack(out)


def test_registry_and_decode_variant():
  assert "tnt" in models.names() and models.get("tnt") is tnt
  assert tnt.decode_variant("TNT-B") == dict(width=640, inner_width=40, num_heads=10, depth=12)
  assert tnt.decode_variant("S") == tnt.decode_variant("TNT-S")
  with pytest.raises(ValueError, match="TNT-S or TNT-B"):
    tnt.decode_variant("TNT-Ti")


@pytest.mark.parametrize("variant", ["S", pytest.param("B", marks=pytest.mark.extended)])
def test_parameter_counts_of_the_variants(variant):
  (paper, timm), n = PAPER[variant], full_size_count(tnt.Model(num_classes=1000,
                                                               variant=variant))
  assert abs(n - paper) / paper < 0.02 and n == timm, (variant, n)


@pytest.mark.parametrize("patch,stride,size", [
    (4, 2, (8, 4)), pytest.param(5, 2, (5, 10), marks=pytest.mark.extended)])
def test_pixel_embed_matches_numpy_forward_and_gradient(patch, stride, size):
  x = jax.random.normal(jax.random.key(0), (2, *size, 2))
  embed = tnt.PixelEmbed(3, patch, stride)
  params = nn.meta.unbox(embed.init(jax.random.key(1), x)["params"])
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
  words, grid = embed.apply({"params": params}, x)
  assert grid == (size[0] // patch, size[1] // patch)
  assert words.shape == (2 * grid[0] * grid[1], np.prod(tnt.word_grid(patch, stride)), 3)
  check_affine_map(lambda t: embed.apply({"params": params}, t)[0],
                   lambda t: _pixel_embed_reference(t, params["proj"]["kernel"],
                                                    params["proj"]["bias"], patch, stride), x)


def test_word_and_patch_grids_and_training_step():
  x = images(batch=3, size=8)
  model = tnt.Model(num_classes=3, attention="neighborhood", inner_attention="neighborhood",
                    **TINY)
  # the inner op sees each patch's 2x2 words, the outer the 2x2 patches after the class token
  assert encoder_grids(model, x) == [((4, 4), (2, 2)), ((5, 8), (2, 2))]
  params = check_trains(tnt.Model(num_classes=3, head_zeroinit=False, **TINY), x)
  assert params["block_0_proj"]["kernel"].shape == (16, 8) and "bias" not in params[
      "block_0_proj"]
  assert params["pixel_posemb"]["pos_embedding"].shape == (4, 4)


def test_bad_arguments():
  x = images(size=8)
  with pytest.raises(ValueError, match="divisible by patch_size 3"):
    abstract(tnt.Model(num_classes=2, **dict(TINY, patch_size=3)), x)
  with pytest.raises(ValueError, match="pixel_stride must be a positive int"):
    abstract(tnt.Model(num_classes=2, **dict(TINY, pixel_stride=0)), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(tnt.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(TypeError, match="inner_attention_args must be a dict"):
    abstract(tnt.Model(num_classes=2, inner_attention_args=[1], **TINY), x)
  with pytest.raises(ValueError, match="width, depth, num_heads, inner_width"):
    abstract(tnt.Model(num_classes=2), x)


def test_every_config_builds():
  for name, arg in (("tnt_digits", None), ("tnt_digits", "runlocal"), ("tnt_i1k", None),
                    ("tnt_i1k", "variant=B"), ("tnt_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  digits = _config_module("tnt_digits").get_config("inner_attention=sigmoid").model.to_dict()
  assert digits["inner_attention"] == "sigmoid"
  params = abstract(tnt.Model(num_classes=10, **dict(digits, dtype=jnp.float32)),
                    jnp.zeros((1, 16, 16, 1)))
  assert params["head"]["kernel"].value.shape == (64, 10) and count(params) > 0
  with pytest.raises(ValueError, match="TNT-S or TNT-B"):
    _config_module("tnt_i1k").get_config("variant=L")


@pytest.mark.extended
def test_digits_config_trains_through_main(tmp_path):
  train_digits_config(tmp_path, "tnt_digits")
