"""HorNet (`convnext` with gⁿConv), Sequencer2D (`metaformer` with BiLSTM2D), SpectFormer
(`vit` with spectral blocks) and MobileViT (`mobilevit`): the papers' parameter counts, each block against a float64
reference of its formula (forward and gradients), a forward and train step per family, bad
arguments, the configs, and the digits config through `big_attn.main`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import models
from big_attn.interpret import lrp
from big_attn.models import convnext, metaformer, mobilevit, vit
from tests import reference as ref
from tests.model_checks import train_digits_config
from tests.test_convnext import abstract, count, init_batch_stats, random_params, train_steps
from tests.test_token_mixers import conv, dense, ref_gnconv, ref_spectral_filter, same
from tests.test_train import _config_module

TOL = dict(rtol=2e-4, atol=2e-4)


def _layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))


def _mlp(x, p, first="Dense_0", second="Dense_1"):
  return dense(_gelu(dense(x, p[first])), p[second])


def _assert_block_matches(module, x, ref_fn, output=lambda y: y):
  """`module` (random parameters; `output` picks its output) against `ref_fn(x, params)`."""
  params = random_params(module, x)
  leaves, tree = jax.tree.flatten(params)
  ref.assert_matches(
      lambda x, *leaves: output(module.apply({"params": jax.tree.unflatten(tree, leaves)}, x)),
      lambda x, *leaves: ref_fn(x, jax.tree.unflatten(tree, leaves)), [x, *leaves], tol=TOL)
  return params


# HorNet Table 1 (7x7 gⁿConv, 224²): 22M, 50M, 87M. Sequencer Table 1: 28M, 38M, 54M.
# SpectFormer's model zoo (vanilla): T 9M, S 32M, B 57M; its XS (22M there) is 20.0M in the
# authors' own layout (width 384, depth 12, α = 4), so that count is kept exact.
PAPER = {"hornet_t": (convnext, 22e6), "hornet_s": (convnext, 50e6),
         "hornet_b": (convnext, 87e6), "sequencer2d_s": (metaformer, 28e6),
         "sequencer2d_m": (metaformer, 38e6), "sequencer2d_l": (metaformer, 54e6),
         "spectformer_t": (vit, 9e6), "spectformer_xs": (vit, None), "spectformer_s": (vit, 32e6),
         "spectformer_b": (vit, 57e6), "XXS": (mobilevit, 1.3e6), "XS": (mobilevit, 2.3e6),
         "S": (mobilevit, 5.6e6)}
REPRESENTATIVES = ("hornet_t", "sequencer2d_s", "spectformer_s", "S")


def _assert_count(variant, params):
  n, expected = count(params), PAPER[variant][1]
  if expected is None:
    assert n == 20_028_520
  elif PAPER[variant][0] is mobilevit:  # MobileViT reports one decimal (XXS 1.27M is 2.2% off)
    assert round(n / 1e6, 1) == expected / 1e6, (variant, n)
  else:
    assert abs(n - expected) / expected < 0.02, (variant, n)


def _full_size(variant):
  family = PAPER[variant][0]
  side = 256 if family is mobilevit else 224
  return abstract(family.Model(num_classes=1000, variant=variant), jnp.zeros((1, side, side, 3)))


def test_parameter_counts_and_layouts_of_one_variant_per_family():
  hornet, seq, spect, mvit = (_full_size(v) for v in REPRESENTATIVES)
  for variant, params in zip(REPRESENTATIVES, (hornet, seq, spect, mvit)):
    _assert_count(variant, params)
  # Orders 2 and 5: the depthwise conv over Σ C_k = c + c/2 channels, then 4 pointwise.
  assert hornet["stage_0_block_0"]["mixer"]["dwconv"]["kernel"].value.shape == (7, 7, 1, 96)
  assert set(hornet["stage_3_block_0"]["mixer"]) == {"proj_in", "dwconv", "pw_0", "pw_1",
                                                     "pw_2", "pw_3", "proj_out"}
  assert seq["stem"]["kernel"].value.shape == (7, 7, 3, 192)
  assert seq["downsample_2"]["kernel"].value.shape == (1, 1, 384, 384)
  assert "layer_scale1" not in seq["stage_0_block_0"]
  assert seq["stage_1_block_0"]["mixer"]["vertical_fwd_u"].value.shape == (96, 384)
  blocks = spect["Transformer"]
  assert [("SpectralFilter" in blocks[f"encoderblock_{i}"]) for i in range(19)] == (
      [True] * 4 + [False] * 15)
  assert blocks["encoderblock_0"]["SpectralFilter"]["filter"].value.shape == (14, 8, 384, 2)
  assert [k for k in mvit if k.endswith("_vit")] == ["layer_3_vit", "layer_4_vit", "layer_5_vit"]
  assert mvit["layer_4_vit"]["layer_3_ffn_0"]["kernel"].value.shape == (192, 384)
  assert mvit["layer_2_mv2_2"]["expand"]["conv"]["kernel"].value.shape == (1, 1, 64, 256)


@pytest.mark.extended
@pytest.mark.parametrize("variant", [v for v in PAPER if v not in REPRESENTATIVES])
def test_parameter_count_matches_the_paper(variant):
  _assert_count(variant, _full_size(variant))


def test_hornet_block_matches_its_formula():
  # x + γ1·gⁿConv(LN(x)), then x + γ2·MLP(LN(x)); an odd, non-square map, order 3.
  x = ref.normal(0, (2, 3, 5, 16))
  block = convnext.Block(mixer="gnconv", mixer_args={"order": 3}, layer_scale_init=0.5)

  def reference(x, p):
    x = x + p["mixer_gamma"] * ref_gnconv(_layer_norm(x, p["mixer_norm"]), p["mixer"], order=3)
    return x + p["gamma"] * _mlp(_layer_norm(x, p["norm"]), p, "pwconv1", "pwconv2")

  params = _assert_block_matches(block, x, reference)
  assert "dwconv" not in params


def test_sequencer_block_matches_its_formula():
  # LayerNorm, no layer scale: x + Mixer(LN(x)), then x + MLP_exact-GELU(LN(x)); the mixer
  # is the identity here (BiLSTM2D has its own reference in test_token_mixers).
  x = ref.normal(1, (2, 3, 5, 8))
  block = metaformer.MetaFormerBlock(mixer="identity", norm="layer", layer_scale_init=0.0,
                                     mlp_ratio=3.0, approximate_gelu=False)

  def reference(x, p):
    x = x + _layer_norm(x, p["norm1"])
    return x + _mlp(_layer_norm(x, p["norm2"]), p["mlp"])

  params = _assert_block_matches(block, x, reference)
  assert params["mlp"]["Dense_0"]["kernel"].shape == (8, 24)


def test_spectformer_spectral_block_matches_its_formula():
  # GFNet's block on a 3x4 token grid: x + MLP(LN(Filter(LN(x)))).
  x = ref.normal(2, (2, 12, 8))
  block = vit.Encoder1DBlock(num_heads=2, mlp_dim=16, spectral_grid=(3, 4),
                             approximate_gelu=False)

  def reference(x, p):
    y = _layer_norm(x, p["LayerNorm_0"]).reshape(2, 3, 4, 8)
    y = ref_spectral_filter(y, p["SpectralFilter"]).reshape(2, 12, 8)
    return x + _mlp(_layer_norm(y, p["LayerNorm_1"]), p["MlpBlock"])

  params = _assert_block_matches(block, x, reference, output=lambda out: out[0])
  assert "MultiHeadAttention" not in params


def _conv_bn(x, p, kernel, act=True):
  """Conv (no bias), BatchNorm at its initial statistics (mean 0, variance 1), SiLU."""
  y = conv(x, p["conv"]["kernel"], same(kernel))
  y = y / jnp.sqrt(1.0 + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  return jax.nn.silu(y) if act else y


def ref_mobilevit_block(x, p, depth):
  b, h, w, c = x.shape
  y = conv(_conv_bn(x, p["local"], 3), p["to_tokens"]["conv"]["kernel"], same(1))
  d = y.shape[-1]
  offsets = [(i, j) for i in range(2) for j in range(2)]
  # The pixels at offset (i, j) of every 2x2 patch (patches row-major), one sequence per offset.
  s = jnp.concatenate([y[:, i::2, j::2].reshape(b, -1, d) for i, j in offsets], axis=0)
  for layer in range(depth):
    a = p[f"layer_{layer}_attention"]
    z = _layer_norm(s, p[f"layer_{layer}_norm1"], 1e-5)
    q, k, v = (jnp.einsum("bte,ehd->bthd", z, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    s = s + jnp.einsum("bthd,hde->bte", ref.softmax_attention(q, k, v),
                       a["out"]["kernel"]) + a["out"]["bias"]
    z = _layer_norm(s, p[f"layer_{layer}_norm2"], 1e-5)
    s = s + dense(jax.nn.silu(dense(z, p[f"layer_{layer}_ffn_0"])), p[f"layer_{layer}_ffn_1"])
  s = _layer_norm(s, p["norm"], 1e-5).reshape(4, b, h // 2, w // 2, d)
  out = jnp.zeros((b, h, w, d), y.dtype)
  for n, (i, j) in enumerate(offsets):
    out = out.at[:, i::2, j::2].set(s[n])
  y = _conv_bn(out, p["from_tokens"], 1)
  return _conv_bn(jnp.concatenate([x, y], axis=-1), p["fusion"], 3)


def test_mobilevit_block_matches_its_formula():
  # Width 6 -> d 8, a 4x6 map (a 2x3 patch grid), 2 transformer layers of 2 heads; eval mode.
  x = ref.normal(4, (2, 4, 6, 6))
  block = mobilevit.MobileViTBlock(dim=8, depth=2, num_heads=2)
  stats = init_batch_stats(block, x)["batch_stats"]
  leaves, tree = jax.tree.flatten(random_params(block, x))
  ref.assert_matches(
      lambda x, *leaves: block.apply({"params": jax.tree.unflatten(tree, leaves),
                                      "batch_stats": stats}, x),
      lambda x, *leaves: ref_mobilevit_block(x, jax.tree.unflatten(tree, leaves), 2),
      [x, *leaves], tol=TOL)


TINY = {
    "hornet": convnext.Model(num_classes=3, depths=(1, 1), dims=(8, 16), stem_size=2,
                             mixers="gnconv", mixer_args=({"order": 2}, {"order": 3})),
    "sequencer": metaformer.Model(num_classes=3, variant="sequencer2d_s", depths=(1, 1),
                                  dims=(8, 16), patch_embeddings=((2, 2, 0), (2, 2, 0))),
    "spectformer": vit.Model(num_classes=3, variant="spectformer_t", width=16, depth=2,
                             num_heads=2, mlp_dim=32, patch_size=(2, 4), spectral_layers=(0,),
                             head_zeroinit=False),
    "mobilevit": mobilevit.Model(num_classes=3, channels=(8, 8, 16, 16, 16), dims=(8, 8, 8),
                                 expansion=2, head_channels=16, depths=(1, 1, 1),
                                 strides=(1, 1, 2, 1, 1, 1)),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_tiny_model_forward_and_train_step(family):
  model = TINY[family]
  x = ref.normal(3, (4, 8, 12, 3))  # non-square; SpectFormer's 4x3 grid has an odd width
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  assert out.shape == (4, 3) and out.dtype == jnp.float32
  before, after, loss = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3), steps=2)
  assert np.all(np.isfinite(loss)) and loss[-1] < loss[0], loss
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed


def test_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda model: jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  tiny = dict(num_classes=2, depths=(1, 1), dims=(8, 16), stem_size=2)
  with pytest.raises(ValueError, match="mixers must be None, a token mixer name"):
    build(convnext.Model(**tiny, mixers="no_such_mixer"))
  with pytest.raises(ValueError, match="one of those .or None. per stage .2."):
    build(convnext.Model(**tiny, mixers=("gnconv",)))
  with pytest.raises(TypeError, match="mixer_args must be a dict or one dict per stage"):
    build(convnext.Model(**tiny, mixers="gnconv", mixer_args=({"order": 2},)))
  with pytest.raises(ValueError, match="unknown ConvNeXt variant 'hornet_x'.*hornet_b"):
    convnext.decode_variant("hornet_x")
  meta = dict(num_classes=2, depths=(1, 1), dims=(8, 16))
  with pytest.raises(ValueError, match="patch_embeddings must give per stage .2."):
    build(metaformer.Model(**meta, patch_embeddings=((2, 2, 0),)))
  with pytest.raises(ValueError, match="patch_embeddings must give"):
    build(metaformer.Model(**meta, patch_embeddings=((2, 0, 0), (2, 2, 0))))
  with pytest.raises(ValueError, match=r"patch_embeddings\[1\] is None but dims change"):
    build(metaformer.Model(**meta, patch_embeddings=((2, 2, 0), None)))
  with pytest.raises(ValueError, match="unknown norm 'batch'"):
    build(metaformer.Model(**meta, norm="batch"))
  with pytest.raises(ValueError, match="unknown head_norm 'none'"):
    build(metaformer.Model(**meta, head_norm="none"))
  with pytest.raises(ValueError, match="unknown MetaFormer variant.*sequencer2d_l"):
    metaformer.decode_variant("sequencer2d_xl")
  spect = dict(num_classes=2, width=8, depth=2, num_heads=2, patch_size=(4, 4),
               spectral_layers=(0,))
  with pytest.raises(ValueError, match="spectral_layers filter the patch grid"):
    build(vit.Model(**spect, pool_type="cls"))
  with pytest.raises(ValueError, match="spectral_layers filter the patch grid"):
    build(vit.Model(**spect, num_registers=1))
  with pytest.raises(ValueError, match="spectral_layers makes the blocks differ"):
    build(vit.Model(**spect, scan_layers=True))
  with pytest.raises(ValueError, match=r"spectral_layers must be a sequence of block indices"):
    build(vit.Model(**dict(spect, spectral_layers=(2,))))
  with pytest.raises(ValueError, match="spectformer_t, spectformer_xs"):
    vit.decode_variant("spectformer_l")
  assert "model.spectral_layers" in lrp.unsupported(vit.Model(**spect))
  with pytest.raises(ValueError, match="unknown MobileViT variant 'M'; expected one of XXS"):
    mobilevit.decode_variant("M")
  tiny = dict(num_classes=2, variant="XXS")
  with pytest.raises(ValueError, match=r"must be divisible by the strides"):
    build(mobilevit.Model(**tiny))  # 8x8 images under strides 2^5 (the paper's 256x256)
  with pytest.raises(ValueError, match="strides must be 6 positive ints"):
    build(mobilevit.Model(**tiny, strides=(1, 1, 1)))
  with pytest.raises(ValueError, match=r"dims \(64, 80, 96\) must be divisible by num_heads"):
    build(mobilevit.Model(**tiny, num_heads=7))


def test_every_config_builds():
  digits = _config_module("mixer_families_digits")
  i1k = _config_module("mixer_families_i1k")
  families = dict(convnext=convnext, metaformer=metaformer, vit=vit, mobilevit=mobilevit)
  assert all(models.get(name) is module for name, module in families.items())
  for arg in ("family=hornet", "family=sequencer", "family=spectformer,attention=sigmoid",
              "family=mobilevit"):
    config = digits.get_config(arg)
    model = families[config.model_name].Model(num_classes=10, **config.model.to_dict())
    assert count(abstract(model, jnp.zeros((1, 16, 16, 3)))) > 0
  for variant, name in (("hornet_s", "convnext"), ("sequencer2d_l", "metaformer"),
                        ("spectformer_b", "vit"), ("mobilevit_xs", "mobilevit")):
    config = i1k.get_config(f"variant={variant}")
    assert config.model_name == name and config.model.variant in (variant, "XS")
    model = families[name].Model(**config.model.to_dict())
    if name == "vit":
      assert model.spectral_layers == (0, 1, 2, 3) and not model.approximate_gelu
    elif name == "mobilevit":
      assert model.dims == (96, 120, 144) and model.dropout == 0.1
    else:
      assert len(model.depths) == 4
    local = i1k.get_config(f"variant={variant},runlocal")
    side = local.input.image_size
    assert count(abstract(families[name].Model(**local.model.to_dict()),
                          jnp.zeros((1, side, side, 3)))) > 0
  assert i1k.get_config("variant=hornet_b").model.drop_path_rate == 0.5
  assert i1k.get_config("variant=sequencer2d_m").model.drop_path == 0.2
  for module, bad in ((digits, "family=resnet"), (i1k, "variant=hornet_l"),
                      (i1k, "foo=1")):
    with pytest.raises(ValueError):
      module.get_config(bad)


def _train_digits_config(workdir, family):
  train_digits_config(workdir, "mixer_families_digits", arg=f"family={family},runlocal")


def test_digits_config_trains_through_main(tmp_path):
  _train_digits_config(tmp_path, "spectformer")  # the family that compiles fastest


@pytest.mark.extended
@pytest.mark.parametrize("family", ["hornet", "sequencer", "mobilevit"])
def test_digits_config_of_every_family_trains_through_main(tmp_path, family):
  _train_digits_config(tmp_path, family)
