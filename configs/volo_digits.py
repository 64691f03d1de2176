r"""A small VOLO on scikit-learn's handwritten digits: Outlookers, then transformer blocks and
class attention, on 16x16 images.

    python -m big_attn.main --config=configs/volo_digits.py --workdir=/tmp/volo_digits

The stride-2 stem and a 1x1 patch embedding give an 8x8 grid for the Outlookers (3x3 windows,
stride 2), downsampled to 4x4 for the transformer blocks; two class-attention blocks.

Args (`--config=configs/volo_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the transformer blocks' op (`big_attn.ops.names()`).
  local_attention: the Outlookers' op (`outlook_attention`, the paper's).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", local_attention="outlook_attention",
                             steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "volo"
  config.model = dict(depths=(1, 2), widths=(32, 64), num_heads=(2, 4), mlp_ratio=3,
                      stem_dim=16, patch_size=2, attention=arg.attention,
                      local_attention=arg.local_attention, dtype="float32")
  return config_lib.declare_model_settings(config)
