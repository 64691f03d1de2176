"""CPU attention paths: big_attn's XLA softmax path and linear ops against jax.nn and an einsum.

  python experiments/bench_cpu.py                                  # every section
  python experiments/bench_cpu.py --sections=ops,linear --rounds=5
  python experiments/bench_cpu.py --smoke --out=/tmp/bench_cpu     # tiny sizes, one round

Sections (`--sections`, comma-separated):
- ops: `big_attn.ops.dot_product_attention(implementation="xla")` and a naive einsum softmax,
  each against `jax.nn.dot_product_attention(implementation="xla")`: time and compiled
  temporary memory (`memory_analysis().temp_size_in_bytes`), forward and forward+backward,
  float32, batch 1, 8 heads, head dim 64, for plain, causal, GQA (8 query / 2 kv heads, causal),
  a random boolean mask, 4 segments and a causal window of 128 keys, at each length. Every
  output (and, with the backward, every gradient) is compared with jax.nn's; a mismatch is
  flagged with "!".
- linear: the linear-time ops and softmax (our XLA path), causal and not, forward and
  forward+backward: time against length, the exponent of a power-law fit t ∝ L^p, and the
  length where each op becomes faster than softmax (log-log interpolation between lengths).
- loop: the training loop against a hand-written loop and the compile time of the first step,
  from `experiments/bench_train_loop.py`'s `measure(config_name, rounds)`.

Timings: within a row (one shape) the implementations are timed in turn, one call each per
round, `--rounds` times (more for short rows); the table gives medians and ratios of medians of the same run. The
2-core machine is shared, so single timings are noisy; ratios from alternating rounds are what
to read. The tables go to `--out`/cpu_paths.md and the linear section's plot to cpu_paths.png.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXPERIMENTS))
from big_attn import ops  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.interpret import plots  # noqa: E402  pylint: disable=g-import-not-at-top

RESULTS = os.path.join(EXPERIMENTS, "results")
SECTIONS = ("ops", "linear", "loop")
HEADS, HEAD_DIM = 8, 64
MIB = 2 ** 20
CHECK_TOL = 1e-3  # float32 against jax.nn, relative to the largest value of jax.nn's result


def _header() -> str:
  dev = jax.devices()[0]
  import jaxlib  # pylint: disable=g-import-not-at-top
  return (f"Device: {dev.platform} / {dev.device_kind} (x{jax.device_count()}), "
          f"{os.cpu_count()} cores; jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
          f"The machine was shared with other users while this ran (load average "
          f"{os.getloadavg()[0]:.1f} at the start): single timings are noisy, the ratios come "
          "from alternating rounds in one run.")


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def _fwd_bwd(fn):
  """(q, k, v) -> (out, (dq, dk, dv)) for the cotangent out (the output's own values)."""
  def step(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)
  return step


def compile_all(fns: dict, args) -> dict:
  """name -> compiled executable, for `fns` of the same arguments."""
  return {name: jax.jit(fn).lower(*args).compile() for name, fn in fns.items()}


def temp_mib(compiled) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / MIB


def rounds_at(rounds: int, length: int) -> int:
  """`rounds` from 2048 tokens up, more below (up to 8x at 256): short rows are noisier and
  cheap, so every row takes about as long."""
  return rounds * min(8, max(1, 2048 // length))


def alternating_medians(compiled: dict, args, rounds: int) -> tuple[dict, dict]:
  """name -> median seconds of one call, wall-clock and CPU time of this process (all its
  threads; steadier than wall-clock on a loaded machine), the implementations timed in turn
  in each round."""
  for fn in compiled.values():
    jax.block_until_ready(fn(*args))  # Warm up.
  wall, cpu = ({name: [] for name in compiled} for _ in range(2))
  for _ in range(rounds):
    for name, fn in compiled.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return ({name: float(np.median(t)) for name, t in wall.items()},
          {name: float(np.median(t)) for name, t in cpu.items()})


def max_relative_error(got, want) -> float:
  """Largest |got - want| over all leaves, relative to the largest |want| (at least 1)."""
  error = 0.0
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    y = np.asarray(y, np.float64)
    error = max(error, float(np.abs(np.asarray(x, np.float64) - y).max(initial=0.0))
                / max(1.0, float(np.abs(y).max(initial=0.0))))
  return error


def _inputs(length: int, kv_heads: int = HEADS, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, length, heads, HEAD_DIM), jnp.float32)
               for key, heads in zip(keys, (HEADS, kv_heads, kv_heads)))


# ---------------------------------------------------------------------------------------------
# ops: big_attn's XLA path and a naive einsum against jax.nn.
# ---------------------------------------------------------------------------------------------
def _case_args(case: str, length: int, window: int) -> tuple[int, dict, dict]:
  """(kv heads, big_attn keyword arguments, jax.nn keyword arguments) of a case."""
  if case == "plain":
    return HEADS, {}, {}
  if case in ("causal", "gqa"):
    return HEADS if case == "causal" else 2, dict(is_causal=True), dict(is_causal=True)
  if case == "mask":
    mask = jax.random.bernoulli(jax.random.key(1), 0.9, (1, 1, length, length))
    return HEADS, dict(mask=mask), dict(mask=mask)
  if case == "segments":
    segment_ids = jnp.repeat(jnp.arange(4), -(-length // 4))[None, :length]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return HEADS, dict(segment_ids=segment_ids), dict(mask=mask)
  if case == "window":
    return HEADS, dict(is_causal=True, local_window_size=(window, 0)), dict(
        is_causal=True, local_window_size=(window, 0))
  raise ValueError(f"unknown case {case!r}")


def naive_attention(query, key, value, *, mask=None, is_causal=False, local_window_size=None):
  """softmax(QKᵀ/√d, masked) V as einsums, keys and values repeated for GQA."""
  groups = query.shape[2] // key.shape[2]
  key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
  logits = jnp.einsum("btnd,bsnd->bnts", query, key) / math.sqrt(query.shape[-1])
  t, s = logits.shape[-2:]
  allowed = jnp.ones((t, s), bool) if mask is None else mask
  if is_causal:
    allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
  if local_window_size is not None:
    allowed = allowed & ~jnp.tril(jnp.ones((t, s), bool), -local_window_size[0] - 1)
  logits = jnp.where(allowed, logits, -1e30)
  return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), value)


def run_ops(lengths, cases, rounds: int, window: int) -> list[dict]:
  rows = []
  for case in cases:
    for length in lengths:
      kv_heads, ours_kwargs, ref_kwargs = _case_args(case, length, min(window, length))
      fns = {
          "ours": lambda q, k, v, kw=ours_kwargs: ops.dot_product_attention(
              q, k, v, implementation="xla", **kw),
          "jax.nn": lambda q, k, v, kw=ref_kwargs: jax.nn.dot_product_attention(
              q, k, v, implementation="xla", **kw),
          "einsum": functools.partial(naive_attention, **ref_kwargs),
      }
      args = _inputs(length, kv_heads)
      for mode in ("fwd", "fwd+bwd"):
        compiled = compile_all(fns if mode == "fwd" else
                               {n: _fwd_bwd(f) for n, f in fns.items()}, args)
        want = compiled["jax.nn"](*args)
        errors = {n: max_relative_error(compiled[n](*args), want) for n in ("ours", "einsum")}
        seconds, cpu = alternating_medians(compiled, args, rounds_at(rounds, length))
        row = dict(case=case, length=length, mode=mode)
        for name in compiled:
          row[f"{name} ms"] = 1e3 * seconds[name]
          row[f"{name} MiB"] = temp_mib(compiled[name])
        for name in ("ours", "einsum"):
          row[f"{name} time"] = seconds[name] / seconds["jax.nn"]
          row[f"{name} cpu"] = cpu[name] / cpu["jax.nn"]
          row[f"{name} mem"] = row[f"{name} MiB"] / max(row["jax.nn MiB"], 1e-9)
          row[f"{name} ok"] = errors[name] <= CHECK_TOL
        rows.append(row)
        print(_ops_line(row), flush=True)
  return rows


OPS_COLUMNS = ("case", "length", "mode", "ours time", "ours cpu", "einsum time", "einsum cpu",
               "ours mem", "einsum mem",
               "ours ms", "jax.nn ms", "einsum ms", "ours MiB", "jax.nn MiB", "einsum MiB")


def _ops_line(row: dict) -> str:
  cells = []
  for col in OPS_COLUMNS:
    value = row[col]
    if col.endswith((" time", " cpu")):
      value = f"{value:.2f}" + ("" if row[col.split()[0] + " ok"] else " !")
    elif isinstance(value, float):
      value = f"{value:.2f}" if col.endswith("mem") else f"{value:.1f}"
    cells.append(str(value))
  return "| " + " | ".join(cells) + " |"


def ops_table(rows: list[dict]) -> str:
  header = ("| case | L | mode | ours / jax.nn time | ours / jax.nn CPU time | einsum / "
            "jax.nn time | einsum / jax.nn CPU time | ours / jax.nn "
            "temp | einsum / jax.nn temp | ours ms | jax.nn ms | einsum ms | ours temp MiB | "
            "jax.nn temp MiB | einsum temp MiB |")
  lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
  lines += [_ops_line(row) for row in rows]
  bad = [r for r in rows if not (r["ours ok"] and r["einsum ok"])]
  if bad:
    lines.append(f"\n! {len(bad)} row(s) differ from jax.nn by more than {CHECK_TOL} "
                 "(relative): their timings measure a wrong result.")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# linear: time against length, power-law exponents, crossover with softmax.
# ---------------------------------------------------------------------------------------------
LINEAR_OPS = ("performer", "lightning", "focused_linear", "lognormal_linear", "latte")
NUM_LATENTS = 64


def _linear_fns(causal: bool, names) -> dict:
  latents = jax.random.normal(jax.random.key(2), (HEADS, NUM_LATENTS, HEAD_DIM), jnp.float32)
  op_args = {"performer": dict(feature_key=0), "latte": dict(latents=latents)}
  fns = {"softmax": functools.partial(ops.dot_product_attention, is_causal=causal,
                                      implementation="xla")}
  for name in names:
    fns[name] = functools.partial(ops.get(name), is_causal=causal, **op_args.get(name, {}))
  return fns


def run_linear(lengths, names, rounds: int, max_temp_mib: float
               ) -> tuple[list[dict], list[str]]:
  """Rows (op, causal, mode, length, ms); a (length, mode) whose compiled temporary memory
  exceeds `max_temp_mib` is skipped (noted)."""
  rows, skipped = [], []
  for causal in (True, False):
    fns = _linear_fns(causal, names)
    for mode in ("fwd", "fwd+bwd"):
      for length in lengths:
        args = _inputs(length)
        compiled = compile_all(fns if mode == "fwd" else
                               {n: _fwd_bwd(f) for n, f in fns.items()}, args)
        big = {n: temp_mib(c) for n, c in compiled.items() if temp_mib(c) > max_temp_mib}
        for name, mib in big.items():
          skipped.append(f"{name} causal={causal} {mode} L={length}: {mib:.0f} MiB temporary")
          del compiled[name]
        seconds, cpu = alternating_medians(compiled, args, rounds_at(rounds, length))
        for name, sec in seconds.items():
          rows.append(dict(op=name, causal=causal, mode=mode, length=length, ms=1e3 * sec,
                           cpu_ms=1e3 * cpu[name]))
        print(f"causal={causal} {mode} L={length}: " + ", ".join(
            f"{n} {1e3 * s:.1f} ms" for n, s in seconds.items()), flush=True)
  return rows, skipped


def fit_exponent(lengths, seconds) -> float:
  """p of the least-squares fit log t = p log L + c."""
  return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])


