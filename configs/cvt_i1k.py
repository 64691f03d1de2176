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

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="CvT-13", attention="softmax", epochs=300,
                             runlocal=False)
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 2048
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "cvt"
  if arg.runlocal:
    config.model = dict(num_classes=1000, dims=(16, 32, 32), num_heads=(1, 2, 2),
                        depths=(1, 1, 1), attention=arg.attention, dtype="bfloat16")
  else:
    config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                        drop_path_rate=0.1, dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05 if arg.variant == "CvT-13" else 0.1)
  config.lr = 2e-3
  steps = arg.epochs * _TRAIN_EXAMPLES // config.input.batch_size
  warmup = min(5 * _TRAIN_EXAMPLES // config.input.batch_size, steps)  # 5 epochs
  config.schedule = dict(warmup_steps=2 if arg.runlocal else warmup, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 5 if arg.runlocal else steps
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
