r"""HorNet, Sequencer2D, SpectFormer and MobileViT on ImageNet-2012, the variant picking the family.

    python -m big_attn.main --config=configs/mixer_families_i1k.py:variant=hornet_t \
        --workdir=DIR --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m big_attn.main --config=configs/mixer_families_i1k.py:variant=spectformer_s \
        --workdir=DIR --config.dry_run=True

Each paper's recipe: 300 epochs of AdamW (weight decay 0.05) with cosine decay and mixup 0.8;
HorNet as ConvNeXt (batch 4096, lr 4e-3, 20 warm-up epochs, stochastic depth 0.2/0.4/0.5),
Sequencer2D (batch 2048, lr 2e-3, 20 warm-up epochs, stochastic depth 0.1/0.2/0.4),
SpectFormer as GFNet/DeiT (batch 1024, lr 1e-3, 5 warm-up epochs, exact GELU; `vit` has no
stochastic depth, so their 0.1 is not applied), MobileViT at 256x256 (batch 1024, lr 2e-3, 3
warm-up epochs, weight decay 0.01, dropout 0.1); no gradient clipping. RandAugment, random
erasing, label smoothing, CutMix and EMA are not part of it.

Args: variant (hornet_t/s/b: `convnext`; sequencer2d_s/m/l: `metaformer`; spectformer_t/xs/
s/b: `vit`; mobilevit_xxs/xs/s: `mobilevit`), attention (SpectFormer's and MobileViT's attention
op, `big_attn.ops.names()`), epochs, runlocal
(a narrow model of the family, few steps, small batch: a laptop check of the pipeline).
"""
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167
# variant -> (model_name, batch, lr, warm-up epochs, stochastic depth).
_RECIPES = {
    "hornet_t": ("convnext", 4096, 4e-3, 20, 0.2),
    "hornet_s": ("convnext", 4096, 4e-3, 20, 0.4),
    "hornet_b": ("convnext", 4096, 4e-3, 20, 0.5),
    "sequencer2d_s": ("metaformer", 2048, 2e-3, 20, 0.1),
    "sequencer2d_m": ("metaformer", 2048, 2e-3, 20, 0.2),
    "sequencer2d_l": ("metaformer", 2048, 2e-3, 20, 0.4),
    "spectformer_t": ("vit", 1024, 1e-3, 5, None),
    "spectformer_xs": ("vit", 1024, 1e-3, 5, None),
    "spectformer_s": ("vit", 1024, 1e-3, 5, None),
    "spectformer_b": ("vit", 1024, 1e-3, 5, None),
    "mobilevit_xxs": ("mobilevit", 1024, 2e-3, 3, None),
    "mobilevit_xs": ("mobilevit", 1024, 2e-3, 3, None),
    "mobilevit_s": ("mobilevit", 1024, 2e-3, 3, None),
}
_DROP_PATH_FIELD = {"convnext": "drop_path_rate", "metaformer": "drop_path"}
# runlocal: a narrow model of the variant's family.
_RUNLOCAL = {"convnext": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
             "metaformer": dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 32)),
             "vit": dict(width=32, depth=2, num_heads=2, mlp_dim=64, spectral_layers=(0,)),
             "mobilevit": dict(channels=(8, 8, 16, 16, 16), dims=(16, 16, 16),
                               head_channels=32, depths=(1, 1, 1))}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="hornet_t", attention="softmax", epochs=300,
                             runlocal=False)
  if arg.variant not in _RECIPES:
    raise ValueError(f"config arg variant must be one of {', '.join(_RECIPES)}, got "
                     f"{arg.variant!r}")
  model_name, batch, lr, warmup_epochs, drop = _RECIPES[arg.variant]
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 256 if model_name == "mobilevit" else 224
  config.input.batch_size = 8 if arg.runlocal else batch
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = model_name
  config.model = dict(num_classes=1000, variant=arg.variant, dtype="bfloat16")
  if model_name == "vit":
    config.model.update(attention=arg.attention, approximate_gelu=False, pool_type="gap")
  elif model_name == "mobilevit":
    config.model.update(variant=arg.variant.split("_")[1].upper(), attention=arg.attention,
                        dropout=0.0 if arg.runlocal else 0.1)
  else:
    config.model[_DROP_PATH_FIELD[model_name]] = 0.0 if arg.runlocal else drop
  if arg.runlocal:
    config.model.update(_RUNLOCAL[model_name])

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.01 if model_name == "mobilevit" else 0.05)
  config.lr = lr
  steps_per_epoch = _TRAIN_EXAMPLES // config.input.batch_size
  config.schedule = dict(warmup_steps=2 if arg.runlocal else warmup_epochs * steps_per_epoch,
                         decay_type="cosine")
  config.grad_clip_norm = 0.0
  config.total_steps = 5 if arg.runlocal else arg.epochs * steps_per_epoch
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
