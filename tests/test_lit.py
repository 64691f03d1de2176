"""LIT model family: variants and parameter counts, deformable token merging against a float64
reference of its formula, MLP-only and attending stages, LIT-Ti's class token layout, a training
step, bad arguments, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from big_attn import models
from big_attn.layers import DeformableTokenMerging
from big_attn.models import lit
from tests import reference as ref
from tests.model_checks import (OnGrid, assert_matches_in_eval, check_training_step,
                                checked_configs, train_digits_config)
from tests.test_convnext import abstract, count, full_size_count
from tests.test_train import _config_module

# 16x16 images, 2x2 patches: an 8x8 map, merged to 4x4, 2x2 and 1x1.
TINY = dict(widths=(4, 8, 8, 8), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1), patch_size=2)
PAPER = {"Ti": 19e6, "S": 27e6, "M": 48e6, "B": 86e6}
TOL = dict(rtol=2e-4, atol=2e-4)


def test_registry_and_decode_variant():
  assert "lit" in models.names() and models.get("lit") is lit
  assert lit.decode_variant("LIT-B") == dict(
      widths=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2),
      mlp_ratios=(4, 4, 4, 4), class_token=False, attention="window", norm_eps=1e-5)
  assert lit.decode_variant("Ti")["class_token"] and lit.decode_variant("Ti")["attention"] == (
      "softmax")
  with pytest.raises(ValueError, match="Ti, S, M, B"):
    lit.decode_variant("L")


def test_parameter_counts_of_s():
  """The backbone within 2% of the paper's 27M; with the classifier, the authors' modules'
  count."""
  backbone = abstract(lit.Model(num_classes=0, variant="S"), jnp.zeros((1, 224, 224, 3)))
  assert count(backbone) == 27_204_720 and abs(count(backbone) - 27e6) / 27e6 < 0.02
  assert full_size_count(lit.Model(num_classes=1000, variant="S")) == 27_973_720
  assert "MultiHeadAttention" not in backbone["stage_1"]["encoderblock_1"]
  attention = backbone["stage_2"]["encoderblock_0"]["MultiHeadAttention"]
  assert attention["op_params"]["rpb"].value.shape == (12, 27, 27)  # the whole 14x14 map
  merge = backbone["merge_1"]
  assert merge["kernel"].value.shape == (2, 2, 96, 192)
  assert merge["offset"]["kernel"].value.shape == (2, 2, 96, 8)


@pytest.mark.extended
@pytest.mark.parametrize("variant,backbone,total", [
    ("Ti", 19_373_272, 19_886_272), ("M", 48_603_264, 49_372_264),
    ("B", 86_267_384, 87_292_384)])
def test_parameter_counts_match_the_paper(variant, backbone, total):
  n = count(abstract(lit.Model(num_classes=0, variant=variant), jnp.zeros((1, 224, 224, 3))))
  assert n == backbone and abs(n - PAPER[variant]) / PAPER[variant] < 0.02, (variant, n)
  assert full_size_count(lit.Model(num_classes=1000, variant=variant)) == total


def _ref_merging(x, p, stats, grid, k):
  """float64, the paper's DTM: offsets from a k x k stride-k convolution, the input read at
  k·p₀ + pₙ + Δpₙ by bilinear interpolation with zeros outside (`map_coordinates`), the
  kernel's weighted sum plus bias, BatchNorm (running statistics), exact GELU."""
  (b, t, c), (h, w) = x.shape, grid
  oh, ow = h // k, w // k
  image = x.reshape(b, h, w, c)
  patches = image.reshape(b, oh, k, ow, k, c)
  delta = (jnp.einsum("bykxlc,klcd->byxd", patches, p["offset"]["kernel"])
           + p["offset"]["bias"]).reshape(b, oh, ow, k, k, 2)
  base_y = np.arange(oh)[:, None, None, None] * k + np.arange(k)[None, None, :, None]
  base_x = np.arange(ow)[None, :, None, None] * k + np.arange(k)[None, None, None, :]
  py, px = base_y + delta[..., 0], base_x + delta[..., 1]

  def read(channel, py, px):  # one image's channel at the points
    return ndimage.map_coordinates(channel, [py, px], order=1, mode="constant", cval=0.0)

  sampled = jax.vmap(jax.vmap(read, in_axes=(2, None, None), out_axes=-1))(image, py, px)
  y = jnp.einsum("byxklc,klcd->byxd", sampled, p["kernel"]) + p["bias"]
  y = ((y - stats["norm"]["mean"]) / jnp.sqrt(stats["norm"]["var"] + 1e-5)
       * p["norm"]["scale"] + p["norm"]["bias"])
  y = 0.5 * y * (1 + jax.scipy.special.erf(y / np.sqrt(2)))
  return y.reshape(b, oh * ow, -1)


@pytest.mark.parametrize("k,grid", [(2, (4, 6)), pytest.param(3, (3, 6),
                                                             marks=pytest.mark.extended)])
def test_deformable_token_merging_matches_its_formula(k, grid):
  x = ref.normal(3, (2, grid[0] * grid[1], 3))
  layer = OnGrid(DeformableTokenMerging(5, kernel_size=k), grid)
  # Parameters of std 0.4: offsets of about a token, points that cross the edges.
  assert_matches_in_eval(layer, x, lambda x, p, s: _ref_merging(x, p["layer"], s["layer"], grid,
                                                                k), TOL, scale=0.4)


