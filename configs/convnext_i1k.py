r"""ConvNeXt-T on ImageNet-2012 (A ConvNet for the 2020s: 300 epochs, AdamW, lr 4e-3 at batch
4096, weight decay 0.05, 20 warm-up epochs, stochastic depth 0.1/0.4/0.5/0.5 for T/S/B/L).

    python -m big_attn.main --config=configs/convnext_i1k.py --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m big_attn.main --config=configs/convnext_i1k.py:variant=B --workdir=DIR \
        --config.dry_run=True

Args: variant (T, S, B, L, XL; default T), epochs, runlocal (tiny model, few steps, small batch:
for a laptop check of the pipeline). The paper's RandAugment, random erasing, label smoothing,
CutMix and EMA are not part of this recipe (mixup 0.8 is).
"""
from big_attn.train import config_lib

_DROP_PATH = {"T": 0.1, "S": 0.4, "B": 0.5, "L": 0.5, "XL": 0.5}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="T", epochs=300, runlocal=False)
  if arg.variant not in _DROP_PATH:
    raise ValueError(f"config arg variant must be one of {', '.join(_DROP_PATH)}, got "
                     f"{arg.variant!r}")
  config = config_lib.imagenet_config(arg, batch_size=4096, weight_decay=0.05,
                                     warmup_epochs=20)
  config.lr = 4e-3

  config.model_name = "convnext"
  if arg.runlocal:
    config.model = dict(num_classes=1000, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                        dtype="bfloat16")
  else:
    config.model = dict(num_classes=1000, variant=arg.variant,
                        drop_path_rate=_DROP_PATH[arg.variant], dtype="bfloat16")

  return config_lib.declare_model_settings(config)
