r"""Small-scale reproductions of papers' claims, same budget per mechanism, embedded digits.

  nice python experiments/repro.py --which=sigmoid,cog,linear,registers,striped \
      --steps=400 --seeds=0,1
  python experiments/repro.py --smoke --results_dir=/tmp/repro   # seconds: tiny model, 3 steps

Every trained comparison runs `big_attn.main.train_and_evaluate` on `configs/vit_digits.py`
(ViT width 64, depth 4, 4 heads, 16 patch tokens, batch 64) with only the attention op (or the
register count) changed: the same steps, seeds, optimiser and data order. Each writes a Markdown
table to `experiments/results/repro_<name>.md` with the command, date, machine and versions.

- sigmoid: sigmoid attention with b = -log n vs softmax (Sigmoid Self-Attention, Ramapuram et
  al. 2024: matches softmax).
- cog: cog attention vs softmax (More Expressive Attention with Negative Weights, Lv et al.
  2024); also the fraction of negative attention weights (and of the weights' absolute mass)
  of the trained model on the test images.
- linear: performer, focused_linear, lightning, lognormal_linear vs softmax.
- registers: 0 vs 4 registers (Vision Transformers Need Registers, Darcet et al. 2024): max and
  median token norm of the last block's patch-token outputs on the test images, max/median.
- striped: causal ring vs striped attention work balance (Striped Attention, Brandon et al.
  2023), counted from `big_attn.parallel.blockwise.block_plan`, the kernels' own block plan
  (no training): unmasked blocks per device per ring step and the critical-path ratio.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from big_attn import checkpoint_io  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from big_attn import data  # noqa: E402
from big_attn import main as main_lib  # noqa: E402
from big_attn import models  # noqa: E402
from big_attn.parallel import blockwise  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
COMPARISONS = ("sigmoid", "cog", "linear", "registers", "striped")
LINEAR_OPS = ("performer", "focused_linear", "lightning", "lognormal_linear")
SMOKE_STEPS = 3


# ---------------------------------------------------------------------------------------------
# Training runs (shared between comparisons: the softmax baseline is trained once per seed).
# ---------------------------------------------------------------------------------------------
def _config(attention: str, seed: int, steps: int, smoke: bool, num_registers: int):
  spec = importlib.util.spec_from_file_location(
      "vit_digits", os.path.join(ROOT, "configs", "vit_digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"attention={attention},steps={steps}")
  config.seed = seed
  config.model.num_registers = num_registers
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.log_every = steps
  config.ckpt_every = steps
  config.max_to_keep = 1
  config.evals.eval.every = steps
  if smoke:
    config.input.image_size = 8
    config.input.batch_size = 16
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4))
    config.schedule = dict(warmup_steps=1, decay_type="cosine")
  side = config.input.image_size // config.model.patch_size[0]
  # Performer: one fixed draw of the random features (seed 0); FLatten: its depthwise
  # convolution over the patch grid (5x5 as the paper).
  op_args = {"performer": dict(feature_key=0), "focused_linear": dict(grid=(side, side))}
  if attention in op_args:
    config.model.attention_args = op_args[attention]
  return config


class Runs:
  """Trains (once) and remembers `(attention, seed, num_registers)` runs."""

  def __init__(self, steps: int, smoke: bool, workdir: str):
    self.steps, self.smoke, self.workdir = steps, smoke, workdir
    self._done: dict[tuple[str, int, int], dict[str, Any]] = {}

  def get(self, attention: str, seed: int, num_registers: int = 0) -> dict[str, Any]:
    """`{"accuracy", "loss", "params", "config"}` of the trained model."""
    run_key = (attention, seed, num_registers)
    if run_key not in self._done:
      config = _config(attention, seed, self.steps, self.smoke, num_registers)
      workdir = os.path.join(self.workdir, f"{attention}_s{seed}_r{num_registers}")
      main_lib.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
      last_eval = [m for m in metrics if "eval/accuracy" in m][-1]
      _, state = checkpoint_io.read_state(checkpoint_io.checkpoints_dir(workdir),
                                          step=self.steps)
      self._done[run_key] = dict(accuracy=float(last_eval["eval/accuracy"]),
                                 loss=float(last_eval["eval/loss"]), params=state["params"],
                                 config=config)
      print(f"  {attention} seed={seed} registers={num_registers}: "
            f"accuracy {self._done[run_key]['accuracy']:.4f}", flush=True)
    return self._done[run_key]


def _test_images(config) -> np.ndarray:
  input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
  batches = data.get_dataset(input_config, split="test", batch_size=128, seed=0, train=False)
  return np.concatenate([b["image"][b["mask"]] for b in batches])


def _intermediates(run: dict[str, Any], images: np.ndarray, names: tuple[str, ...]):
  """Outputs of the submodules whose name is in `names`, on `images`, as {path: array}."""
  config = run["config"]
  model = models.get("vit").Model(num_classes=10, **config.model)
  _, state = model.apply({"params": run["params"]}, jnp.asarray(images),
                         capture_intermediates=lambda mdl, _: mdl.name in names,
                         mutable=["intermediates"])
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  out = {}
  for path, value in flat:
    keys = [getattr(p, "key", None) for p in path]
    out["/".join(str(k) for k in keys if isinstance(k, str) and k != "__call__")] = value
  return out


def _mean_std(values) -> str:
  values = list(values)
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _accuracy_rows(runs: Runs, attentions, seeds, **kwargs) -> list[list[str]]:
  rows = []
  for attention in attentions:
    results = [runs.get(attention, s, **kwargs) for s in seeds]
    rows.append([f"`{attention}`", _mean_std(r["accuracy"] for r in results),
                 _mean_std(r["loss"] for r in results),
                 " ".join(f"{r['accuracy']:.4f}" for r in results)])
  return rows


ACCURACY_HEADER = ["attention", "test accuracy (mean ± sd)", "test loss", "per seed"]


# ---------------------------------------------------------------------------------------------
# The comparisons: each returns (title, intro, header, rows, finding).
# ---------------------------------------------------------------------------------------------
def compare_sigmoid(runs: Runs, seeds):
  rows = _accuracy_rows(runs, ("softmax", "sigmoid"), seeds)
  return ("Sigmoid vs softmax attention",
          "Sigmoid Self-Attention (Ramapuram et al., 2024) claims that sigmoid attention with "
          "the bias b = -log n matches softmax attention. `sigmoid` uses b = -log n by default.",
          ACCURACY_HEADER, rows)


def negative_weight_fractions(run: dict[str, Any], images: np.ndarray) -> tuple[float, float]:
  """Fraction of negative cog weights, and their share of Σ|w|, over all layers and heads."""
  acts = _intermediates(run, images, ("query", "key"))
  layers = sorted({k.rsplit("/", 1)[0] for k in acts})
  negative = mass_negative = total = mass = 0.0
  for layer in layers:
    q, k = acts[f"{layer}/query"], acts[f"{layer}/key"]
    s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
    w = jnp.sign(s) * jax.nn.softmax(jnp.abs(s), axis=-1)
    negative += float(jnp.sum(w < 0))
    total += w.size
    mass_negative += float(jnp.sum(jnp.where(w < 0, -w, 0.0)))
    mass += float(jnp.sum(jnp.abs(w)))
  return negative / total, mass_negative / mass


def compare_cog(runs: Runs, seeds, images):
  rows = _accuracy_rows(runs, ("softmax", "cog"), seeds)
  fractions = [negative_weight_fractions(runs.get("cog", s), images) for s in seeds]
  rows[0] += ["0 (softmax weights are positive)", "0"]
  rows[1] += [_mean_std(f[0] for f in fractions), _mean_std(f[1] for f in fractions)]
  return ("Cog attention (negative weights) vs softmax",
          "More Expressive Attention with Negative Weights (Lv et al., 2024): cog attention, "
          "w = sign(s)·softmax(|s|), lets heads subtract values; the paper reports it matching "
          "or beating softmax. The fraction of negative weights is measured on the test images "
          "over all layers, heads, queries and keys of the trained cog model; the mass share is "
          "Σ_{w<0}|w| / Σ|w|.",
          ACCURACY_HEADER + ["negative weights", "negative |w| mass"], rows)


def compare_linear(runs: Runs, seeds):
  rows = _accuracy_rows(runs, ("softmax",) + LINEAR_OPS, seeds)
  return ("Linear attention variants vs softmax",
          "Performer (FAVOR+ random features), FLatten Transformer's focused linear attention "
          "(with its depthwise convolution over the 4x4 patch grid), Lightning Attention-2 "
          "(no decay for a bidirectional ViT) and linear log-normal attention, each trained "
          "exactly as the softmax baseline. At 16 tokens linear attention saves nothing; the "
          "question is only how well each approximates/replaces softmax.",
          ACCURACY_HEADER, rows)


def artifact_norms(run: dict[str, Any], images: np.ndarray) -> tuple[float, float, float]:
  """Max, median and max/median of the last block's output norms over the patch tokens."""
  config = run["config"]
  last = f"encoderblock_{config.model.depth - 1}"
  acts = _intermediates(run, images, (last,))
  x = [v for k, v in acts.items() if k.endswith(last)][0]
  num_registers = config.model.num_registers
  patches = x[:, :x.shape[1] - num_registers] if num_registers else x
  norms = np.asarray(jnp.linalg.norm(patches, axis=-1)).ravel()
  top, med = float(norms.max()), float(np.median(norms))
  return top, med, top / med


