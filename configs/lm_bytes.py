r"""A small byte-level LM on the Python standard library's source: the embedded LM default.

    python -m big_attn.main --config=configs/lm_bytes.py --workdir=/tmp/lm_bytes
    # sequence parallel over 4 simulated devices, striped ring attention:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python -m big_attn.main \
        --config=configs/lm_bytes.py:seq_shards=4,strategy=striped --workdir=/tmp/lm_bytes_sp
    # print a sample at every evaluation:
    python -m big_attn.main --config=configs/lm_bytes.py --workdir=/tmp/lm_bytes \
        --config.evals.eval.sample_prompt="def main("

Args (`--config=configs/lm_bytes.py:seq_len=512,steps=2000`):
  seq_shards: devices that split each sequence (mesh axis `seq`); the rest split the batch.
  strategy: sequence parallelism with seq_shards > 1: "striped", "ring" or "all_gather".
  seq_len: tokens (bytes) per packed training sequence.
  steps: training steps; variant: model size (`big_attn.models.lm.decode_variant`).
  attention: registry name of the attention op (sequence parallelism needs "softmax").
  block: "pre_norm", "parallel" (pre_norm with attention and SwiGLU in parallel from one norm;
    PAF) or "transnormer" (TransNormerLLM: SRMSNorm, gated lightning attention with the
    per-layer ALiBi decay, SGLU; sets attention="lightning" and no qk-norm).
  runlocal: a few steps on a few files, for smoke tests.
Measured numbers are in experiments/results/lm_bytes.md.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seq_shards=1, strategy="striped", seq_len=256, steps=800,
                             variant="tiny", attention="softmax", block="pre_norm",
                             runlocal=False)
  config_lib.check_sequence_parallel_arg(arg)
  config = config_lib.base_config()
  config.seed = 0

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=16, heldout=0.05,
                      max_files=40 if arg.runlocal else None)

  config.model_name = "lm"
  config.model = dict(variant=arg.variant, rope_base=10_000., qk_norm=True, tie_embeddings=True,
                      attention=arg.attention, dropout=0.0,
                      seq_strategy=arg.strategy if arg.seq_shards > 1 else None,
                      dtype="float32")
  if arg.block == "transnormer":
    config.model.update(block="transnormer", attention="lightning", qk_norm=False)
  elif arg.block == "parallel":
    config.model.parallel_block = True
  elif arg.block != "pre_norm":
    raise ValueError(f"block must be 'pre_norm', 'parallel' or 'transnormer', got "
                     f"{arg.block!r}")

  config.mesh = [("data", -1), ("seq", arg.seq_shards)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.95, weight_decay=0.1)
  config.lr = 3e-3
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 50, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 10 if arg.runlocal else arg.steps
  config.log_every = 5 if arg.runlocal else 50
  config.ckpt_every = 10 if arg.runlocal else 400
  config.max_to_keep = 2
  config.evals.eval = dict(type="lm", every=config.total_steps // 4 or 1, split="test",
                           batch_size=16, max_batches=2 if arg.runlocal else 16,
                           sample_prompt="")
  return config_lib.declare_model_settings(config)
