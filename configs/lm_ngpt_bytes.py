r"""A small byte-level nGPT (normalized Transformer) on the Python standard library's source.

    python -m big_attn.main --config=configs/lm_ngpt_bytes.py --workdir=/tmp/lm_ngpt_bytes
    # sequence parallel over 4 simulated devices, striped ring attention:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python -m big_attn.main \
        --config=configs/lm_ngpt_bytes.py:seq_shards=4,strategy=striped --workdir=/tmp/ngpt_sp

nGPT (Loshchilov et al. 2024): `block="ngpt"` with the `ngpt` attention op; the training loop
renormalises the weight matrices after every step (`lm.Model.post_update`). As in the paper,
no weight decay and no learning-rate warmup.

Args (`--config=configs/lm_ngpt_bytes.py:seq_len=512,steps=2000`):
  seq_shards: devices that split each sequence (mesh axis `seq`); the rest split the batch.
  strategy: sequence parallelism with seq_shards > 1: "striped", "ring" or "all_gather".
  seq_len: tokens (bytes) per packed training sequence.
  steps: training steps; variant: model size (`big_attn.models.lm.decode_variant`).
  runlocal: a few steps on a few files, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seq_shards=1, strategy="striped", seq_len=256, steps=800,
                             variant="tiny", runlocal=False)
  config_lib.check_sequence_parallel_arg(arg)
  config = config_lib.base_config()
  config.seed = 0

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=16, heldout=0.05,
                      max_files=40 if arg.runlocal else None)

  config.model_name = "lm"
  config.model = dict(variant=arg.variant, block="ngpt", attention="ngpt", rope_base=10_000.,
                      qk_norm=False, tie_embeddings=False, dropout=0.0,
                      seq_strategy=arg.strategy if arg.seq_shards > 1 else None,
                      dtype="float32")

  config.mesh = [("data", -1), ("seq", arg.seq_shards)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.95, weight_decay=0.0)
  config.lr = 3e-3
  config.schedule = dict(warmup_steps=0, decay_type="cosine")
  config.grad_clip_norm = 0.0
  config.total_steps = 10 if arg.runlocal else arg.steps
  config.log_every = 5 if arg.runlocal else 50
  config.ckpt_every = 10 if arg.runlocal else 400
  config.max_to_keep = 2
  config.evals.eval = dict(type="lm", every=config.total_steps // 4 or 1, split="test",
                           batch_size=16, max_batches=2 if arg.runlocal else 16,
                           sample_prompt="")
  return config_lib.declare_model_settings(config)
