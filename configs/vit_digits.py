r"""A small ViT on scikit-learn's handwritten digits: the embedded default, minutes on a laptop.

    python -m big_attn.main --config=configs/vit_digits.py --workdir=/tmp/vit_digits

Args (`--config=configs/vit_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
Measured numbers are in experiments/results/vit_digits.md.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "vit"
  config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                      posemb="learn", pool_type="gap", attention=arg.attention, dropout=0.0,
                      dtype="float32")
  return config_lib.declare_model_settings(config)
