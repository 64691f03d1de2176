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


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  pit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 5e-4 * config.input.batch_size / 512

  config.model_name = "pit"
  config.model = dict(num_classes=1000, variant="Ti" if arg.runlocal else arg.variant,
                      attention=arg.attention, dropout=0.0, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