def crossover(lengths, op_seconds, softmax_seconds) -> str:
  """The length where the op's time falls below softmax's, interpolated in log-log between
  the measured lengths: "< L0" when it is faster at every length, "> Ln" when at none."""
  log_ratio = np.log(np.asarray(op_seconds) / np.asarray(softmax_seconds))
  if log_ratio[0] < 0:
    return f"< {lengths[0]}" if np.all(log_ratio < 0) else "none (faster only at some)"
  for i in range(1, len(lengths)):
    if log_ratio[i] < 0:
      x0, x1 = np.log(lengths[i - 1]), np.log(lengths[i])
      at = x0 + (x1 - x0) * log_ratio[i - 1] / (log_ratio[i - 1] - log_ratio[i])
      return f"{math.exp(at):.0f}"
  return f"> {lengths[-1]}"


def linear_table(rows: list[dict], key: str = "ms") -> str:
  """Rows of `run_linear` by op, causal and mode; times from `key` ("ms": wall-clock,
  "cpu_ms": CPU time)."""
  lengths = sorted({r["length"] for r in rows})
  timed = {(r["op"], r["causal"], r["mode"], r["length"]): r[key] for r in rows}
  header = ("| op | causal | mode | " + " | ".join(f"L={n} ms (/ softmax)" for n in lengths)
            + " | exponent | faster than softmax from L |")
  lines = [header, "|" + "---|" * (header.count(" | ") + 1)]
  for causal in (True, False):
    for mode in ("fwd", "fwd+bwd"):
      for op in ("softmax",) + LINEAR_OPS:
        have = [n for n in lengths if (op, causal, mode, n) in timed]
        if not have:
          continue
        cells = []
        for n in lengths:
          ms, base = timed.get((op, causal, mode, n)), timed.get(("softmax", causal, mode, n))
          cells.append("-" if ms is None else f"{ms:.1f}" if op == "softmax" or base is None
                       else f"{ms:.1f} ({ms / base:.2f})")
        exponent = (f"{fit_exponent(have, [timed[(op, causal, mode, n)] for n in have]):.2f}"
                    if len(have) > 1 else "-")
        both = [n for n in have if ("softmax", causal, mode, n) in timed]
        cross = "-" if op == "softmax" or not both else crossover(
            both, [timed[(op, causal, mode, n)] for n in both],
            [timed[("softmax", causal, mode, n)] for n in both])
        lines.append(f"| {op} | {causal} | {mode} | " + " | ".join(cells)
                     + f" | {exponent} | {cross} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# loop: experiments/bench_train_loop.py.
# ---------------------------------------------------------------------------------------------
def train_loop_module():
  """`experiments/bench_train_loop.py` as a module."""
  if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
  return importlib.import_module("bench_train_loop")


def run_loop(config_names, rounds: int) -> str:
  """A table of `bench_train_loop.measure(config, rounds)` per config."""
  module = train_loop_module()
  results = [(name, module.measure(name, rounds)) for name in config_names]
  keys = list(dict.fromkeys(k for _, result in results for k in result))
  lines = ["| config | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, result in results:
    cells = [result.get(k, "-") for k in keys]
    lines.append(f"| {name} | " + " | ".join(
        f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def _names(allowed):
  def parse(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(allowed)}")
    return names
  return parse


CASES = ("plain", "causal", "gqa", "mask", "segments", "window")


def main(argv=None) -> str:
  """Runs the sections; writes and returns the path of cpu_paths.md."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", type=_names(SECTIONS), default=SECTIONS)
  parser.add_argument("--out", default=RESULTS, help="directory for the table and the plot")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--lengths", type=_ints, default=_ints("256,512,1024,2048,4096"))
  parser.add_argument("--cases", type=_names(CASES), default=CASES)
  parser.add_argument("--window", type=int, default=128, help="left window of the window case")
  parser.add_argument("--linear_lengths", type=_ints, default=_ints("512,1024,2048,4096,8192"))
  parser.add_argument("--linear_ops", type=_names(LINEAR_OPS), default=LINEAR_OPS)
  parser.add_argument("--max_temp_mib", type=float, default=6144,
                      help="linear section: skip programs needing more temporary memory")
  parser.add_argument("--loop_configs", type=lambda s: tuple(s.split(",")),
                      default=("vit_digits",))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rounds, args.lengths, args.window, args.linear_lengths = 1, (48,), 8, (32, 64)

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "cpu_paths.md")
  parts = ["# CPU attention paths against jax.nn", _header(),
           f"Command: `python experiments/bench_cpu.py {' '.join(argv or sys.argv[1:])}`; "
           f"{args.rounds} alternating rounds per row from 2048 tokens up, more below "
           "(`rounds_at`: 8x at 256), medians."]

  def write():
    with open(path, "w") as f:
      f.write("\n\n".join(parts) + "\n")

  if "ops" in args.sections:
    rows = run_ops(args.lengths, args.cases, args.rounds, args.window)
    parts += ["## Softmax attention: big_attn (XLA) and a naive einsum vs jax.nn (XLA)",
              f"float32, batch 1, {HEADS} heads (GQA: 2 kv heads), head dim {HEAD_DIM}; ratios "
              "> 1 mean slower / more memory than jax.nn; temp = compiled "
              "`memory_analysis().temp_size_in_bytes`; mask: random, 90% True; segments: 4 "
              f"equal; window: causal, {args.window} keys to the left.", ops_table(rows)]
    write()
  if "linear" in args.sections:
    rows, skipped = run_linear(args.linear_lengths, args.linear_ops, args.rounds,
                               args.max_temp_mib)
    parts += ["## Linear ops vs softmax: time against length",
              f"float32, batch 1, {HEADS} heads, head dim {HEAD_DIM}, each op's default "
              f"hyper-parameters (latte: {NUM_LATENTS} latents); cells: ms (ratio to softmax, "
              "our XLA path); exponent p of t ∝ L^p fitted over the lengths. Wall-clock:",
              linear_table(rows), "CPU time of the process (all threads):",
              linear_table(rows, "cpu_ms")]
    if skipped:
      parts.append("Skipped (over --max_temp_mib): " + "; ".join(skipped) + ".")
    png = plots.plot_curves(
        [dict(r, op=f"{r['op']}{' causal' if r['causal'] else ''}") for r in rows
         if r["mode"] == "fwd+bwd"],
        x="length", y="ms", by="op", logx=True, logy=True, path=path[:-3] + ".png",
        title="forward+backward time vs length (CPU, float32)")
    parts.append(f"Plot: `{os.path.basename(png)}` (forward+backward).")
    write()
  if "loop" in args.sections:
    parts += ["## Training loop: main vs a hand-written loop",
              run_loop(args.loop_configs, args.rounds)]
    write()
  write()
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
