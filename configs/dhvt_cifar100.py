r"""DHVT on CIFAR-100 from a local TFDS directory (prepare it with `tfds build cifar100`), the
paper's small-dataset setting: 32x32 images, patch size 4, 300 epochs of AdamW at batch 256, lr
1e-3, weight decay 0.05, 5 warm-up epochs, cosine decay, mixup 0.8.

    python -m big_attn.main --config=configs/dhvt_cifar100.py:variant=S --workdir=DIR \
        --config.input.data_dir=~/tensorflow_datasets

DHVT-T has 4 heads and DHVT-S 8 here (6.0M and 23.4M parameters, as the paper). RandAugment,
random erasing, CutMix and label smoothing of the authors' recipe are not part of this one.

Args: variant (T, S; default S), attention (registry op name; softmax, the paper's), epochs,
runlocal (a narrow DHVT and a few steps).
"""
from big_attn.models import dhvt
from big_attn.train import config_lib

_CIFAR_HEADS = {"T": 4, "S": 8}
_TRAIN_IMAGES = 50_000


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  dhvt.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.base_config()

  config.input.name = "tfds:cifar100"
  config.input.image_size = 32
  config.input.batch_size = 8 if arg.runlocal else 256
  config.input.augment = dict(crop_padding=4, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8
  steps_per_epoch = _TRAIN_IMAGES // config.input.batch_size

  config.model_name = "dhvt"
  config.model = dict(num_classes=100, variant=arg.variant,
                      num_heads=_CIFAR_HEADS[arg.variant], patch_size=4,
                      attention=arg.attention, dtype="bfloat16")
  if arg.runlocal:
    config.model.update(width=32, depth=2, num_heads=4)

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 1e-3
  config.schedule = dict(warmup_steps=5 if arg.runlocal else 5 * steps_per_epoch,
                         decay_type="cosine")
  config.total_steps = 10 if arg.runlocal else arg.epochs * steps_per_epoch
  config.log_every = 1 if arg.runlocal else 100
  config.ckpt_every = 10 if arg.runlocal else 2000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 2000,
                           split="test", batch_size=8 if arg.runlocal else 1000)
  return config_lib.declare_model_settings(config)