def compare_registers(runs: Runs, seeds, images):
  rows = []
  for num_registers in (0, 4):
    results = [runs.get("softmax", s, num_registers=num_registers) for s in seeds]
    norms = [artifact_norms(r, images) for r in results]
    rows.append([str(num_registers), _mean_std(r["accuracy"] for r in results),
                 _mean_std(n[0] for n in norms), _mean_std(n[1] for n in norms),
                 _mean_std(n[2] for n in norms)])
  return ("Registers vs none: high-norm artifact tokens",
          "Vision Transformers Need Registers (Darcet et al., 2024): large ViTs trained long "
          "develop a few patch tokens of very high norm (artifacts) that registers remove. "
          "Norms are of the last block's output (before the final LayerNorm) for every patch "
          "token of every test image; registers are excluded.",
          ["registers", "test accuracy", "max patch-token norm", "median norm",
           "max / median"], rows)


def balance(num_shards: int) -> tuple[np.ndarray, np.ndarray]:
  """`[step, device]` computed (unmasked) blocks of causal ring and striped attention."""
  counts = []
  for schedule in ("ring", "striped"):
    c = np.zeros((num_shards, num_shards), np.int64)
    for step in range(num_shards):
      for device in range(num_shards):
        kind, _ = blockwise.block_plan(schedule, True, device, (device - step) % num_shards)
        c[step, device] = kind != blockwise.SKIP
    counts.append(c)
  return counts[0], counts[1]


