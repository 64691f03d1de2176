r"""ViT-G/14 (about 1.84e9 parameters; Scaling Vision Transformers) with FSDP over all devices.

Parameters and optimizer state are sharded ZeRO-3 style over the `fsdp` axis, which takes every
device; activations are sharded over the batch; every block is rematerialised and the blocks
are scanned, and compute is bfloat16 with float32 parameters. The optimizer is the paper's
memory-saving Adafactor (factored second moment, first moment in bfloat16) with decoupled weight
decay 3.0 on the head and 0.03 on the body.

    python -m big_attn.main --config=configs/vit_2b.py --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    # compile one step on 8 simulated CPU devices and report parameters, memory, FLOPs:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m big_attn.main --config=configs/vit_2b.py --config.dry_run=True

Per-device memory scales with the batch per device: on 8 simulated devices the default global
batch of 4096 is 512 images a device (the dry run reports ~250 GiB of temporaries); `:batch=64`
(8 a device, as on a 512-chip pod) reports ~7.4 GiB peak.

Args: variant (default G/14), attention (registry op name), batch (global batch size),
steps, remat (a `jax.checkpoint_policies` name or none).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="G/14", attention="softmax", batch=4096,
                             steps=100_000, remat="nothing_saveable")
  config = config_lib.base_config()

  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = arg.batch
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0

  config.model_name = "vit"
  config.model = dict(num_classes=1000, variant=arg.variant, posemb="learn", pool_type="map",
                      attention=arg.attention, dropout=0.0, remat_policy=arg.remat,
                      scan_layers=True, dtype="bfloat16", param_dtype="float32")

  config.mesh = [("fsdp", -1)]
  config.optax_name = "adafactor"
  config.optax = dict(momentum=0.9, momentum_dtype="bfloat16", beta2_cap=0.999,
                      clip_threshold=1.0, weight_decay=0.03)
  config.wd_head = 3.0
  config.lr = 8e-4
  config.schedule = dict(warmup_steps=10_000, decay_type="rsqrt", timescale=10_000)
  config.grad_clip_norm = 1.0
  config.total_steps = arg.steps
  config.log_every = 50
  config.ckpt_every = 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5000, split="validation",
                           batch_size=1024)
  return config_lib.declare_model_settings(config)
