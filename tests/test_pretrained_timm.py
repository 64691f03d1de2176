"""`big_attn.pretrained.from_timm`: tiny timm models with random weights (eval mode) and their
converted big_attn models compute the same logits; unsupported configurations are refused."""
import flax.linen as nn
import jax
import numpy as np
import pytest

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

# pylint: disable=wrong-import-position
from big_attn.models import convnext, deit, hvit, maxvit, metaformer, vit
from big_attn.pretrained import ConversionError, from_timm
from timm.models import convnext as timm_convnext
from timm.models import davit as timm_davit
from timm.models import deit as timm_deit
from timm.models import maxxvit as timm_maxxvit
from timm.models import metaformer as timm_metaformer
from timm.models import vision_transformer as timm_vit

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _randomize(model, seed=0):
  """Random weights everywhere, BatchNorm statistics and layer scales included, eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + noise.abs())
      elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "pre_norm.weight")):
        tensor.copy_(1 + 0.2 * noise)
      else:
        tensor.copy_(0.3 * noise)
  return model.eval()


def _check_parity(model, size, expected_cls, **overrides):
  """Logits of the timm model and of its conversion agree (max relative error <= 1e-4)."""
  images = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(images)).numpy()
  module, variables = from_timm(model, **overrides)
  assert isinstance(module, expected_cls)
  got = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables,
                                                              images.transpose(0, 2, 3, 1))
  assert got.shape == want.shape
  error = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert error <= 1e-4, error
  return module, variables


@pytest.mark.parametrize("kwargs", [
    dict(),                                                            # class token, 'token'
    dict(global_pool="avg", class_token=False),                        # fc_norm after pooling
    dict(global_pool="map", class_token=False, reg_tokens=2, no_embed_class=True),
], ids=["token", "avg_fc_norm", "map_registers"])
def test_vit(kwargs):
  module, _ = _check_parity(_randomize(timm_vit.VisionTransformer(**VIT, **kwargs)), 32,
                            vit.Model)
  assert module.fc_norm == (kwargs.get("global_pool") == "avg")


def test_deit_distilled_averages_the_two_heads():
  _check_parity(_randomize(timm_deit.VisionTransformerDistilled(**VIT)), 32, deit.Model)


def test_convnext():
  model = timm_convnext.ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 16, 24), num_classes=5)
  _check_parity(_randomize(model), 32, convnext.Model)


def test_maxvit_with_batch_norm_statistics():
  cfg = timm_maxxvit._tf_cfg()  # pylint: disable=protected-access
  cfg["transformer_cfg"].window_size = cfg["transformer_cfg"].grid_size = (2, 2)
  model = timm_maxxvit.MaxxVit(timm_maxxvit.MaxxVitCfg(  # a strided and a plain block
      embed_dim=(32,), depths=(2,), block_type=("M",), stem_width=16, stem_bias=True,
      head_hidden_size=48, **cfg), img_size=16, num_classes=5)
  module, variables = _check_parity(_randomize(model), 16, maxvit.Model)
  assert module.conv_norm == "batch" and module.layer_norm_eps == 1e-5
  assert set(variables) == {"params", "batch_stats"}


def test_poolformer():
  model = timm_metaformer.MetaFormer(
      depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), downsample_norm=None,
      token_mixers=timm_metaformer.Pooling, mlp_act=torch.nn.GELU, mlp_bias=True,
      norm_layers=timm.layers.GroupNorm1, layer_scale_init_values=1e-5,
      res_scale_init_values=None, use_mlp_head=False, num_classes=5)
  module, _ = _check_parity(_randomize(model), 32, metaformer.Model)
  assert module.head_norm == "layer"


def test_davit():
  model = timm_davit.DaVit(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16),
                           num_heads=(1, 2, 2, 2), window_size=2, num_classes=5)
  _check_parity(_randomize(model), 64, hvit.Model)


def test_state_dict_and_name_give_the_models_own_conversion():
  """`from_timm(name, state_dict)` builds the architecture (no download), reads the classifier
  width from the checkpoint, and converts exactly what `from_timm(model)` converts; overrides
  reach the big_attn model."""
  model = _randomize(timm.create_model("test_vit", pretrained=False, num_classes=7))
  _, variables = from_timm(model)
  named, named_variables = from_timm("test_vit", model.state_dict(), attention="sigmoid",
                                     scan_layers=True)
  assert named.num_classes == 7 and named.attention == "sigmoid"
  blocks = variables["params"]["Transformer"]
  stacked = named_variables["params"]["Transformer"]["encoderblock"]
  np.testing.assert_array_equal(
      stacked["MlpBlock"]["Dense_0"]["kernel"][1],
      blocks["encoderblock_1"]["MlpBlock"]["Dense_0"]["kernel"])
  images = jax.ShapeDtypeStruct((1, *model.patch_embed.img_size, 3), np.float32)
  abstract = jax.eval_shape(lambda x: named.init(jax.random.key(0), x), images)["params"]
  assert jax.tree.map(np.shape, named_variables["params"]) == jax.tree.map(
      np.shape, nn.meta.unbox(abstract))


def test_an_op_with_its_own_parameters_gets_them_from_the_model():
  model = _randomize(timm_vit.VisionTransformer(**VIT))
  _, converted = from_timm(model)
  module, variables = from_timm(model, attention="gated_attention")
  block = variables["params"]["Transformer"]["encoderblock_1"]["MultiHeadAttention"]
  assert module.attention == "gated_attention" and "op_params" in block
  np.testing.assert_array_equal(
      block["query"]["kernel"],
      converted["params"]["Transformer"]["encoderblock_1"]["MultiHeadAttention"]["query"][
          "kernel"])


def test_vit_layer_scale():
  module, _ = _check_parity(_randomize(timm_vit.VisionTransformer(**VIT, init_values=1e-5)), 32,
                            vit.Model)
  assert module.layer_scale_init is not None


def test_unsupported_configurations_are_refused_naming_the_field():
  with pytest.raises(ConversionError, match="not created by it.*layer_scale_1"):
    from_timm(timm_deit.VisionTransformerDistilled(**VIT, init_values=1e-5))
  with pytest.raises(ConversionError, match="blocks.0.attn.q_norm"):
    from_timm(timm_vit.VisionTransformer(**VIT, qk_norm=True))
  with pytest.raises(ConversionError, match="class_token"):
    from_timm(timm_vit.VisionTransformer(**VIT, global_pool="avg"))
  rw = timm_maxxvit.MaxxVit(timm_maxxvit.MaxxVitCfg(
      embed_dim=(32,), depths=(1,), block_type=("M",), stem_width=16,
      **timm_maxxvit._rw_max_cfg(window_size=(2, 2))),  # pylint: disable=protected-access
                            img_size=16, num_classes=5)
  with pytest.raises(ConversionError, match="stem"):
    from_timm(rw)
  with pytest.raises(ConversionError, match="no big_attn converter.*VisionTransformer"):
    from_timm(timm.create_model("resnet10t", pretrained=False))
  with pytest.raises(ConversionError, match="does not fit"):
    from_timm(timm_vit.VisionTransformer(**VIT),
              timm_vit.VisionTransformer(**dict(VIT, embed_dim=64)).state_dict())
  with pytest.raises(ValueError, match="needs the checkpoint's state_dict"):
    from_timm("vit_tiny_patch16_224")
  with pytest.raises(TypeError, match="timm model or a timm model name"):
    from_timm(3)
