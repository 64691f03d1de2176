"""Attention reuse on the digits DiT and the byte LM: attention FLOPs saved and output error.

  python experiments/bench_attention_reuse.py                 # 300 DiT and 300 LM steps
  python experiments/bench_attention_reuse.py --dit_steps=100 --lm_steps=100 --out=/tmp/ar

Each technique of `big_attn.layers.attention_reuse` is applied, without any retraining, to a
model trained with its full attention through `big_attn.main`:
- DiT (`configs/dit_digits.py`, 4 blocks, 16 tokens, `--dit_steps` steps): 40 DDIM samples
  (50 steps, classifier-free guidance 2, x̂_0 clipped, as the config's evaluation) with each
  reuse setting against the full computation from the same noise. Attention FLOPs are those
  `dit.sample(..., return_stats=True)` counts for the attention calls it executes (score and
  value products; window attention as a windowed kernel would compute it), summed over the run.
  Error: ‖x − x_full‖ / ‖x_full‖ over the samples, and max |x − x_full|.
- LM (`configs/lm_bytes.py`, variant tiny: 4 blocks, 256-byte sequences, `--lm_steps`
  steps): EchoAtt weight sharing (`shared_attention_layers`, the trained model's query and key
  projections of those layers dropped) and attention-free blocks (`attention_free_layers`, the
  attention sublayer dropped) on 8 held-out rows. FLOPs: XLA's cost analysis of the jitted
  forward (whole model); error: relative RMS of the logits, and the held-out next-byte loss.
Writes `--out`/attention_reuse.md (default experiments/results/).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXPERIMENTS)
sys.path.insert(0, ROOT)
from big_attn import checkpoint_io  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn import main as main_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.data import text  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.models import dit, lm  # noqa: E402  pylint: disable=g-import-not-at-top

SAMPLE_STEPS, GUIDANCE, PER_CLASS = 50, 2.0, 4
DIT_SETTINGS = {
    "full": None,
    "PAB (paper: ranges 2 / 6, t in (450, 930))": {"method": "pab"},
    "PAB, range 3, t in (100, 950)": {"method": "pab", "self_range": 3,
                                      "timesteps": (100, 950)},
    "DiTFastAttn ast, full every 2nd step": {"method": "ditfastattn", "plan": "ast",
                                             "full_every": 2},
    "DiTFastAttn wars, full every 5th step": {"method": "ditfastattn", "plan": "wars",
                                              "full_every": 5},
    "DiTFastAttn asc after the first step": {"method": "ditfastattn", "plan": "asc"},
    "DiTFastAttn wars+asc, full every 5th step": {"method": "ditfastattn", "plan": "wars+asc",
                                                  "full_every": 5},
}
LM_SETTINGS = {
    "full": {},
    "EchoAtt, blocks 2, 3 share": {"shared_attention_layers": (2, 3)},
    "EchoAtt, blocks 1, 2, 3 share": {"shared_attention_layers": (1, 2, 3)},
    "attention-free block 1": {"attention_free_layers": (1,)},
    "attention-free blocks 1, 2": {"attention_free_layers": (1, 2)},
}


def _config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.ckpt_every = config.total_steps
  config.evals.eval.every = config.total_steps
  return config


def _train(config, model_cls, info):
  """Trains `config` in a temporary directory; returns the model and its trained parameters."""
  model = model_cls(**main_lib.model_kwargs(config, info, model_cls, None))
  with tempfile.TemporaryDirectory() as workdir:
    main_lib.train_and_evaluate(config, workdir)
    _, state = checkpoint_io.read_state(checkpoint_io.checkpoints_dir(workdir))
  return model, jax.tree.map(jnp.asarray, flax.core.unfreeze(state["params"]))


def run_dit(steps: int) -> list[dict]:
  config = _config("dit_digits", f"steps={steps}")
  model, params = _train(config, dit.Model, {"num_classes": 10})
  labels = jnp.repeat(jnp.arange(10), PER_CLASS)
  rows, full = [], None
  for name, setting in DIT_SETTINGS.items():
    images, stats = dit.sample(model, params, labels, jax.random.key(0), SAMPLE_STEPS, GUIDANCE,
                               image_shape=(8, 8, 1), clip_denoised=True,
                               attention_reuse=setting, return_stats=True)
    images = np.asarray(images, np.float64)
    flops = float(stats["self"]["flops"]) + float(stats["cross"]["flops"])
    calls = int(stats["self"]["calls"]) + int(stats["cross"]["calls"])
    if full is None:
      full = dict(images=images, flops=flops)
    diff = images - full["images"]
    rows.append(dict(name=name, setting=setting, calls=calls, flops=flops,
                     saved=1.0 - flops / full["flops"],
                     rel_error=float(np.linalg.norm(diff) / np.linalg.norm(full["images"])),
                     max_error=float(np.abs(diff).max())))
    print(rows[-1], flush=True)
  return rows


def _drop_attention(params, fields):
  """The trained parameters less the projections the variant does not create."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  drop = [f"layers_{i}/attention/{n}/" for i in fields.get("shared_attention_layers", ())
          for n in ("query", "key", "query_norm", "key_norm")]
  drop += [f"layers_{i}/attention/" for i in fields.get("attention_free_layers", ())]
  drop += [f"layers_{i}/attention_norm/" for i in fields.get("attention_free_layers", ())]
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not any(k.startswith(d) for d in drop)}, sep="/")


