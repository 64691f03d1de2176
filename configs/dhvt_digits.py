r"""A small DHVT on scikit-learn's handwritten digits: SOPE, head-interaction attention and DAFF
on 16x16 images.

    python -m big_attn.main --config=configs/dhvt_digits.py --workdir=/tmp/dhvt_digits

Two 3x3 stride-2 convolutions (SOPE, patch size 4) give a 4x4 map of width 32; four blocks with
4 heads.

Args (`--config=configs/dhvt_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of HI-MHSA's op (softmax, the paper's).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.05)

  config.model_name = "dhvt"
  config.model = dict(width=32, depth=4, num_heads=4, patch_size=4, attention=arg.attention,
                      dtype="float32")
  return config_lib.declare_model_settings(config)
