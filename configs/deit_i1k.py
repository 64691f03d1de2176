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


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="B/16", teacher_workdir="", teacher_variant="B",
                             attention="softmax", epochs=300, runlocal=False)
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 5e-4 * config.input.batch_size / 512

  config.model_name = "deit"
  teacher = None
  if arg.teacher_workdir:
    teacher = dict(model_name="convnext", workdir=arg.teacher_workdir,
                   model=dict(variant=arg.teacher_variant, dtype="bfloat16"))
  config.model = dict(num_classes=1000, variant="Ti/16" if arg.runlocal else arg.variant,
                      distilled=True, teacher=teacher, posemb="learn", attention=arg.attention,
                      dropout=0.0, scan_layers=True, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
