"""Metric writers: `metrics.jsonl`, TensorBoard events and a console progress line with ETA.

Only the first process writes; every process may call the writer.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging

from big_attn.train import tensorboard


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


class Progress:
  """Throughput and ETA between log points, and the console progress line."""

  def __init__(self, first_step: int, total_steps: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = first_step
    self._last_time = time.perf_counter()
    self._start_step, self._start_time = first_step, self._last_time

  def measure(self, step: int) -> dict[str, float]:
    """`train/step_time` and `train/examples_per_sec` since the previous call."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = now - self._last_time
    self._last_step, self._last_time = step, now
    return {"train/step_time": dt / steps, "train/examples_per_sec": self.batch_size * steps / dt}

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    """One console line: step, percentage, bar, key metrics, and the ETA."""
    done = step / max(self.total_steps, 1)
    elapsed = time.perf_counter() - self._start_time
    rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    eta_text = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                     if k in ("train/loss", "train/lr", "train/examples_per_sec",
                              "eval/accuracy"))
    logging.info("[%s] step %d/%d (%3.0f%%) %s | ETA %s", bar, step, self.total_steps,
                 100 * done, shown, eta_text)
