"""Overhead of the training loop: `big_attn.main` against a hand-written jit loop.

  python experiments/bench_train_loop.py                       # vit_digits and lm_bytes, 3 rounds
  python experiments/bench_train_loop.py --configs=vit_digits --rounds=5 --steps=100

Both run the same model, optimizer and update step (`step.make_train_step`, jitted with the same
shardings and donation). The hand-written loop feeds one batch already on the devices and only
dispatches steps; `big_attn.main` runs everything a training run does (grain pipeline,
`shard_batch` and its prefetch, metrics every `--warmup` steps, the console), without
evaluators and with one checkpoint at the end, which falls outside the timed steps. Steady
state: `--warmup` steps, then `--steps` timed steps (main's time comes from the
`train/elapsed_time` of its own `metrics.jsonl` at those two steps). Rounds alternate main and
hand-written so that the load of a shared machine falls on both; the table reports medians: the
wall time ratio main / hand-written (target <= 1.05), the CPU time ratio (all threads: the
input pipeline's work shows here even where spare cores hide it from the wall time), and the
backend compile time of the train step (XLA's, from `jax.monitoring`).

`measure(config_name, rounds)` returns the numbers as a dict (`experiments/bench_cpu.py` calls it).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from big_attn import data, models  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn import main as main_lib  # noqa: E402
from big_attn.parallel import mesh as mesh_lib  # noqa: E402
from big_attn.train import metrics as metrics_lib  # noqa: E402
from big_attn.train import optim  # noqa: E402
from big_attn.train import step as step_lib  # noqa: E402

# runlocal: a few files to pack; 64-byte rows keep a step of the tiny LM under a second on CPU.
CONFIG_ARGS = {"vit_digits": None, "lm_bytes": "runlocal,seq_len=64"}
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def get_config(config_name: str, warmup: int, steps: int) -> Any:
  """`configs/<config_name>.py` for `warmup + steps` steps, logging every `warmup` steps, no
  evaluators, one checkpoint at the end."""
  if steps % warmup:
    raise ValueError(f"--steps ({steps}) must be a multiple of --warmup ({warmup})")
  path = os.path.join(ROOT, "configs", f"{config_name}.py")
  spec = importlib.util.spec_from_file_location(config_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(CONFIG_ARGS.get(config_name))
  config.total_steps = warmup + steps
  config.log_every = warmup
  config.ckpt_every = 10**9
  config.evals = {}
  return config


class _CompileTimes:
  """Backend compile seconds by function name, while in the `with` block."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def _listen(self, event, duration, fun_name="?", **kwargs):
    del kwargs
    if event == _COMPILE_EVENT:
      self.seconds[fun_name] = self.seconds.get(fun_name, 0.0) + duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def run_main(config: Any, warmup: int, steps: int) -> tuple[float, float, float]:
  """Wall and CPU seconds (all threads of the process) of the `steps` steps after `warmup` in
  `big_attn.main`, and its train step's compile seconds."""
  cpu = {}
  measure_progress = metrics_lib.Progress.measure

  def measure_cpu_too(progress, step):
    cpu[step] = time.process_time()
    return measure_progress(progress, step)

  metrics_lib.Progress.measure = measure_cpu_too
  try:
    with tempfile.TemporaryDirectory() as workdir, _CompileTimes() as compiles:
      main_lib.train_and_evaluate(config, workdir)
      elapsed = {r["step"]: r["train/elapsed_time"] for r in metrics_lib.read_records(workdir)}
  finally:
    metrics_lib.Progress.measure = measure_progress
  end = warmup + steps
  return (elapsed[end] - elapsed[warmup], cpu[end] - cpu[warmup],
          compiles.seconds.get("jit(update)", 0.0))


