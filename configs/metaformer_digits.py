r"""A small MetaFormer on scikit-learn's handwritten digits, any token mixer per stage.

    python -m big_attn.main --config=configs/metaformer_digits.py --workdir=/tmp/metaformer_digits

Args (`--config=configs/metaformer_digits.py:mixer=conv+conv+attention+attention,steps=500`):
  mixer: a token mixer for every stage (`big_attn.models.metaformer.mixer_names()`), or one per
    stage joined by "+" (CAFormer: conv+conv+attention+attention; FasterViT's hierarchical
    attention: conv+conv+hat+hat, windows of 4 with one carrier token each).
  attention: registry name of the op of the `attention` mixer (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mixer="pool", attention="softmax", steps=1500,
                             runlocal=False)
  mixers = arg.mixer.split("+")
  if len(mixers) not in (1, 4):
    raise ValueError(f"config arg mixer must be one mixer name or four joined by '+', got "
                     f"{arg.mixer!r}")
  config = config_lib.digits_config(arg, image_size=32)

  config.model_name = "metaformer"
  config.model = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 64),
                      mixers=mixers[0] if len(mixers) == 1 else tuple(mixers),
                      attention=arg.attention,
                      mixer_args=dict(attention=dict(head_dim=16), hat=dict(head_dim=16, window=4)),
                      layer_scale_init=1e-2, drop_path=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
