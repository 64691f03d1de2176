r"""LIT on ImageNet-2012 (Swin's recipe, which the paper follows: 300 epochs of AdamW at batch
1024, lr 1e-3 x batch / 1024, weight decay 0.05, 20 warm-up epochs, cosine decay, mixup 0.8).

    python -m big_attn.main --config=configs/lit_i1k.py:variant=S --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing, CutMix and the paper's 0.01 learning-rate multiplier of the offset
convolutions are not part of this recipe.

Args: variant (Ti, S, M, B; default S), attention (registry op name; empty: the variant's, the
whole-map `window` for S, M, B and `softmax` for Ti), epochs, runlocal (a narrow LIT, few steps,
small batch: for a laptop check of the pipeline).
"""
from big_attn.models import lit
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S", attention="", epochs=300, runlocal=False)
  lit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=20)
  config.lr = 1e-3 * config.input.batch_size / 1024

  config.model_name = "lit"
  config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention or None,
                      dtype="bfloat16")
  if arg.runlocal:
    config.model.update(widths=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))
  return config_lib.declare_model_settings(config)
