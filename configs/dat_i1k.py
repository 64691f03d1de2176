r"""DAT / DAT++ on ImageNet-2012 (the papers' recipe: 300 epochs, AdamW at batch 1024, lr 1e-3,
weight decay 0.05, 20 warm-up epochs, cosine decay, mixup 0.8; stochastic depth 0.2 for DAT-T
and DAT++-T, 0.3 for DAT-S, 0.4 for DAT++-S, 0.5 for DAT-B, 0.7 for DAT++-B: the authors'
configs and, for DAT-T and DAT-B, Swin's).

    python -m big_attn.main --config=configs/dat_i1k.py:variant=DAT++-T --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, CutMix, label smoothing and random erasing of the papers are not part of this
recipe.

Args: variant (DAT-T, DAT-S, DAT-B, DAT++-T, DAT++-S, DAT++-B; default DAT++-T), attention
(the deformable blocks' op; default the paper's deformable_attention), local_attention (the
local blocks' op; default the variant's window / neighborhood), epochs, runlocal (a tiny
model, few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import dat
from big_attn.train import config_lib

_DROP_PATH = {"DAT-T": 0.2, "DAT-S": 0.3, "DAT-B": 0.5, "DAT++-T": 0.2, "DAT++-S": 0.4,
              "DAT++-B": 0.7}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="DAT++-T", attention="deformable_attention",
                             local_attention="", epochs=300, runlocal=False)
  dat.decode_variant(arg.variant)  # a ValueError naming the variants for an unknown one
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=20)
  config.lr = 1e-3

  config.model_name = "dat"
  local = arg.local_attention or None
  if arg.runlocal:
    config.model = dict(num_classes=1000, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2),
                        num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4),
                        strides=(8, 4, 2, 1), attention=arg.attention, local_attention=local,
                        dtype="bfloat16")
  else:
    config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                        local_attention=local, drop_path_rate=_DROP_PATH[arg.variant],
                        dtype="bfloat16")
  return config_lib.declare_model_settings(config)
