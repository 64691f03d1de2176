r"""A small MViTv2 on scikit-learn's handwritten digits: three stages on 16x16 images.

    python -m big_attn.main --config=configs/mvit_digits.py --workdir=/tmp/mvit_digits

The 3x3 embedding with stride 2 gives an 8x8 grid; the pooling attention halves it at the
start of stages 2 and 3 (8x8, 4x4, 2x2) while the width doubles (32, 64, 128), with keys and
values pooled at stride 2 in the first stage. The attention is the paper's decomposed relative
position embedding (`decomposed_relpos`) by default.

Measured (default arguments, seed 0, float32, a shared 2-core CPU under heavy load): train
loss 0.40 at step 100 and 0.03 at 500 (chance: ln 10 = 2.30); held-out accuracy 98.3% at step
500, 99.3% at steps 1000 and 1500 (eval loss 0.073, 0.024, 0.047).

Args (`--config=configs/mvit_digits.py:attention=softmax,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="decomposed_relpos", steps=1500, runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "mvit"
  config.model = dict(dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 2),
                      patch_size=3, patch_stride=2, patch_padding=1, stride_q=(1, 2, 2),
                      stride_kv=2, attention=arg.attention, dtype="float32")
  return config_lib.declare_model_settings(config)