def _ideal_pairs(schedule: str, num_shards: int, local_len: int) -> np.ndarray:
  """`[step, device]` visible q·k pairs (an ideal kernel's work) from the block plan."""
  c = np.zeros((num_shards, num_shards), np.int64)
  for step in range(num_shards):
    for device in range(num_shards):
      kind, offset = blockwise.block_plan(schedule, True, device, (device - step) % num_shards)
      c[step, device] = blockwise.visible_pair_count(kind, offset, local_len)
  return c


def compare_striped(shard_counts=(2, 4, 8), local_len=64):
  rows = []
  for p in shard_counts:
    ring, striped = balance(p)
    ring_pairs = _ideal_pairs("ring", p, local_len)
    striped_pairs = _ideal_pairs("striped", p, local_len)
    crit_ring, crit_striped = ring_pairs.max(1).sum(), striped_pairs.max(1).sum()
    rows.append([str(p), " ".join(map(str, ring.sum(1))), " ".join(map(str, striped.sum(1))),
                 str(ring.max(1).sum()), str(striped.max(1).sum()), str(crit_ring),
                 str(crit_striped), f"{crit_ring / crit_striped:.2f}"])
  return ("Striped vs ring attention: causal work balance",
          "Striped Attention (Brandon et al., 2023): in causal ring attention the devices "
          "holding early tokens have nothing to compute in most ring steps while the others "
          "compute full blocks; striping (token t on device t mod P) gives every device a "
          "nearly triangular block at every step. A ring step ends when its slowest device "
          "ends, so the critical path is Σ_steps max_devices(work). Blocks: unmasked blocks "
          "(computed, fully or with a mask) per step summed over devices, and the critical path "
          "in blocks; pairs: visible q·k pairs (an ideal kernel's work) with "
          f"{local_len} tokens per device. The paper reports up to 1.45x end to end on 8 A100s "
          "and 1.65x at 786k tokens on 16 TPUv4 chips; `experiments/bench_sequence_parallel.py` "
          "times the kernels.",
          ["P", "ring: unmasked blocks per step", "striped: unmasked blocks per step",
           "ring critical path (blocks)", "striped critical path (blocks)",
           "ring critical path (pairs)", "striped critical path (pairs)",
           "ring / striped (pairs)"], rows)


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------
def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{cpu}, {os.cpu_count()} cores (load average {load:.1f}), "
          f"{jax.devices()[0].platform} backend; jax {jax.__version__}, python "
          f"{platform.python_version()}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def write_result(path: str, title: str, intro: str, header, rows, *, command: str,
                 budget: str) -> str:
  text = (f"# {title}\n\nCommand: `{command}`\n\n"
          f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
          f"{machine()}.\n\n{intro}\n\nBudget: {budget}\n\n{markdown_table(header, rows)}\n")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text


