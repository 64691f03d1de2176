r"""PoolFormer on ImageNet-2012 (MetaFormer Is Actually What You Need for Vision: 300 epochs,
AdamW with lr 1e-3·batch/1024, weight decay 0.05, 5 warmup epochs, stochastic depth per size).

    python -m big_attn.main --config=configs/poolformer_i1k.py:variant=S12 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Args: variant (S12, S24, S36, M36, M48), mixer (a token mixer for all stages, or four joined by
"+": conv+conv+attention+attention is a CAFormer), attention (op of the attention mixer),
epochs, runlocal (tiny model, few steps, small batch: a laptop check of the pipeline).
"""
from big_attn.models import metaformer
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167
# Stochastic depth rates of the paper's models (PoolFormer's released training scripts).
_DROP_PATH = {"S12": 0.1, "S24": 0.1, "S36": 0.2, "M36": 0.3, "M48": 0.4}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S12", mixer="pool", attention="softmax", epochs=300,
                             runlocal=False)
  metaformer.decode_variant(arg.variant)  # unknown sizes raise here
  mixers = arg.mixer.split("+")
  if len(mixers) not in (1, 4):
    raise ValueError(f"config arg mixer must be one mixer name or four joined by '+', got "
                     f"{arg.mixer!r}")
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 4096
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "metaformer"
  config.model = dict(num_classes=1000, mixers=mixers[0] if len(mixers) == 1 else tuple(mixers),
                      attention=arg.attention, dtype="bfloat16")
  if arg.runlocal:
    config.model.update(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64))
  else:
    config.model.update(variant=arg.variant, drop_path=_DROP_PATH[arg.variant])

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 1e-3 * config.input.batch_size / 1024
  steps_per_epoch = _TRAIN_EXAMPLES // config.input.batch_size
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 5 * steps_per_epoch,
                         decay_type="cosine")
  config.grad_clip_norm = 0.0  # the paper's recipe does not clip
  config.total_steps = 5 if arg.runlocal else arg.epochs * steps_per_epoch
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
