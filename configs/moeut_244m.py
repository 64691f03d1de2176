r"""MoEUT at the paper's sizes (Csordás et al. 2024, "MoEUT: Mixture-of-Experts Universal
Transformers": the hyper-parameters of its models, as in the authors' `profiles.py`); default
the 244M model.

    python -m big_attn.main --config=configs/moeut_244m.py --workdir=DIR
    # compile one step on 8 simulated CPU devices; print parameters, memory per device, FLOPs:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m big_attn.main --config=configs/moeut_244m.py:variant=44M --config.dry_run=True

| name | d_model | layers | G | heads | d_head | E_att | N_E (×128) |  K | params (V=8000) |
|------|---------|--------|---|-------|--------|-------|------------|----|-----------------|
| 44M  |     412 |     16 | 2 |     4 |     82 |     8 |        155 | 12 |      44,345,792 |
| 126M |     768 |     18 | 2 |     4 |     96 |    10 |        254 | 12 |     125,669,696 |
| 244M |    1024 |     18 | 2 |     4 |    128 |    10 |        387 | 16 |     243,326,784 |
| 318M |    1024 |     24 | 3 |     4 |    128 |    10 |        338 | 16 |     318,107,456 |
| 727M |    1024 |     36 | 4 |     5 |    128 |    13 |        467 | 20 |     581,941,056 |
| 1B   |    1536 |     36 | 4 |     6 |    128 |    12 |        565 | 24 |   1,040,319,296 |

Counts from `jax.eval_shape` with the paper's 8,000-token SentencePiece vocabulary (untied
embeddings with an output bias, LayerNorm scales and biases). SwitchHead picks 2 of the
`att experts` (value and output experts) per head and token. The counts are within 1% of the
names for 44M to 318M (244M: 243.3M, −0.3%; the 2% check is in tests/test_lm_ngpt_moeut.py).
The authors' 727M and 1B profiles give 582M and 1.040B with the same architecture (per layer:
2·d·H·d_head queries/keys, 2·H·E_att·d·d_head value/output experts, 2·H·E_att·d routers,
N_E·(2·128·d + d) σ-MoE, 4·d LayerNorm; G distinct layers; 2·V·d + V + 2·d embeddings,
output bias and final LayerNorm): those two names do not follow from their profiles and we do not
reproduce them. The paper trains on C4 (also SlimPajama, peS2o, The Stack); this repository's
text pipeline is the byte corpus (`name="bytes"`, 259 tokens), which a run of this config
uses. Optimisation as the authors' sweeps: AdamW, lr 2.5e-4, weight decay 0.01, gradient
clipping 0.25, 4000 warmup steps, cosine decay, batch 64 × 1024 tokens, 100k steps.

Args: variant (a row above), seq_len, batch, steps, fsdp (devices that shard parameters).
"""
from big_attn.train import config_lib

# d_model, layers, heads, d_head, att experts, FF experts, FF K, G (the authors' profiles.py)
VARIANTS = {
    "44M": (412, 16, 4, 82, 8, 155, 12, 2),
    "126M": (768, 18, 4, 96, 10, 254, 12, 2),
    "244M": (1024, 18, 4, 128, 10, 387, 16, 2),
    "318M": (1024, 24, 4, 128, 10, 338, 16, 3),
    "727M": (1024, 36, 5, 128, 13, 467, 20, 4),
    "1B": (1536, 36, 6, 128, 12, 565, 24, 4),
}
PAPER_VOCAB_SIZE = 8_000  # SentencePiece


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="244M", seq_len=1024, batch=64, steps=100_000,
                             fsdp=-1)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {arg.variant!r}")
  config = config_lib.base_config()

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=arg.batch, heldout=0.05)

  width, depth, heads, head_dim, att_experts, experts, topk, group = VARIANTS[arg.variant]
  config.model_name = "lm"
  config.model = dict(width=width, depth=depth, num_heads=heads, head_dim=head_dim,
                      block="moeut", attention="switchhead", layer_group_size=group,
                      moe=dict(num_experts=experts, expert_dim=128, topk=topk,
                               att_experts=att_experts, att_topk=2, entropy_reg=0.01,
                               att_entropy_reg=0.001),
                      tie_embeddings=False, rope_base=10_000., dtype="bfloat16",
                      param_dtype="float32")

  config.mesh = [("fsdp", arg.fsdp)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.999, weight_decay=0.01)
  config.lr = 2.5e-4
  config.schedule = dict(warmup_steps=4000, decay_type="cosine")
  config.grad_clip_norm = 0.25
  config.total_steps = arg.steps
  config.log_every = 50
  config.ckpt_every = 2000
  config.max_to_keep = 3
  config.evals.eval = dict(type="lm", every=5000, split="test", batch_size=arg.batch,
                           max_batches=8)
  return config_lib.declare_model_settings(config)
