r"""A tiny MaxViT on scikit-learn's handwritten digits (16x16): the family's laptop check.

    python -m big_attn.main --config=configs/maxvit_digits.py --workdir=/tmp/maxvit_digits

Two stages (feature maps 4x4 and 2x2 after the stride-2 stem) of one MaxViT block each, with
2x2 windows and a 2x2 grid, so block and grid attention differ in the first stage.

Args (`--config=configs/maxvit_digits.py:block_attention=window,steps=500`):
  block_attention, grid_attention: registry names of the two attention ops
    (`big_attn.ops.names()`); defaults "window" and "grid".
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
Measured (`steps=300`, seed 0, float32, a shared 2-core CPU, about 4 minutes): test accuracy
58.7% at step 100, 89.7% at 200, 96.0% at 300 (eval loss 0.29).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, block_attention="window", grid_attention="grid", steps=1000,
                             runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "maxvit"
  config.model = dict(embed_dims=(32, 64), depths=(1, 1), stem_width=32, head_hidden=64,
                      head_dim=16, partition_size=2, block_attention=arg.block_attention,
                      grid_attention=arg.grid_attention, drop_path=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