class HandLoop:
  """The update step of `config` jitted by hand on one batch already on the devices."""

  def __init__(self, config: Any):
    rules = mesh_lib.check_rules(config.sharding_rules)
    mesh = mesh_lib.make_mesh(config.mesh, allow_subset=config.mesh_subset)
    data_sharding = mesh_lib.data_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_size = config.input.batch_size
    input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
    info = data.dataset_info(input_config)
    module = models.get(config.model_name)
    task = getattr(module, "TASK", step_lib.CLASSIFICATION)
    input_shape, input_dtype = task.example_input(info)
    model = module.Model(**main_lib.model_kwargs(config, info, module.Model, mesh))
    schedule = optim.make_schedule(config.lr, config.schedule, config.total_steps)
    tx = optim.make_optimizer(config.optax_name, config.optax.to_dict(), schedule,
                              config.grad_clip_norm)
    boxed = step_lib.abstract_state(model, tx, input_shape, input_dtype)
    shardings = step_lib.state_shardings(boxed, mesh, rules)
    keys = task.batch_spec(info, batch_size)
    batch = next(iter(data.get_dataset(input_config, split="train", batch_size=batch_size,
                                       seed=config.seed, train=True)))
    self.batch = mesh_lib.shard_batch({k: batch[k] for k in keys}, data_sharding, batch_size)
    self.rng = jax.device_put(jax.random.key(config.seed), replicated)
    self.init = jax.jit(step_lib.make_init_fn(model, tx, input_shape, input_dtype),
                        out_shardings=shardings)
    self.step = jax.jit(
        step_lib.make_train_step(model, tx, schedule, grad_accum_steps=config.grad_accum_steps,
                                 micro_sharding=data_sharding, loss_fn=task.loss),
        in_shardings=(shardings, data_sharding, replicated),
        out_shardings=(shardings, replicated), donate_argnums=(0,))
    with _CompileTimes() as compiles:
      self.step.lower(self.init(self.rng), self.batch, self.rng).compile()
    self.compile_seconds = sum(compiles.seconds.values())

  def run(self, warmup: int, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of `steps` steps after `warmup` steps from a fresh state."""
    state = self.init(self.rng)
    for _ in range(warmup):
      state, metrics = self.step(state, self.batch, self.rng)
    jax.block_until_ready((state, metrics))
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state, metrics = self.step(state, self.batch, self.rng)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(config_name: str, rounds: int = 3, *, warmup: int = 10, steps: int = 50
            ) -> dict[str, Any]:
  """Alternating rounds of `big_attn.main` and the hand-written loop on `config_name`.

  Returns steady-state steps/s of both (medians over rounds), the medians of the per-round
  ratios main / hand-written of wall time (`ratio`) and of CPU time (`cpu_ratio`: the work,
  input pipeline threads included, which a shared machine's load disturbs less), the train
  step's backend compile seconds in main (median) and in the hand-written loop, and the
  per-round seconds.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  config = get_config(config_name, warmup, steps)
  hand = HandLoop(config)
  main_s, main_cpu, hand_s, hand_cpu, main_compile = [], [], [], [], []
  for _ in range(rounds):
    seconds, cpu, compile_s = run_main(config, warmup, steps)
    main_s.append(seconds)
    main_cpu.append(cpu)
    main_compile.append(compile_s)
    seconds, cpu = hand.run(warmup, steps)
    hand_s.append(seconds)
    hand_cpu.append(cpu)
  return {
      "config": config_name, "rounds": rounds, "steps": steps, "warmup": warmup,
      "main_steps_per_s": statistics.median(steps / s for s in main_s),
      "hand_steps_per_s": statistics.median(steps / s for s in hand_s),
      "ratio": statistics.median(m / h for m, h in zip(main_s, hand_s)),
      "cpu_ratio": statistics.median(m / h for m, h in zip(main_cpu, hand_cpu)),
      "main_compile_s": statistics.median(main_compile),
      "hand_compile_s": hand.compile_seconds,
      "main_seconds": main_s, "hand_seconds": hand_s,
      "main_cpu_seconds": main_cpu, "hand_cpu_seconds": hand_cpu,
  }


def table(results: list[dict[str, Any]]) -> str:
  """The markdown table of `measure` results."""
  rows = ["| config | main steps/s | hand-written steps/s | wall time main / hand (each round) "
          "| CPU time main / hand | compile s (main / hand) |",
          "|---|---|---|---|---|---|"]
  for r in results:
    each = ", ".join(f"{m / h:.3f}" for m, h in zip(r["main_seconds"], r["hand_seconds"]))
    rows.append(f"| {r['config']} | {r['main_steps_per_s']:.2f} | {r['hand_steps_per_s']:.2f} "
                f"| **{r['ratio']:.3f}** ({each}) | {r['cpu_ratio']:.3f} | "
                f"{r['main_compile_s']:.2f} / {r['hand_compile_s']:.2f} |")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="vit_digits,lm_bytes")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args(argv)
  metrics_lib.configure_console("warning")
  results = [measure(name, args.rounds, warmup=args.warmup, steps=args.steps)
             for name in args.configs.split(",")]
  dev = jax.devices()[0]
  print(f"Device: {dev.platform} / {dev.device_kind} (x{jax.device_count()}, {os.cpu_count()} "
        f"host cores); jax {jax.__version__}, numpy {np.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{args.warmup} warm-up + {args.steps} timed steps per round.\n")
  print(table(results))


if __name__ == "__main__":
  main()
