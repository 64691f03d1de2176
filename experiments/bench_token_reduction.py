"""Token reduction on the digits ViT: accuracy against FLOPs and throughput, per method.

  python experiments/bench_token_reduction.py                     # 300 steps per method
  python experiments/bench_token_reduction.py --steps=100 --out=/tmp/tr
  python experiments/bench_token_reduction.py --methods=none,stvit,lookupvit
  python experiments/bench_token_reduction.py --flops_only --out=/tmp/tr   # seconds a method

Each method of `big_attn.layers.token_reduction` (and none; `--methods`: a subset) trains
`configs/vit_digits.py` (width 64, depth 4, 16 patch tokens of 4x4 pixels on 16x16 digits)
with a class token (`pool_type="cls"`, as EViT needs) for `--steps` steps through `big_attn.main`, then:
- accuracy: the held-out top-1 accuracy of the run's last evaluation;
- forward GFLOPs per image: XLA's cost analysis of the jitted inference forward at batch 64
  (`lowered.cost_analysis()["flops"]` / 64, as `big_attn.main.step_flops` counts a step), and the
  train step's FLOPs per image from `big_attn.main`'s dry run;
- throughput: images per second of the jitted inference forward at batch 64 (median of
  `--rounds` timed calls) and of training (`train/examples_per_sec` of the run's metrics).
The tokens each `Attention` sees are listed per method (STViT's semantic tokens' cross-attention
included). `--flops_only`: the token counts and forward FLOPs alone, from the lowered forward
(nothing compiled, trained or timed). Writes `--out`/token_reduction.md (default experiments/results/).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXPERIMENTS)
sys.path.insert(0, ROOT)
from big_attn import main as main_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn import models  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.layers.attention import Attention  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.train import metrics as metrics_lib  # noqa: E402  pylint: disable=g-import-not-at-top

BATCH = 64
# The tiny ViT's 16 patch tokens (a 4x4 grid): EViT, SiT, SPA and DependencyViT-Lite keep 70%
# at EViT's layers scaled to depth 4 (1, 2, 3); ToMe and MCTF merge 2 tokens in every block
# (the papers' r = 16 would halve the 16 tokens at once); STViT replaces them by 4 semantic
# tokens after block 1's attention, LookupViT compresses them into 4 tokens before block 0.
# "mctf_ahead" reads the next block's attention (one-step-ahead), "spa_packed" keeps each
# image's tokens with gate > 0.5 (the rest masked), MSTM fuses scales 1 and 2 of the grid and
# merges 30% at EViT's layers.
METHODS = {
    "none": None,
    "evit": {"method": "evit", "keep_rate": 0.7},
    "tome": {"method": "tome", "r": 2},
    "mctf": {"method": "mctf", "r": 2},
    "stvit": {"method": "stvit", "num_tokens": 4},
    "sit": {"method": "sit", "keep_rate": 0.7},
    "spa": {"method": "spa", "keep_rate": 0.7},
    "dependencyvit": {"method": "dependencyvit", "keep_rate": 0.7},
    "lookupvit": {"method": "lookupvit", "num_tokens": 4},
    "mctf_ahead": {"method": "mctf", "r": 2, "one_step_ahead": True},
    "spa_packed": {"method": "spa", "keep_rate": 0.7, "threshold": 0.5},
    "mstm": {"method": "mstm", "keep_rate": 0.7},
}


def get_config(steps: int, reduction):
  spec = importlib.util.spec_from_file_location(
      "vit_digits", os.path.join(ROOT, "configs", "vit_digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"steps={steps}")
  config.model.pool_type = "cls"
  config.model.token_reduction = reduction
  config.evals.eval.every = steps
  config.ckpt_every = 10**9
  config.log_every = max(steps // 3, 1)
  return config


def forward_numbers(config, rounds: int) -> dict:
  """Forward FLOPs per image, inference images/s and the token counts of the blocks; with
  `rounds` 0 the FLOPs and token counts only, from abstract parameters."""
  model = models.get(config.model_name).Model(num_classes=10, **config.model)
  images = jnp.zeros((BATCH, 16, 16, 1), jnp.float32)
  init = jax.jit(model.init) if rounds else functools.partial(jax.eval_shape, model.init)
  params = init(jax.random.key(0), images)
  tokens = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, Attention) and context.method_name == "attend":
      tokens.append(args[0].shape[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.apply, params, images)
  forward = jax.jit(model.apply)
  lowered = forward.lower(params, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"forward_gflops": float(cost["flops"]) / BATCH / 1e9, "tokens": tokens}
  if not rounds:
    return out
  compiled = lowered.compile()
  jax.block_until_ready(compiled(params, images))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - start)
  return dict(out, infer_per_sec=BATCH / statistics.median(times))


def run(steps: int, rounds: int, methods: list[str]) -> list[dict]:
  rows = []
  for name in methods:
    reduction = METHODS[name]
    config = get_config(steps, reduction)
    row = {"method": name, "config": reduction, **forward_numbers(config, rounds)}
    if not rounds:
      rows.append(row)
      continue
    with tempfile.TemporaryDirectory() as workdir:
      dry = get_config(steps, reduction)
      dry.dry_run = True
      row["train_gflops"] = main_lib.train_and_evaluate(dry, workdir)["flops"] / BATCH / 1e9
    with tempfile.TemporaryDirectory() as workdir:
      main_lib.train_and_evaluate(config, workdir)
      records = metrics_lib.read_records(workdir)
    row["accuracy"] = [r["eval/accuracy"] for r in records if "eval/accuracy" in r][-1]
    row["train_per_sec"] = [r["train/examples_per_sec"] for r in records
                            if "train/examples_per_sec" in r][-1]
    print(row, flush=True)
    rows.append(row)
  return rows


def report(rows: list[dict], steps: int, rounds: int, command: str) -> str:
  """The results page; with `rounds` 0 (`--flops_only`) the token counts and FLOPs only."""
  base = next((row for row in rows if row["method"] == "none"), rows[0])
  trained = rounds > 0
  lines = [
      "# Token reduction on the digits ViT",
      "",
      f"`{command}`",
      "",
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; jax "
      f"{jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores shared with "
      f"other users (load average {os.getloadavg()[0]:.1f} at the end)"
      + (": throughputs are noisy." if trained else "."),
      "",
      "configs/vit_digits.py (width 64, depth 4, 4 heads, 16 patch tokens) with a class token, " + (
          f"{steps} AdamW steps of batch {BATCH} per method, one evaluation on the held-out "
          f"split at the end; forward numbers at batch {BATCH}, median of {rounds} calls. FLOPs "
          "from XLA's cost analysis, per image." if trained else
          f"nothing trained or timed: forward FLOPs per image from XLA's cost analysis of the "
          f"lowered forward at batch {BATCH}."),
      "",
  ]
  columns = (["method", "setting", "tokens per block"] + ["accuracy"] * trained
             + ["forward GFLOPs", f"vs {base['method']}"]
             + ["train GFLOPs", "inference img/s", "train img/s"] * trained)
  lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
  for row in rows:
    setting = ", ".join(f"{k}={v}" for k, v in (row["config"] or {}).items() if k != "method")
    cells = [row["method"], setting or "-", str(row["tokens"])]
    if trained:
      cells.append(f"{row['accuracy']:.3f}")
    cells += [f"{row['forward_gflops']:.5f}",
              f"{row['forward_gflops'] / base['forward_gflops']:.2f}x"]
    if trained:
      cells += [f"{row['train_gflops']:.5f}", f"{row['infer_per_sec']:.0f}",
                f"{row['train_per_sec']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(EXPERIMENTS, "results"))
  parser.add_argument("--flops_only", action="store_true",
                      help="token counts and forward FLOPs only: nothing trained or timed")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, among {', '.join(METHODS)}")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected names among {list(METHODS)}")
  rounds = 0 if args.flops_only else args.rounds
  rows = run(args.steps, rounds, methods)
  command = "python experiments/bench_token_reduction.py " + " ".join(sys.argv[1:])
  text = report(rows, args.steps, rounds, command.strip())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "token_reduction.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
