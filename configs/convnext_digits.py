r"""A small ConvNeXt on scikit-learn's handwritten digits: minutes on a laptop.

    python -m big_attn.main --config=configs/convnext_digits.py --workdir=/tmp/convnext_digits

The trained run is also the convnet teacher of configs/deit_digits.py (see there).

Args (`--config=configs/convnext_digits.py:steps=500,module=ela`):
  module: a CNN attention module in every block (`big_attn.models.convnext.ATTENTION_MODULES`;
    default none), also `--config.model.attention_module=NAME`.
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib

# Shared with configs/deit_digits.py, whose teacher is this model.
MODEL = dict(depths=(1, 1, 2), dims=(32, 64, 128), stem_size=2, drop_path_rate=0.0,
             dtype="float32")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, module="", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.05)

  config.model_name = "convnext"
  config.model = dict(MODEL, attention_module=arg.module or None)
  return config_lib.declare_model_settings(config)
