r"""A small CrossViT on scikit-learn's handwritten digits: two branches on 16x16 images.

    python -m big_attn.main --config=configs/crossvit_digits.py --workdir=/tmp/crossvit_digits

The small branch embeds 2x2 patches (an 8x8 grid, width 32), the large branch 4x4 patches (a
4x4 grid, width 64); two multi-scale stages of (1, 2) blocks, each followed by the
cross-attention fusion of the class tokens.

Args (`--config=configs/crossvit_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the branches' attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "crossvit"
  config.model = dict(widths=(32, 64), num_heads=(2, 2), depths=(1, 2), num_stages=2,
                      mlp_ratio=2, patch_sizes=(2, 4), attention=arg.attention, dropout=0.0,
                      dtype="float32")
  return config_lib.declare_model_settings(config)
