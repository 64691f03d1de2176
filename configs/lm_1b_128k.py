r"""A 1B-parameter byte-level LM at 128k context: FSDP x striped sequence parallelism.

Each 131,072-token sequence is split over the mesh axis `seq` (striped order, striped ring
attention in every layer); parameters and optimizer state are sharded ZeRO-3 style over
`fsdp`, which also splits the batch. Blocks are scanned and rematerialised, compute is
bfloat16 with float32 parameters, and RoPE uses a long-context base (500,000).

    python -m big_attn.main --config=configs/lm_1b_128k.py:seq_shards=16 --workdir=DIR
    # compile one step on 8 simulated CPU devices; print parameters, memory per device, FLOPs:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m big_attn.main --config=configs/lm_1b_128k.py --config.dry_run=True

Args: seq_shards (size of the `seq` axis, default 8; `fsdp` takes the other devices),
strategy ("striped", "ring", "all_gather"), seq_len, batch (global sequences per step),
variant, steps, remat (a `jax.checkpoint_policies` name or none).
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seq_shards=8, strategy="striped", seq_len=131_072, batch=1,
                             variant="1B", steps=50_000, remat="nothing_saveable")
  config_lib.check_sequence_parallel_arg(arg)
  config = config_lib.base_config()

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=arg.batch, heldout=0.05)

  config.model_name = "lm"
  config.model = dict(variant=arg.variant, rope_base=500_000., qk_norm=True,
                      tie_embeddings=False, attention="softmax", seq_strategy=arg.strategy,
                      remat_policy=arg.remat, scan_layers=True, dtype="bfloat16",
                      param_dtype="float32")

  config.mesh = [("fsdp", -1), ("seq", arg.seq_shards)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.95, weight_decay=0.1)
  config.lr = 3e-4
  config.schedule = dict(warmup_steps=2000, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = arg.steps
  config.log_every = 20
  config.ckpt_every = 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="lm", every=2000, split="test", batch_size=arg.batch,
                           max_batches=8)
  return config_lib.declare_model_settings(config)
