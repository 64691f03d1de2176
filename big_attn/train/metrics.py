"""Metric writers (`metrics.jsonl`, TensorBoard events), throughput and MFU, and the console:
the progress line with its ETA, the run's summary, and which libraries' log lines show.

Only the first process writes; every process may call the writer.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging as py_logging
import math
import os
import time
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp

from big_attn.train import tensorboard

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python loggers of the libraries under the run; those logging through absl (orbax, grain)
# are told apart by the file that logs (`_ConsoleFilter`).
_LIBRARY_LOGGERS = ("jax", "jaxlib", "orbax", "grain", "etils", "flax")
LOG_LEVELS = ("debug", "info", "warning", "error")


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
  """Raises `FloatingPointError` naming the metric (losses first) that is NaN or infinite."""
  for name in sorted(metrics, key=lambda k: "loss" not in k):
    value = metrics[name]
    if not math.isfinite(value):
      raise FloatingPointError(
          f"{name} is {value} at step {step}: training diverged, stopping. Lower config.lr, "
          "set config.grad_clip_norm, or check the input data.")


def _drop_lines_after(path: str, step: int) -> None:
  """Rewrites `path` (JSON lines with a `step`) without the lines of steps after `step`."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) == len(lines):
    return
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(f"{path}.tmp", path)


