r"""ViT on CIFAR-10 from a local TFDS directory (prepare it with `tfds build cifar10`).

    python -m big_attn.main --config=configs/vit_cifar10.py:variant=S/4 --workdir=DIR \
        --config.input.data_dir=~/tensorflow_datasets

Args: variant (ViT size/patch, default S/4), attention (registry op name), steps, runlocal
(a tiny model and a few steps).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/4", attention="softmax", steps=50_000,
                             runlocal=False)
  config = config_lib.base_config()

  config.input.name = "tfds:cifar10"
  config.input.image_size = 32
  config.input.batch_size = 8 if arg.runlocal else 512
  config.input.augment = dict(crop_padding=4, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.2

  config.model_name = "vit"
  config.model = dict(num_classes=10, variant="Ti/8" if arg.runlocal else arg.variant,
                      posemb="sincos2d", pool_type="gap", attention=arg.attention, dropout=0.0,
                      dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 1e-3
  config.schedule = dict(warmup_steps=5 if arg.runlocal else 2500, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 10 if arg.runlocal else arg.steps
  config.log_every = 1 if arg.runlocal else 100
  config.ckpt_every = 10 if arg.runlocal else 2000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 2000,
                           split="test", batch_size=8 if arg.runlocal else 1000)
  return config_lib.declare_model_settings(config)
