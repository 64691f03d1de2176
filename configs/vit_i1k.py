r"""ViT-B/16 on ImageNet-2012 (big_vision's vit_i1k recipe: 300 epochs, AdamW, RandAug-free).

    python -m big_attn.main --config=configs/vit_i1k.py --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

    python -m big_attn.main --config=configs/vit_i1k.py:variant=ConViT-S/16 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Args: variant (default B/16; a family's variant such as ConViT-S/16 or CPVT-Ti/16 brings its
options: `big_attn.models.vit.decode_variant`), attention (registry op name), epochs, runlocal (tiny model, few
steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="B/16", attention="softmax", epochs=300,
                             runlocal=False)
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 4096
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.2

  config.model_name = "vit"
  variant = "Ti/16" if arg.runlocal else arg.variant
  family = "-" in variant  # ConViT's and CPVT's blocks differ: a Python loop of blocks
  config.model = dict(num_classes=1000, variant=variant, attention=arg.attention, dropout=0.0,
                      remat_policy="none", scan_layers=not family, dtype="bfloat16")
  if not family:
    config.model.update(posemb="learn", pool_type="gap")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=1e-4)
  config.lr = 1e-3
  steps = arg.epochs * _TRAIN_EXAMPLES // config.input.batch_size
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 10_000, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 5 if arg.runlocal else steps
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