class MetricWriter:
  """Collects the metrics of a step and writes them as one line of `workdir/metrics.jsonl`.

  `write(step, metrics)` may be called several times for a step (train, then eval metrics);
  `flush()` (or the first write of a later step) emits the step's JSON object and TensorBoard
  scalars.

  A run resumed at `resume_step` reads as one run: the lines of later steps (written after that
  checkpoint, before the run stopped) are dropped from `metrics.jsonl` (rewritten atomically),
  and TensorBoard gets a `SessionLog.START` at `resume_step + 1`, which makes it discard the
  earlier events of the steps that follow.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._step = None
    self._pending: dict[str, Any] = {}
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_lines_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
      if resume_step:
        self._tb.session_start(resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._step is not None and step != self._step:
      self.flush()
    self._step = step
    self._pending.update({k: float(v) for k, v in metrics.items()})

  def flush(self) -> None:
    if self._step is None:
      return
    if self.enabled and self._pending:
      self._jsonl.write(json.dumps({"step": self._step, **self._pending}) + "\n")
      self._jsonl.flush()
      self._tb.scalars(self._step, self._pending)
    self._step, self._pending = None, {}

  def close(self) -> None:
    self.flush()
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The JSON objects of `workdir/metrics.jsonl` (none when it does not exist)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- throughput and MFU
# Dense bf16 peak FLOP/s of one chip from the vendors' datasheets, matched in this order against
# `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("B200", 2250e12), ("A100", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))


@functools.cache
def cpu_matmul_flops() -> float:
  """Float32 FLOP/s of this process's CPU cores: the best of five 1024x1024 matmuls (measured
  once per process, about 0.2 s)."""
  n = 1024
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices(backend="cpu")[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(5):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops_per_device(devices: Sequence[Any]) -> float | None:
  """Peak FLOP/s of one device of `devices` (a mesh's): the `PEAK_FLOPS` entry of its
  `device_kind` on GPU and TPU (None when unknown); on CPU, where a process's devices share its
  cores, `cpu_matmul_flops()` divided by this process's devices in `devices`."""
  device = devices[0]
  if device.platform == "cpu":
    local = sum(d.process_index == jax.process_index() for d in devices)
    return cpu_matmul_flops() / max(local, 1)
  kind = device.device_kind.lower()
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind:
      return peak
  return None


class Progress:
  """Step time, throughput and MFU between log points, the ETA, and the console progress line.

  Time inside `paused()` (evaluations, checkpoint saves) counts for the wall time and the ETA,
  not for the step time and throughput. The ETA runs on the steady-state pace: the wall time per
  step since the first measured step (the first interval holds the first steps' warm-up).
  `elapsed` is the training time of earlier runs of a resumed run, so that
  `train/elapsed_time` counts the whole run.
  """

  def __init__(self, first_step: int, total_steps: int, batch_size: int, *,
               tokens_per_example: int | None = None, flops_per_step: float | None = None,
               num_devices: int = 1, peak_flops_per_device: float | None = None,
               elapsed: float = 0.0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.tokens_per_example = tokens_per_example
    self.flops_per_step = flops_per_step or None
    self.num_devices = num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self._last_step, self._last_time = first_step, time.perf_counter()
    self._start_time, self._elapsed_before = self._last_time, elapsed
    self._paused = 0.0
    self._steady: tuple[int, float] | None = None
    self._interval_pace = math.nan

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent in the block is not step time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def measure(self, step: int) -> dict[str, float]:
    """`train/` step time, examples/s, tokens/s (sequence models), TFLOP/s per device and MFU
    (with `flops_per_step`, and a known peak) since the previous call, and the elapsed time."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    busy = max(now - self._last_time - self._paused, 1e-9)
    self._interval_pace = (now - self._last_time) / steps
    if self._steady is None:
      self._steady = (step, now)
    self._last_step, self._last_time, self._paused = step, now, 0.0
    out = {"train/step_time": busy / steps,
           "train/examples_per_sec": self.batch_size * steps / busy}
    if self.tokens_per_example:
      out["train/tokens_per_sec"] = out["train/examples_per_sec"] * self.tokens_per_example
    if self.flops_per_step:
      per_device = self.flops_per_step * steps / busy / self.num_devices
      out["train/tflops_per_device"] = per_device / 1e12
      if self.peak_flops_per_device:
        out["train/mfu"] = per_device / self.peak_flops_per_device
    out["train/elapsed_time"] = self.elapsed()
    return out

  def elapsed(self) -> float:
    """Seconds of training, earlier runs of a resumed run included."""
    return self._elapsed_before + time.perf_counter() - self._start_time

  def eta(self, step: int) -> float:
    """Seconds to `total_steps` at the steady-state pace (NaN before the first `measure`)."""
    pace = self._interval_pace
    if self._steady is not None and step > self._steady[0]:
      pace = (time.perf_counter() - self._steady[1]) / (step - self._steady[0])
    return (self.total_steps - step) * pace

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    """One console line: step, percentage, bar, key metrics (4 significant digits), ETA."""
    done = step / max(self.total_steps, 1)
    eta = self.eta(step)
    eta_text = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    shown = [f"{_short(k)}={metrics[k]:.4g}" for k in _CONSOLE_KEYS if k in metrics]
    speed = [f"{metrics[k]:.4g} {unit}" for k, unit in _CONSOLE_SPEED if k in metrics]
    if "train/mfu" in metrics:
      speed.append(f"MFU {100 * metrics['train/mfu']:.3g}%")
    logging.info("[%s] step %d/%d (%3.0f%%) %s | %s | ETA %s", bar, step, self.total_steps,
                 100 * done, " ".join(shown), ", ".join(speed), eta_text)


_CONSOLE_KEYS = ("train/loss", "train/lr", "train/grad_norm")
_CONSOLE_SPEED = (("train/examples_per_sec", "ex/s"), ("train/tokens_per_sec", "tok/s"),
                  ("train/tflops_per_device", "TFLOP/s/device"))


def _short(name: str) -> str:
  return name.removeprefix("train/")


def format_metrics(metrics: Mapping[str, float]) -> str:
  """`name=value` pairs with 4 significant digits, for the console."""
  return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------- summary
def _higher_is_better(name: str) -> bool:
  return "accuracy" in name


def summary(workdir: str) -> str:
  """What a finished (or stopped) run in `workdir` did, from its `metrics.jsonl`: steps, wall
  time, the last and best evaluation metrics, and where checkpoints, metrics and plots are."""
  records = read_records(workdir)
  lines = []
  train = [r for r in records if "train/loss" in r]
  if train:
    last = train[-1]
    elapsed = max((r["train/elapsed_time"] for r in records if "train/elapsed_time" in r),
                  default=None)
    wall = (f" in {datetime.timedelta(seconds=round(elapsed))} (training loop)"
            if elapsed is not None else "")
    lines.append(f"trained {last['step']} steps{wall}; train/loss={last['train/loss']:.4g} at "
                 f"step {last['step']}")
  evals = [r for r in records if any(not k.startswith("train/") and k != "step" for k in r)]
  if evals:
    last = {k: v for k, v in evals[-1].items() if not k.startswith("train/") and k != "step"}
    lines.append(f"last eval (step {evals[-1]['step']}): {format_metrics(last)}")
    best = []
    for name in last:
      pick = max if _higher_is_better(name) else min
      record = pick((r for r in evals if name in r), key=lambda r, n=name: r[n])
      best.append(f"{name}={record[name]:.4g} (step {record['step']})")
    lines.append("best eval: " + " ".join(best))
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(
      checkpoints) else []
  lines.append(f"checkpoints: {checkpoints} (steps {', '.join(map(str, steps)) or 'none'})")
  lines.append(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
  lines.append(f"plots: tensorboard --logdir={os.path.join(workdir, 'tensorboard')}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- console
class _ConsoleFilter(py_logging.Filter):
  """Passes big_attn's own records and other records from `level` up."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= self.level or record.pathname.startswith(_PACKAGE_DIR)


def configure_console(level: str | None = "warning") -> None:
  """Shows big_attn's own log lines from INFO up and other libraries' (orbax, grain, absl, jax)
  from `level` up ("info" or "debug" show everything; None undoes the setting)."""
  if level is not None and level not in LOG_LEVELS:
    raise ValueError(f"--log_level must be one of {LOG_LEVELS}, got {level!r}")
  absl_logger = py_logging.getLogger("absl")  # orbax and grain log through absl
  for old in [f for f in absl_logger.filters if isinstance(f, _ConsoleFilter)]:
    absl_logger.removeFilter(old)
  number = py_logging.NOTSET if level is None else py_logging.getLevelName(level.upper())
  if level is not None:
    absl_logger.addFilter(_ConsoleFilter(number))
  for name in _LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(number)
