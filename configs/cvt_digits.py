r"""A small CvT on scikit-learn's handwritten digits (16x16): the family's laptop check.

    python -m big_attn.main --config=configs/cvt_digits.py --workdir=/tmp/cvt_digits

Three stages with 3x3/2 convolutional token embeddings (8x8, 4x4, 2x2 token maps), the
convolutional projection (keys and values at stride 2) and a class token in the last stage.

Args (`--config=configs/cvt_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False)
  config = config_lib.base_config()
  config.seed = 0

  config.input.name = "digits"
  config.input.image_size = 16
  config.input.batch_size = 64
  config.input.augment = dict(crop_padding=2, flip=False)
  config.input.mixup = 0.0

  config.model_name = "cvt"
  config.model = dict(dims=(32, 64, 64), num_heads=(1, 2, 2), depths=(1, 1, 2),
                      patch_size=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
                      attention=arg.attention, drop_path_rate=0.0, dtype="float32")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.99, weight_decay=0.05)
  config.lr = 2e-3
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 100, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 20 if arg.runlocal else arg.steps
  config.log_every = 10 if arg.runlocal else 100
  config.ckpt_every = 10 if arg.runlocal else 500
  config.max_to_keep = 2
  config.evals.eval = dict(type="classification", every=config.total_steps // 3 or 1,
                           split="test", batch_size=128)
  return config
