r"""A small EfficientViT on scikit-learn's handwritten digits: three stages of sandwich blocks
with cascaded group attention on 16x16 images.

    python -m big_attn.main --config=configs/efficientvit_digits.py --workdir=/tmp/efficientvit

A 2x2 patch embedding (one stride-2 convolution) gives an 8x8 map, attended in 4x4 windows,
then 4x4 and 2x2 maps after the subsample blocks (widths 16, 32, 48).

Args (`--config=configs/efficientvit_digits.py:attention=softmax,steps=500`):
  attention: registry name of the attention op (`cascaded_group_attention`, the paper's).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="cascaded_group_attention", steps=1500,
                             runlocal=False)
  config = config_lib.digits_config(arg, weight_decay=0.025)

  config.model_name = "efficientvit"
  config.model = dict(widths=(16, 32, 48), depths=(1, 1, 1), num_heads=(2, 2, 2), key_dim=8,
                      kernel_size=3, window_size=4, patch_size=2, attention=arg.attention,
                      dtype="float32")
  return config_lib.declare_model_settings(config)