def run_lm(steps: int) -> list[dict]:
  config = _config("lm_bytes", f"steps={steps}")
  model, params = _train(config, lm.Model, {"vocab_size": text.VOCAB_SIZE})
  source = text.source({k: v for k, v in config.input.items() if k != "batch_size"}, "test")
  batch = {k: jnp.asarray(np.stack([source[i][k] for i in range(8)]))
           for k in ("inputs", "targets", "positions", "segment_ids", "weights")}
  rows, full = [], None
  for name, fields in LM_SETTINGS.items():
    variant = model.clone(**fields)
    variant_params = _drop_attention(params, fields)

    def forward(p, variant=variant):
      return variant.apply({"params": p}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])

    lowered = jax.jit(forward).lower(variant_params)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    logits = np.asarray(lowered.compile()(variant_params), np.float64)
    losses = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                             batch["targets"])
    loss = float(jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"]))
    if full is None:
      full = dict(logits=logits, flops=float(cost["flops"]))
    weights = np.asarray(batch["weights"])[..., None] > 0
    diff = np.where(weights, logits - full["logits"], 0.0)
    rows.append(dict(name=name, parameters=lm.count_params(variant), flops=float(cost["flops"]),
                     saved=1.0 - float(cost["flops"]) / full["flops"], loss=loss,
                     rel_error=float(np.linalg.norm(diff) / np.linalg.norm(
                         np.where(weights, full["logits"], 0.0)))))
    print(rows[-1], flush=True)
  return rows


def report(dit_rows, lm_rows, dit_steps, lm_steps, command) -> str:
  lines = [
      "# Attention reuse: FLOPs saved and output error vs the full computation",
      "",
      f"`{command}`",
      "",
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; jax "
      f"{jax.__version__}, {jax.devices()[0].platform}. No retraining: each technique is "
      "applied to the model trained with full attention.",
      "",
      f"## DiT (configs/dit_digits.py, {dit_steps} training steps)",
      "",
      f"{10 * PER_CLASS} samples, {SAMPLE_STEPS} DDIM steps, guidance {GUIDANCE} (batch of "
      f"{20 * PER_CLASS} rows per step); attention FLOPs summed over the run.",
      "",
      "| setting | attention calls | attention MFLOPs | saved | rel. error | max error |",
      "|---|---|---|---|---|---|",
  ]
  for r in dit_rows:
    lines.append(f"| {r['name']} | {r['calls']} | {r['flops'] / 1e6:.1f} | {r['saved']:.0%} | "
                 f"{r['rel_error']:.4f} | {r['max_error']:.4f} |")
  lines += [
      "",
      f"## LM (configs/lm_bytes.py, variant tiny, {lm_steps} training steps)",
      "",
      "8 held-out rows of 256 bytes; FLOPs of the whole forward (XLA cost analysis).",
      "",
      "| setting | parameters | forward GFLOPs (8 rows) | saved | held-out loss | "
      "logits rel. error |",
      "|---|---|---|---|---|---|",
  ]
  for r in lm_rows:
    lines.append(f"| {r['name']} | {r['parameters']:,} | {r['flops'] / 1e9:.4f} | "
                 f"{r['saved']:.1%} | {r['loss']:.4f} | {r['rel_error']:.4f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dit_steps", type=int, default=300)
  parser.add_argument("--lm_steps", type=int, default=300)
  parser.add_argument("--out", default=os.path.join(EXPERIMENTS, "results"))
  args = parser.parse_args()
  dit_rows = run_dit(args.dit_steps)
  lm_rows = run_lm(args.lm_steps)
  command = "python experiments/bench_attention_reuse.py " + " ".join(sys.argv[1:])
  out = report(dit_rows, lm_rows, args.dit_steps, args.lm_steps, command.strip())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "attention_reuse.md"), "w", encoding="utf-8") as f:
    f.write(out)
  print(out)


if __name__ == "__main__":
  main()
