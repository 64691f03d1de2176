r"""A small LeViT on scikit-learn's handwritten digits: three stages with shrinking attention on
16x16 images.

    python -m big_attn.main --config=configs/levit_digits.py --workdir=/tmp/levit_digits

A stem of one 3x3 stride-2 convolution gives an 8x8 map, shrunk to 4x4 and 2x2 between the
stages (widths 32, 48, 64; key_dim 8).

Args (`--config=configs/levit_digits.py:attention=softmax,steps=500`):
  attention: registry name of the blocks' attention op (`levit_bias`, the paper's).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="levit_bias", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.025)

  config.model_name = "levit"
  config.model = dict(widths=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depths=(1, 1, 1),
                      patch_size=2, attention=arg.attention, dtype="float32")
  return config_lib.declare_model_settings(config)
