r"""A small LIT on scikit-learn's handwritten digits: two MLP-only stages, two attending stages,
deformable token merging between them, on 16x16 images.

    python -m big_attn.main --config=configs/lit_digits.py --workdir=/tmp/lit_digits

A 2x2 patch embedding gives an 8x8 map, merged to 4x4, 2x2 and 1x1 (widths 16, 32, 48, 64).

Args (`--config=configs/lit_digits.py:attention=softmax,steps=500`):
  attention: registry name of the attending stages' op (`window`, over the whole map: the
    paper's relative-position attention).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="window", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.05)

  config.model_name = "lit"
  config.model = dict(widths=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1),
                      patch_size=2, attention=arg.attention, dtype="float32")
  return config_lib.declare_model_settings(config)