def run(which: list[str], *, steps: int, seeds: list[int], smoke: bool, results_dir: str,
        command: str) -> dict[str, str]:
  """Runs the comparisons in `which`; returns {name: Markdown text written}."""
  unknown = sorted(set(which) - set(COMPARISONS))
  if unknown:
    raise ValueError(f"--which must name comparisons from {COMPARISONS}, got {unknown}")
  if steps < 1 or not seeds:
    raise ValueError(f"need steps >= 1 and at least one seed, got {steps} and {seeds}")
  os.makedirs(results_dir, exist_ok=True)
  written = {}
  with tempfile.TemporaryDirectory(prefix="repro_") as workdir:
    runs = Runs(steps, smoke, workdir)
    images = None
    model_desc = ("tiny smoke model (width 16, depth 1, 8x8 images)" if smoke else
                  "ViT width 64, depth 4, 4 heads, MLP 128, 16 patch tokens (4x4 patches of "
                  "16x16 digits), GAP head, AdamW lr 2e-3, 100 warmup steps then cosine, batch 64")
    budget = (f"{steps} training steps per run, seeds {', '.join(map(str, seeds))}, "
              f"{model_desc}; accuracy on the 300 held-out digits after the last step.")
    comparisons: dict[str, Callable[[], tuple]] = {
        "sigmoid": lambda: compare_sigmoid(runs, seeds),
        "cog": lambda: compare_cog(runs, seeds, images),
        "linear": lambda: compare_linear(runs, seeds),
        "registers": lambda: compare_registers(runs, seeds, images),
        "striped": lambda: compare_striped((2, 4) if smoke else (2, 4, 8),
                                           8 if smoke else 64),
    }
    for name in which:
      print(f"== {name}", flush=True)
      if images is None and name in ("cog", "registers"):
        images = _test_images(_config("softmax", 0, steps, smoke, 0))
      title, intro, header, rows = comparisons[name]()
      path = os.path.join(results_dir, f"repro_{name}.md")
      written[name] = write_result(
          path, title, intro, header, rows, command=command,
          budget="no training (counted)." if name == "striped" else budget)
      print(markdown_table(header, rows), flush=True)
  return written


def main(argv=None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--which", default=",".join(COMPARISONS),
                      help=f"comma-separated subset of {','.join(COMPARISONS)}")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seeds", default="0", help="comma-separated seeds")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny model and {SMOKE_STEPS} steps, to check that it runs")
  parser.add_argument("--results_dir", default=RESULTS)
  args = parser.parse_args(argv)
  steps = SMOKE_STEPS if args.smoke else args.steps
  argv = sys.argv[1:] if argv is None else argv
  command = "python experiments/repro.py " + " ".join(shlex.quote(a) for a in argv)
  return run([w for w in args.which.split(",") if w], steps=steps,
             seeds=[int(s) for s in args.seeds.split(",")], smoke=args.smoke,
             results_dir=args.results_dir, command=command.strip())


if __name__ == "__main__":
  main()
