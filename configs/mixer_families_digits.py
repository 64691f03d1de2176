r"""Small HorNet, Sequencer2D, SpectFormer, MobileViT or ConvMixer on scikit-learn's handwritten digits
(16x16).

    python -m big_attn.main --config=configs/mixer_families_digits.py:family=hornet \
        --workdir=/tmp/hornet_digits

Args (`--config=configs/mixer_families_digits.py:family=spectformer,attention=sigmoid`):
  family: hornet (`convnext` with gⁿConv of orders 2, 3, 4), sequencer (`metaformer` with
    BiLSTM2D, Sequencer2D's layout), spectformer (`vit`, spectral filters in the first 2 of 4
    blocks), mobilevit (`mobilevit`, strides 1, 1, 2, 1, 2, 1) or convmixer (`convmixer`,
    width 64, depth 4, kernel 5, patch 2).
  attention: registry name of SpectFormer's or MobileViT's attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib

_MODELS = {
    "hornet": ("convnext", dict(depths=(1, 1, 2), dims=(32, 64, 128), stem_size=2,
                                mixers="gnconv",
                                mixer_args=({"order": 2}, {"order": 3}, {"order": 4}))),
    "sequencer": ("metaformer", dict(
        depths=(1, 1, 1), dims=(32, 64, 64), mixers="bilstm2d", norm="layer",
        patch_embeddings=((4, 4, 0), (2, 2, 0), (1, 1, 0)), mlp_ratio=3.0,
        layer_scale_init=0.0, approximate_gelu=False, head_norm="token_layer")),
    "spectformer": ("vit", dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                                spectral_layers=(0, 1), pool_type="gap", approximate_gelu=False)),
    "mobilevit": ("mobilevit", dict(channels=(8, 8, 16, 16, 16), dims=(16, 16, 16), expansion=2,
                                    head_channels=32, depths=(1, 1, 1),
                                    strides=(1, 1, 2, 1, 2, 1))),
    "convmixer": ("convmixer", dict(dim=64, depth=4, kernel_size=5, patch_size=2)),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, family="hornet", attention="softmax", steps=1500,
                             runlocal=False)
  if arg.family not in _MODELS:
    raise ValueError(f"config arg family must be one of {', '.join(_MODELS)}, got "
                     f"{arg.family!r}")
  config = config_lib.digits_config(arg, weight_decay=0.05)
  config.model_name, model = _MODELS[arg.family]
  config.model = dict(model, dtype="float32")
  if arg.family in ("spectformer", "mobilevit"):
    config.model["attention"] = arg.attention
  return config_lib.declare_model_settings(config)
