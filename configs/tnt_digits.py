r"""A small TNT on scikit-learn's handwritten digits: 4x4 patches of 16x16 images.

    python -m big_attn.main --config=configs/tnt_digits.py --workdir=/tmp/tnt_digits

Each 4x4 patch (a 4x4 grid of them, outer width 64) holds 4x4 words of one pixel each
(`pixel_stride=1`, inner width 8) that the inner transformer mixes within the patch.

Args (`--config=configs/tnt_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the outer attention op (`big_attn.ops.names()`).
  inner_attention: registry name of the inner attention op.
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", inner_attention="softmax", steps=1500,
                             runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "tnt"
  config.model = dict(width=64, depth=2, num_heads=2, inner_width=8, inner_heads=2,
                      patch_size=4, pixel_stride=1, mlp_ratio=2, inner_mlp_ratio=2,
                      attention=arg.attention, inner_attention=arg.inner_attention,
                      dropout=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
