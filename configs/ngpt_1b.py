r"""nGPT at the paper's sizes (Loshchilov et al. 2024, "nGPT: Normalized Transformer with
Representation Learning on the Hypersphere", Section 3 / Appendix A): 0.5B and 1B models.

    python -m big_attn.main --config=configs/ngpt_1b.py:variant=1B --workdir=DIR
    # compile one step on 8 simulated CPU devices; print parameters, memory per device, FLOPs:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m big_attn.main --config=configs/ngpt_1b.py:variant=0.5B --config.dry_run=True

| variant | d_model | layers | heads | d_k | MLP (SwiGLU) | params (vocab 32,000) | paper |
|---------|---------|--------|-------|-----|--------------|-----------------------|-------|
| 0.5B    |    1024 |     24 |    16 |  64 |         4096 |           468,491,520 |  0.5B |
| 1B      |    1280 |     36 |    20 |  64 |         5120 |         1,026,177,280 |    1B |

The paper's sizes are nominal ("0.5B and 1B parameters, including the embeddings"); the
counts are those of its architecture (16·d²·layers + untied embeddings 2·V·d + the scalings
α_A, α_M, s_qk, s_u, s_ν per layer and s_z) with the LLaMA-2 vocabulary of 32,000 tokens, from
`jax.eval_shape` (tests/test_lm_ngpt_moeut.py). The paper trains on OpenWebText; this repository's
text pipeline is the byte corpus (`name="bytes"`, 259 tokens), which a run of this config uses
(0.5B: 402,923,520 + 2·259·1024 + 259 parameters). Adam without weight decay and without
warmup, as in the paper; the weight matrices are renormalised after every step
(`lm.Model.post_update`).

Args: variant ("0.5B" or "1B"), seq_len (the paper: 1k, 4k or 8k), batch (global sequences per
step; the paper: 512), steps, fsdp (devices that shard parameters; the rest split the batch).
"""
from big_attn.train import config_lib

VARIANTS = {"0.5B": dict(width=1024, depth=24, num_heads=16),   # d_model, layers, heads
            "1B": dict(width=1280, depth=36, num_heads=20)}
PAPER_VOCAB_SIZE = 32_000  # LLaMA-2 tokenizer


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="1B", seq_len=4096, batch=512, steps=200_000,
                             fsdp=-1)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {arg.variant!r}")
  config = config_lib.base_config()

  config.input = dict(name="bytes", seq_len=arg.seq_len, batch_size=arg.batch, heldout=0.05)

  sizes = VARIANTS[arg.variant]
  config.model_name = "lm"
  config.model = dict(**sizes, mlp_dim=4 * sizes["width"], block="ngpt", attention="ngpt",
                      qk_norm=False, tie_embeddings=False, rope_base=10_000.,
                      remat_policy="nothing_saveable", scan_layers=True, dtype="bfloat16",
                      param_dtype="float32")

  config.mesh = [("fsdp", arg.fsdp)]
  config.optax_name = "adamw"
  config.optax = dict(b1=0.9, b2=0.95, weight_decay=0.0)
  config.lr = 1.5e-3
  config.schedule = dict(warmup_steps=0, decay_type="cosine")
  config.grad_clip_norm = 0.0
  config.total_steps = arg.steps
  config.log_every = 50
  config.ckpt_every = 2000
  config.max_to_keep = 3
  config.evals.eval = dict(type="lm", every=5000, split="test", batch_size=arg.batch,
                           max_batches=8)
  return config_lib.declare_model_settings(config)
