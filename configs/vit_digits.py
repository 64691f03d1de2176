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
  config = config_lib.base_config()
  config.seed = 0

  config.input.name = "digits"
  config.input.image_size = 16
  config.input.batch_size = 64
  config.input.augment = dict(crop_padding=2, flip=False)
  config.input.mixup = 0.0

  config.model_name = "vit"
  config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                      posemb="learn", pool_type="gap", attention=arg.attention, dropout=0.0,
                      dtype="float32")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.99, weight_decay=1e-4)
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
