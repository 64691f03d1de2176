r"""CrossViT on ImageNet-2012 (the paper's recipe, DeiT's: 300 epochs, AdamW, lr 4e-3 at batch
4096 scaled linearly, weight decay 0.05, 30 warm-up epochs, mixup 0.8).

    python -m big_attn.main --config=configs/crossvit_i1k.py:variant=S --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

The model takes the 224x224 input and resizes it to 240x240 for its small-patch branch (the
paper trains at 240). RandAugment, random erasing, CutMix and repeated augmentation of the
paper are not part of this recipe.

Args: variant (Ti, S, B, 9, 15, 18; default S), attention (registry op name), epochs, runlocal
(CrossViT-Ti, few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import crossvit
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  crossvit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=30)
  config.lr = 4e-3 * config.input.batch_size / 4096

  config.model_name = "crossvit"
  config.model = dict(num_classes=1000, variant="Ti" if arg.runlocal else arg.variant,
                      attention=arg.attention, dropout=0.0, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
