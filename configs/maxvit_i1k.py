r"""MaxViT on ImageNet-2012 at 224x224 (the authors' ImageNet-1k recipe, hp/vision_i1k.py).

    python -m big_attn.main --config=configs/maxvit_i1k.py:variant=T --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

300 epochs of AdamW (peak learning rate 3e-3, weight decay 0.05, batch 4096, 10k warmup steps,
cosine decay, gradient clipping 1.0), stochastic depth 0.2/0.3/0.4/0.6 for T/S/B/L, mixup 0.8,
7x7 windows and grid. The authors also use RandAugment (2, 15), label smoothing 0.1 and an EMA
of the weights, which this pipeline does not have.

Args: variant (T, S, B or L; default T), block_attention and grid_attention (registry op
names; "window" and "grid"), epochs, remat (a `jax.checkpoint_policies` name or "none"),
runlocal (a tiny MaxViT, few steps, small batch: a laptop check of the pipeline).
"""
from big_attn.models import maxvit
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="T", block_attention="window", grid_attention="grid",
                             epochs=300, remat="none", runlocal=False)
  maxvit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 64 if arg.runlocal else 224
  config.input.batch_size = 8 if arg.runlocal else 4096
  config.input.augment = dict(inception_crop=True, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "maxvit"
  if arg.runlocal:
    config.model = dict(num_classes=1000, embed_dims=(32, 64, 64, 128), depths=(1, 1, 1, 1),
                        stem_width=32, head_hidden=128, partition_size=2)
  else:
    config.model = dict(num_classes=1000, variant=arg.variant, partition_size=7,
                        drop_path=maxvit.DROP_PATH[arg.variant])
  config.model.update(block_attention=arg.block_attention, grid_attention=arg.grid_attention,
                      remat_policy=arg.remat, dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 3e-3
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
