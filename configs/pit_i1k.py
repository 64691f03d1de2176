r"""PiT on ImageNet-2012 (the paper's recipe, DeiT's: 300 epochs, AdamW, lr 5e-4 x batch / 512,
weight decay 0.05, 5 warm-up epochs, mixup 0.8).

    python -m big_attn.main --config=configs/pit_i1k.py:variant=S --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing, CutMix and repeated augmentation of the paper are not part of this
recipe.

Args: variant (Ti, XS, S, B; default S), attention (registry op name), epochs, runlocal (PiT-Ti,
few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import pit
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  pit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 1024
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "pit"
  config.model = dict(num_classes=1000, variant="Ti" if arg.runlocal else arg.variant,
                      attention=arg.attention, dropout=0.0, dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 5e-4 * config.input.batch_size / 512
  steps = arg.epochs * _TRAIN_EXAMPLES // config.input.batch_size
  warmup = min(5 * _TRAIN_EXAMPLES // config.input.batch_size, steps)  # 5 epochs
  config.schedule = dict(warmup_steps=2 if arg.runlocal else warmup, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 5 if arg.runlocal else steps
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
