r"""CvT-13 on ImageNet-2012 (the paper's recipe: 300 epochs, AdamW at batch 2048, weight decay
0.05 for CvT-13 and 0.1 for the larger ones; here lr 2e-3, 5 warm-up epochs, cosine decay,
stochastic depth 0.1 in the last stage).

    python -m big_attn.main --config=configs/cvt_i1k.py --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m big_attn.main --config=configs/cvt_i1k.py:variant=CvT-21 --workdir=DIR \
        --config.dry_run=True

Args: variant (CvT-13, CvT-21, CvT-W24; default CvT-13), attention (registry op name), epochs,
runlocal (tiny model, few steps, small batch: for a laptop check of the pipeline). The paper's
RandAugment, label smoothing and CutMix are not part of this recipe (mixup 0.8 is).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="CvT-13", attention="softmax", epochs=300,
                             runlocal=False)
  config = config_lib.imagenet_config(
      arg, batch_size=2048, weight_decay=0.05 if arg.variant == "CvT-13" else 0.1,
      warmup_epochs=5)
  config.lr = 2e-3

  config.model_name = "cvt"
  if arg.runlocal:
    config.model = dict(num_classes=1000, dims=(16, 32, 32), num_heads=(1, 2, 2),
                        depths=(1, 1, 1), attention=arg.attention, dtype="bfloat16")
  else:
    config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                        drop_path_rate=0.1, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
