r"""A small PiT on scikit-learn's handwritten digits: three stages on 16x16 images.

    python -m big_attn.main --config=configs/pit_digits.py --workdir=/tmp/pit_digits

The 4x4 embedding with stride 2 gives a 7x7 grid, pooled to 4x4 then 2x2 while the width
doubles (32, 64, 128).

Args (`--config=configs/pit_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "pit"
  config.model = dict(base_dim=32, num_heads=(1, 2, 4), depths=(1, 2, 1), patch_size=4,
                      patch_stride=2, attention=arg.attention, dropout=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
