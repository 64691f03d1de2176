r"""MViTv2 on ImageNet-2012 (the paper's recipe: 300 epochs, AdamW at batch 2048, lr 2e-3,
weight decay 0.05, 70 warm-up epochs, cosine decay, mixup 0.8; stochastic depth 0.1 for T, 0.3
for S, 0.3 for B and 0.5 for L).

    python -m big_attn.main --config=configs/mvit_i1k.py:variant=T --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, CutMix, label smoothing, random erasing and the EMA of the paper are not part of
this recipe.

Args: variant (T, S, B, L; default T), attention (registry op name; default the paper's
decomposed_relpos), epochs, runlocal (a tiny model, few steps, small batch: for a laptop check
of the pipeline).
"""
from big_attn.models import mvit
from big_attn.train import config_lib

_DROP_PATH = {"T": 0.1, "S": 0.3, "B": 0.3, "L": 0.5}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="T", attention="decomposed_relpos", epochs=300,
                             runlocal=False)
  size = arg.variant[7:] if arg.variant.startswith("MViTv2-") else arg.variant
  mvit.decode_variant(size)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=2048, weight_decay=0.05,
                                     warmup_epochs=70)
  config.lr = 2e-3

  config.model_name = "mvit"
  if arg.runlocal:
    config.model = dict(num_classes=1000, dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                        depths=(1, 1, 1, 1), attention=arg.attention, dtype="bfloat16")
  else:
    config.model = dict(num_classes=1000, variant=size, attention=arg.attention,
                        drop_path_rate=_DROP_PATH[size], dtype="bfloat16")
  return config_lib.declare_model_settings(config)
