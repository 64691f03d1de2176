r"""TNT on ImageNet-2012 (the paper's recipe, DeiT's: 300 epochs, AdamW, lr 1e-3 at batch 1024,
weight decay 0.05, 5 warm-up epochs, mixup 0.8).

    python -m big_attn.main --config=configs/tnt_i1k.py:variant=S --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing, CutMix and repeated augmentation of the paper are not part of this
recipe.

Args: variant (S, B; default S), attention (registry op name), epochs, runlocal (TNT-S, few
steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import tnt
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  tnt.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 1e-3 * config.input.batch_size / 1024

  config.model_name = "tnt"
  config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                      dropout=0.0, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
