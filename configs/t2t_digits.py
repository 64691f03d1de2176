r"""A small T2T-ViT on scikit-learn's handwritten digits: two soft splits on 16x16 images.

    python -m big_attn.main --config=configs/t2t_digits.py --workdir=/tmp/t2t_digits

A 3x3 split with stride 2 (an 8x8 grid), a token layer of 32 channels, then a 3x3 split with
stride 2 (4x4 tokens) projected to the width.

Args (`--config=configs/t2t_digits.py:attention=sigmoid,token_attention=performer`):
  attention: registry name of the encoder's attention op (`big_attn.ops.names()`).
  token_attention: registry name of the token layer's op ("softmax" or "performer", ...).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", token_attention="softmax", steps=1500,
                             runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "t2t"
  config.model = dict(width=64, depth=4, num_heads=4, mlp_dim=192, token_dim=32,
                      split_kernels=(3, 3), split_strides=(2, 2), split_paddings=(1, 1),
                      token_attention=arg.token_attention, attention=arg.attention,
                      dropout=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