def test_merging_starts_as_patch_merging_and_returns_offsets():
  """At initialisation the offsets are 0: a k x k stride-k convolution, then BatchNorm, GELU."""
  x = ref.normal(4, (2, 16, 3))
  merge = DeformableTokenMerging(4)
  variables = merge.init(jax.random.key(0), x, (4, 4))
  y, delta = merge.apply(variables, x, (4, 4), offsets=True)
  assert delta.shape == (2, 2, 2, 2, 2, 2) and not np.any(delta)
  p = nn.meta.unbox(variables["params"])
  conv = jnp.einsum("bykxlc,klcd->byxd", x.reshape(2, 2, 2, 2, 2, 3), p["kernel"]) + p["bias"]
  conv = (conv / np.sqrt(1 + 1e-5)).reshape(2, 4, 4)  # running statistics 0 and 1
  np.testing.assert_allclose(y, jax.nn.gelu(conv, approximate=False), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="divisible by kernel_size"):
    merge.init(jax.random.key(0), ref.normal(4, (2, 15, 3)), (3, 5))
  with pytest.raises(ValueError, match="are not the grid"):
    merge.init(jax.random.key(0), x, (4, 3))


def test_stages_and_grids():
  """MLP-only stages have no attention; the attending ones run the op over their whole map."""
  x = jnp.zeros((1, 16, 16, 3))
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "attend":
      seen.append((args[0].shape[1], dict(kwargs["op_args"])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    params = abstract(lit.Model(num_classes=3, **TINY), x)
  assert [(n, a["grid"], a["window_size"]) for n, a in seen] == [(4, (2, 2), (2, 2)),
                                                                 (1, (1, 1), (1, 1))]
  assert all("MultiHeadAttention" not in params[f"stage_{i}"]["encoderblock_0"]
             for i in (0, 1))
  assert params["stage_2"]["encoderblock_0"]["MlpBlock"]["Dense_0"]["kernel"].value.shape == (
      8, 32)
  params = abstract(lit.Model(num_classes=3, mlp_stages=3, attention="softmax", **TINY), x)
  assert "MultiHeadAttention" not in params["stage_2"]["encoderblock_0"]


def test_class_token_layout():
  """LIT-Ti's: a position embedding per stage, the class token joining the last stage."""
  x = jnp.zeros((1, 16, 16, 3))
  model = lit.Model(num_classes=3, class_token=True, attention="softmax",
                    mlp_ratios=(8, 8, 4, 4), **TINY)
  params = abstract(model, x)
  assert [params[f"posemb_{i}"].value.shape for i in range(4)] == [(64, 4), (16, 8), (4, 8),
                                                                  (2, 8)]
  assert params["cls"].value.shape == (1, 8)
  assert params["stage_0"]["encoderblock_0"]["MlpBlock"]["Dense_0"]["kernel"].value.shape == (
      4, 32)


def test_training_step():
  # 16x32 images: a 1x2 map in the last stage, whose attention learns.
  check_training_step(lit.Model(num_classes=3, **TINY), ref.normal(4, (4, 16, 32, 3)))


def test_bad_arguments():
  x = jnp.zeros((1, 16, 16, 3))
  build = lambda **kw: abstract(lit.Model(num_classes=2, **dict(TINY, **kw)), x)
  with pytest.raises(ValueError, match=r"2\^\(stages − 1\) \(the grid halves at every "
                                       r"merging\) = 32"):
    build(patch_size=2, widths=(4, 8, 8, 8, 8), num_heads=(1, 2, 2, 2, 2),
          depths=(1, 1, 1, 1, 1))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    build(num_heads=(3, 2, 2, 2))
  with pytest.raises(ValueError, match="depths must be"):
    build(depths=(1, 1))
  with pytest.raises(ValueError, match="mlp_stages"):
    build(mlp_stages=5)
  with pytest.raises(TypeError, match="class_token must be a bool"):
    build(class_token=1)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    build(attention_args=[3])
  with pytest.raises(ValueError, match="images must be"):
    abstract(lit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="widths, num_heads, depths"):
    abstract(lit.Model(num_classes=2), x)


def test_every_config_builds():
  cases = (("lit_digits", None), ("lit_digits", "attention=softmax,runlocal"), ("lit_i1k", None),
           ("lit_i1k", "variant=Ti"), ("lit_i1k", "runlocal"))
  for name, arg, config in checked_configs(cases):
    model = lit.Model(**dict(dict(num_classes=10), **config.model.to_dict()))
    if "digits" in name:
      assert count(abstract(model, jnp.zeros((1, 16, 16, 1)))) > 0
    elif arg == "runlocal":
      assert count(abstract(model, jnp.zeros((1, 32, 32, 3)))) > 0
    else:
      assert model.widths == lit.decode_variant(config.model.variant)["widths"]
  model = lit.Model(**_config_module("lit_i1k").get_config("variant=Ti").model.to_dict())
  assert model.class_token and model.attention == "softmax"
  with pytest.raises(ValueError, match="Ti, S, M, B"):
    _config_module("lit_i1k").get_config("variant=L")


def test_digits_config_trains_through_main(tmp_path):
  train_digits_config(tmp_path, "lit_digits")
