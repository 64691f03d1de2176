r"""DHVT on ImageNet-2012 (DeiT's recipe, which the paper follows there: 300 epochs of AdamW at
batch 1024, lr 5e-4 x batch / 512, weight decay 0.05, 5 warm-up epochs, cosine decay, mixup 0.8).

    python -m big_attn.main --config=configs/dhvt_i1k.py:variant=S --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing, CutMix and repeated augmentation are not part of this recipe.

Args: variant (T, S; default S), attention (registry op name; softmax, the paper's), epochs,
runlocal (a narrow DHVT, few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import dhvt
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="softmax", epochs=300, runlocal=False)
  dhvt.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 5e-4 * config.input.batch_size / 512

  config.model_name = "dhvt"
  config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                      dtype="bfloat16")
  if arg.runlocal:
    config.model.update(width=32, depth=2, num_heads=4)
  return config_lib.declare_model_settings(config)
