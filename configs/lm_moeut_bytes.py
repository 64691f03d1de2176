r"""A small byte-level MoEUT (mixture-of-experts Universal Transformer) on the Python standard
library's source.

    python -m big_attn.main --config=configs/lm_moeut_bytes.py --workdir=/tmp/lm_moeut_bytes

MoEUT (Csordás et al. 2024): `block="moeut"` (σ-MoE feed-forward, SwitchHead attention,
peri-layernorm) with `layer_group_size` G distinct layers repeated to the depth; the router
entropy regulariser is added to the loss by `lm.loss_fn`.

Args (`--config=configs/lm_moeut_bytes.py:seq_len=512,steps=2000`):
  seq_shards: devices that split each sequence (mesh axis `seq`); the rest split the batch.
  strategy: sequence parallelism with seq_shards > 1: "striped", "ring" or "all_gather".
  seq_len: tokens (bytes) per packed training sequence; steps: training steps.
  group: layer_group_size G (depth 8 is 8/G repeats of G layers).
  runlocal: a few steps on a few files, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seq_shards=1, strategy="striped", seq_len=256, steps=800,
                             group=2, runlocal=False)
  config_lib.check_sequence_parallel_arg(arg)
  config = config_lib.base_config()
  config.seed = 0

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=16, heldout=0.05,
                      max_files=40 if arg.runlocal else None)

  config.model_name = "lm"
  config.model = dict(width=128, depth=8, num_heads=4, head_dim=32, block="moeut",
                      attention="switchhead", layer_group_size=arg.group,
                      moe=dict(num_experts=32, expert_dim=32, topk=4, att_experts=4,
                               att_topk=2),
                      rope_base=10_000., tie_embeddings=False, dropout=0.0,
                      seq_strategy=arg.strategy if arg.seq_shards > 1 else None,
                      dtype="float32")

  config.mesh = [("data", -1), ("seq", arg.seq_shards)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.999, weight_decay=0.01)
  config.lr = 2e-3
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 50, decay_type="cosine")
  config.grad_clip_norm = 0.25
  config.total_steps = 10 if arg.runlocal else arg.steps
  config.log_every = 5 if arg.runlocal else 50
  config.ckpt_every = 10 if arg.runlocal else 400
  config.max_to_keep = 2
  config.evals.eval = dict(type="lm", every=config.total_steps // 4 or 1, split="test",
                           batch_size=16, max_batches=2 if arg.runlocal else 16,
                           sample_prompt="")
  return config_lib.declare_model_settings(config)
