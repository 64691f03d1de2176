r"""A small ConvNeXt on scikit-learn's handwritten digits: minutes on a laptop.

    python -m big_attn.main --config=configs/convnext_digits.py --workdir=/tmp/convnext_digits

The trained run is also the convnet teacher of configs/deit_digits.py (see there).

Args (`--config=configs/convnext_digits.py:steps=500`):
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib

# Shared with configs/deit_digits.py, whose teacher is this model.
MODEL = dict(depths=(1, 1, 2), dims=(32, 64, 128), stem_size=2, drop_path_rate=0.0,
             dtype="float32")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1500, runlocal=False)
  config = config_lib.base_config()
  config.seed = 0

  config.input.name = "digits"
  config.input.image_size = 16  # stem 2 -> 8x8, 4x4, 2x2 maps
  config.input.batch_size = 64
  config.input.augment = dict(crop_padding=2, flip=False)
  config.input.mixup = 0.0

  config.model_name = "convnext"
  config.model = dict(MODEL)

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
