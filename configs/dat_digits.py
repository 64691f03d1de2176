r"""A small DAT++ on scikit-learn's handwritten digits: three stages on 16x16 images.

    python -m big_attn.main --config=configs/dat_digits.py --workdir=/tmp/dat_digits

DAT++'s stem at stride 2 (one 3x3/2 convolution + LayerNorm) gives an 8x8 map, then 4x4 and
2x2 after the 3x3/2 downsamplings (widths 32, 64, 128); each stage is a neighbourhood block
(5x5, clipped to the map) then a deformable block (`deformable_attention`, reference points
every 4, 2, 1 tokens, one offset group per two heads), with the local perception unit and
ConvFFN of DAT++.

Measured (default arguments, seed 0, float32, 641,638 parameters, a shared 2-core CPU, 23 min):
train loss 0.53 at step 100 and 6e-5 at 1500 (chance: ln 10 = 2.30); held-out accuracy 98.7%
at step 500, 99.3% at steps 1000 and 1500 (eval loss 0.065, 0.051, 0.047).

Args (`--config=configs/dat_digits.py:attention=softmax,steps=500`):
  attention: registry name of the deformable blocks' op (`deformable_attention`, the paper's).
  local_attention: registry name of the neighbourhood blocks' op (`neighborhood`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="deformable_attention",
                             local_attention="neighborhood", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "dat"
  config.model = dict(dims=(32, 64, 128), depths=(2, 2, 2), num_heads=(2, 4, 8),
                      offset_groups=(1, 2, 4), stage_spec=("ND", "ND", "ND"),
                      strides=(4, 2, 1), offset_kernels=(5, 3, 3), patch_size=2,
                      kernel_size=5, attention=arg.attention,
                      local_attention=arg.local_attention, dtype="float32")
  return config_lib.declare_model_settings(config)
