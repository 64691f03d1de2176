r"""LeViT on ImageNet-2012 (the paper's recipe, DeiT's: AdamW at batch 2048, lr 5e-4 x batch / 512,
weight decay 0.025, 5 warm-up epochs, cosine decay, mixup 0.8; 1000 epochs in the paper).

    python -m big_attn.main --config=configs/levit_i1k.py:variant=256 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

The model has the paper's distillation head; the distillation from a RegNetY-16GF teacher is not
part of this recipe (both heads learn the labels), nor are RandAugment and random erasing.

Args: variant (128S, 128, 192, 256, 384; default 256), attention (registry op name; the paper's
`levit_bias`), epochs, runlocal (a narrow LeViT, few steps, small batch: for a laptop check of
the pipeline).
"""
from big_attn.models import levit
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="256", attention="levit_bias", epochs=1000,
                             runlocal=False)
  levit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=2048, weight_decay=0.025,
                                     warmup_epochs=5)
  config.lr = 5e-4 * config.input.batch_size / 512

  config.model_name = "levit"
  config.model = dict(num_classes=1000, variant=arg.variant, distillation=True,
                      attention=arg.attention, dtype="bfloat16")
  if arg.runlocal:
    config.model.update(widths=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depths=(1, 1, 1))
  return config_lib.declare_model_settings(config)
