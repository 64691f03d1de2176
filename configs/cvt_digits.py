r"""A small CvT on scikit-learn's handwritten digits (16x16): the family's laptop check.

    python -m big_attn.main --config=configs/cvt_digits.py --workdir=/tmp/cvt_digits

Three stages with 3x3/2 convolutional token embeddings (8x8, 4x4, 2x2 token maps), the
convolutional projection (keys and values at stride 2) and a class token in the last stage.

Args (`--config=configs/cvt_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.05)

  config.model_name = "cvt"
  config.model = dict(dims=(32, 64, 64), num_heads=(1, 2, 2), depths=(1, 1, 2),
                      patch_size=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
                      attention=arg.attention, drop_path_rate=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
