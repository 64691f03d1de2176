r"""DiT-XL/2 on ImageNet 256x256 in the latent space of a VAE (Peebles & Xie 2023, Table 4 recipe).

    python -m big_attn.main --config=configs/dit_xl2_i256.py --workdir=DIR \
        --config.input.data_dir=/data/tensorflow_datasets
    python -m big_attn.main --config=configs/dit_xl2_i256.py --config.dry_run=True \
        --config.input.data_dir=/data/tensorflow_datasets

The VAE is not part of big_attn: the data are latents encoded beforehand with the Stable
Diffusion VAE (ft-EMA), a TFDS ArrayRecord data set `data` (default `imagenet256_latents`,
prepared by the user, not in the TFDS catalogue) whose `image` feature is float32
[32, 32, 4] holding (0.18215 z + 1) / 2, so that the pipeline's [0, 1] -> [-1, 1] step gives
the scaled latent 0.18215 z, and whose `label` has 1000 classes. Random horizontal flips of
the latents stand in for flips of the images.

Recipe: AdamW at a constant 1e-4, no weight decay, batch 256, 400K steps, learn_sigma with
the hybrid loss, label dropout 0.1, bf16 compute. Not reproduced: the EMA of the weights
(decay 0.9999) that DiT samples with, and FID evaluation (through the VAE decoder).

A dry run (`--config.dry_run=True`) also reads the data set's features (TFDS loads a prepared
data set from `data_dir` without builder code): the image pipeline accepts only 1 or 3
`input.channels`, so its no-data fallback cannot describe 4-channel latents.

Args: variant (S/2 .. XL/8), attention (registry op name), cross_attention (PixArt-α layers
attending to one learned token per class), data (TFDS name), steps, runlocal (S/8, batch 8,
a few steps).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="XL/2", attention="softmax", cross_attention=False,
                             data="imagenet256_latents", steps=400_000, runlocal=False)
  config = config_lib.base_config()

  config.input.name = f"tfds:{arg.data}"
  config.input.image_size = 32
  config.input.batch_size = 8 if arg.runlocal else 256
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0

  config.model_name = "dit"
  config.model = dict(num_classes=1000, variant="S/8" if arg.runlocal else arg.variant,
                      learn_sigma=True, class_dropout=0.1, attention=arg.attention,
                      cross_attention="softmax" if arg.cross_attention else None,
                      remat_policy="none", dtype="bfloat16")

  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.999, weight_decay=0.0)
  config.lr = 1e-4
  config.schedule = dict(warmup_steps=0, decay_type="constant")
  config.grad_clip_norm = 0.0
  config.total_steps = 5 if arg.runlocal else arg.steps
  config.log_every = 1 if arg.runlocal else 100
  config.ckpt_every = 5 if arg.runlocal else 10_000
  config.max_to_keep = 3
  config.evals.eval = dict(type="diffusion", every=5 if arg.runlocal else 10_000,
                           split="validation", batch_size=8 if arg.runlocal else 256,
                           max_batches=1 if arg.runlocal else 50)
  return config_lib.declare_model_settings(config)
