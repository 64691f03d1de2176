r"""Hierarchical local-global ViTs (DaViT, Twins-SVT, DiNAT, BiFormer, RMT) on ImageNet-2012.

    python -m big_attn.main --config=configs/hvit_i1k.py:variant=davit_t --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

A DeiT/Swin-style recipe, as these papers train: 300 epochs, batch 1024, AdamW (lr 1e-3,
weight decay 0.05), cosine decay after 20 warm-up epochs (5 for BiFormer and RMT, whose
training code is DeiT's), mixup, gradient clipping at norm 5, stochastic depth per size as in
the authors' configs.

Args: variant (davit_t, davit_s, davit_b, twins_svt_s/b/l, dinat_m/t/s/b, biformer_t/s/b,
rmt_t/s/b/l; see `big_attn.models.hvit.decode_variant`), local_attention / global_attention
(registry names replacing the family's ops, "" keeps them; deprecated: local_op / global_op),
epochs, runlocal (a narrow model of the variant's
family, few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import hvit
from big_attn.train import config_lib

_TRAIN_EXAMPLES = 1_281_167
# Stochastic depth of the authors' ImageNet-1k runs.
DROP_PATH = {"davit_t": 0.1, "davit_s": 0.2, "davit_b": 0.4,
             "twins_svt_s": 0.2, "twins_svt_b": 0.3, "twins_svt_l": 0.5,
             "dinat_m": 0.2, "dinat_t": 0.2, "dinat_s": 0.3, "dinat_b": 0.5,
             "biformer_t": 0.1, "biformer_s": 0.15, "biformer_b": 0.4,
             "rmt_t": 0.1, "rmt_s": 0.15, "rmt_b": 0.4, "rmt_l": 0.5}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="davit_t", local_attention="", global_attention="",
                             epochs=300, runlocal=False, renamed=hvit.RENAMED)
  family = hvit.decode_variant(arg.variant)["family"]
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else 1024
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8

  config.model_name = "hvit"
  config.model = dict(num_classes=1000, variant=arg.variant,
                      drop_path=0.0 if arg.runlocal else DROP_PATH[arg.variant],
                      local_attention=arg.local_attention or None,
                      global_attention=arg.global_attention or None, dtype="bfloat16")
  if arg.runlocal:
    config.model.update(embed_dims=(16, 32, 64, 64), depths=(2, 2, 2, 2),
                        num_heads=(2, 2, 4, 4), dtype="float32")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=0.05)
  config.lr = 1e-3
  steps_per_epoch = _TRAIN_EXAMPLES // config.input.batch_size
  warmup_epochs = 5 if family in ("biformer", "rmt") else 20
  config.schedule = dict(warmup_steps=2 if arg.runlocal else warmup_epochs * steps_per_epoch,
                         decay_type="cosine")
  config.grad_clip_norm = 5.0
  config.total_steps = 5 if arg.runlocal else arg.epochs * steps_per_epoch
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config_lib.declare_model_settings(config)
