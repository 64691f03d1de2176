r"""DeiT-B on ImageNet-2012 (the paper's recipe: 300 epochs, AdamW, lr 5e-4 x batch / 512,
weight decay 0.05, 5 warm-up epochs, mixup 0.8), optionally distilled from a trained teacher.

    python -m big_attn.main --config=configs/deit_i1k.py --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m big_attn.main --config=configs/convnext_i1k.py:variant=B --workdir=TEACHER_DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m big_attn.main --config=configs/deit_i1k.py:teacher_workdir=TEACHER_DIR \
        --workdir=DIR --config.input.data_dir=gs://BUCKET/tensorflow_datasets

The paper's teacher is a RegNetY-16GF; ours is a ConvNeXt trained by configs/convnext_i1k.py
(`teacher_variant` must be the variant it was trained with). Without `teacher_workdir` the
distillation head is trained on the labels. RandAugment, random erasing, CutMix and repeated
augmentation of the paper are not part of this recipe.

Args: variant (Ti/16, S/16, B/16; default B/16), teacher_workdir (""), teacher_variant (B),
attention (registry op name), epochs, runlocal (tiny model, few steps, small batch: for a laptop
check of the pipeline).
"""
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="B/16", teacher_workdir="", teacher_variant="B",
                             attention="softmax", epochs=300, runlocal=False)
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 1024
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "deit"
  teacher = None
  if arg.teacher_workdir:
    teacher = dict(model_name="convnext", workdir=arg.teacher_workdir,
                   model=dict(variant=arg.teacher_variant, dtype="bfloat16"))
  config.model = dict(num_classes=1000, variant="Ti/16" if arg.runlocal else arg.variant,
                      distilled=True, teacher=teacher, posemb="learn", attention=arg.attention,
                      dropout=0.0, scan_layers=True, dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 5e-4 * config.input.batch_size / 512
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
