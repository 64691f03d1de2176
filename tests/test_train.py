"""End-to-end training: loss falls, exact resume, SIGTERM, corrupted checkpoints, sharded runs
matching a single device, NaN stop, dry run of the 2B config, and config errors.

All runs use a tiny ViT on 8x8 digits (4 tokens) on 8 simulated CPU devices.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import signal
import struct
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from big_attn import checkpoint_io as ckpt_lib
from big_attn import data
from big_attn import layers
from big_attn import main as main_lib
from big_attn import models
from big_attn.parallel import mesh as mesh_lib
from big_attn.train import config_lib
from big_attn.train import metrics as metrics_lib
from big_attn.train import optim
from big_attn.train import prefetch as prefetch_lib
from big_attn.train import step as step_lib
from big_attn.train import tensorboard

pytestmark = pytest.mark.xdist_group("train")  # one worker builds `reference_run` once
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 12


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/vit_digits.py shrunk to a ViT of 4 tokens, width 16, on one device."""
  config = _config_module("vit_digits").get_config("runlocal")
  config.input.image_size = 8
  config.input.batch_size = 16
  config.input.augment = dict(crop_padding=1, flip=False)
  config.model = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4),
                      pool_type="gap", head_zeroinit=False, dtype="float32")
  config.mesh = [("data", 1)]
  config.mesh_subset = True
  config.lr = 3e-3
  config.schedule = dict(warmup_steps=2, decay_type="cosine")
  config.total_steps = TOTAL_STEPS
  config.log_every = 1
  config.ckpt_every = 4
  config.max_to_keep = 2
  config.evals = {}
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for part in path:
      target = target[part]
    target[leaf] = value
  return ml_collections.ConfigDict(config.to_dict())


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def losses(workdir):
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted single-device run with an evaluator; its console lines (as `big_attn.main`
  sets them up) and the XLA compilations of its loop after step 1 (`jax.monitoring`)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config()
  config.evals = ml_collections.ConfigDict(dict(
      eval=dict(type="classification", every=5, split="test", batch_size=64)))
  step, late_compiles = [0], []

  def count(event, duration, fun_name="?", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration" and step[0] >= 1:
      late_compiles.append(fun_name)

  agreed = main_lib.StopRequest.agreed

  def note_step(self, current, every):
    step[0] = current
    return agreed(self, current, every)

  console = _Records()
  root = logging.getLogger()
  root_level = root.level
  root.addHandler(console)
  root.setLevel(logging.INFO)
  metrics_lib.configure_console("warning")
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(main_lib.StopRequest, "agreed", note_step)
      result = main_lib.train_and_evaluate(config, workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
    metrics_lib.configure_console(None)
    root.removeHandler(console)
    root.setLevel(root_level)
  assert result == {"step": TOTAL_STEPS, "preempted": False}
  return types.SimpleNamespace(workdir=workdir, late_compiles=late_compiles,
                               console=console.records)


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run.workdir


def test_loss_falls_and_metrics_are_logged(reference):
  records = read_metrics(reference)
  assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
  for r in records:
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/examples_per_sec",
                "train/step_time"):
      assert np.isfinite(r[key]) and (key == "train/loss" or r[key] >= 0), (key, r)
  evals = {r["step"]: r for r in records if "eval/accuracy" in r}
  assert sorted(evals) == [5, 12]  # not at 10 as well, two steps before the end
  assert 0.0 <= evals[12]["eval/accuracy"] <= 1.0 and evals[12]["eval/loss"] > 0
  loss = [r["train/loss"] for r in records]
  assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.1, loss
  # Warmup then cosine: lr rises for two steps, then decays.
  lr = [r["train/lr"] for r in records]
  assert lr[0] < lr[1] <= lr[2] and lr[-1] < lr[3]


def _read_events(path):
  """Scalars of a TensorBoard event file, parsed independently of the writer; a `SessionLog`
  shows as `(step, "session_log", status)`."""

  def varint(buf, i):
    shift = value = 0
    while True:
      byte = buf[i]
      i += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if byte < 0x80:
        return value, i

  def fields(buf):
    i = 0
    while i < len(buf):
      key, i = varint(buf, i)
      number, wire = key >> 3, key & 7
      if wire == 0:
        value, i = varint(buf, i)
      elif wire == 1:
        value, i = buf[i:i + 8], i + 8
      elif wire == 5:
        value, i = buf[i:i + 4], i + 4
      else:
        size, i = varint(buf, i)
        value, i = buf[i:i + size], i + size
      yield number, value

  data = open(path, "rb").read()
  out, i = [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    header_crc, payload = data[i + 8:i + 12], data[i + 12:i + 12 + length]
    assert struct.unpack("<I", header_crc)[0] == tensorboard.masked_crc32c(data[i:i + 8])
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == (
        tensorboard.masked_crc32c(payload))
    i += 16 + length
    event = dict(fields(payload))
    if 7 in event:
      out.append((event[2], "session_log", dict(fields(event[7]))[1]))
    if 5 in event:
      for _, value in fields(event[5]):
        v = dict(fields(value))
        out.append((event[2], v[1].decode(), struct.unpack("<f", v[2])[0]))
  return out


def test_tensorboard_events_hold_the_logged_scalars(reference):
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  logdir = os.path.join(reference, "tensorboard")
  (name,) = os.listdir(logdir)
  assert name.startswith("events.out.tfevents.")
  scalars = _read_events(os.path.join(logdir, name))
  logged = losses(reference)
  tb_loss = {step: value for step, tag, value in scalars if tag == "train/loss"}
  assert sorted(tb_loss) == sorted(logged)
  np.testing.assert_allclose([tb_loss[s] for s in sorted(tb_loss)],
                             [logged[s] for s in sorted(logged)], rtol=1e-6)
  assert any(tag == "eval/accuracy" for _, tag, _ in scalars)


def test_sigterm_then_resume_continues_the_loss_curve_exactly(reference, tmp_path):
  workdir = str(tmp_path)
  result = _run_steps(tiny_config(), workdir, 5)
  assert result == {"step": 5, "preempted": True}
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit()) == [4, 5]
  assert sorted(losses(workdir)) == [1, 2, 3, 4, 5]

  result = main_lib.train_and_evaluate(tiny_config(), workdir)
  assert result == {"step": TOTAL_STEPS, "preempted": False}
  resumed, expected = losses(workdir), losses(reference)
  assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
  # Same program, same inputs, restored state and data position: bit for bit.
  np.testing.assert_array_equal([resumed[s] for s in range(1, TOTAL_STEPS + 1)],
                                [expected[s] for s in range(1, TOTAL_STEPS + 1)])

  # Corrupt the newest checkpoint (12): it is set aside, the run falls back to 8 and redoes
  # steps 9..12.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [8, 12]
  corrupted = 0
  for root, _, files in os.walk(os.path.join(ckpt_dir, "12", "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\0garbage")
      corrupted += 1
  assert corrupted
  # A save of step 16 that never finished (orbax's temporary directory) is ignored and removed.
  unfinished = os.path.join(ckpt_dir, "16.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(os.path.join(ckpt_dir, "8"), unfinished)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  result = main_lib.train_and_evaluate(tiny_config(), workdir)
  assert result == {"step": TOTAL_STEPS, "preempted": False}
  assert not os.path.exists(unfinished)
  assert [d for d in os.listdir(ckpt_dir) if d.startswith("12.corrupt-")]
  redone = losses(workdir)
  assert sorted(redone) == [9, 10, 11, 12]
  np.testing.assert_array_equal([redone[s] for s in redone], [expected[s] for s in redone])


def _run_steps(config, workdir, steps):
  """Runs `config` and sends SIGTERM to this process once step `steps` is done."""
  agreed = main_lib.StopRequest.agreed

  def preempt_then_agree(self, step, every):
    if step == steps:
      # main's handler, not the default one that would end the test process.
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
      os.kill(os.getpid(), signal.SIGTERM)
    return agreed(self, step, every)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(main_lib.StopRequest, "agreed", preempt_then_agree)
    return main_lib.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("mesh, accum", [([("fsdp", 8)], 1), ([("data", 2), ("tensor", 4)], 2)])
def test_sharded_run_matches_single_device(reference, tmp_path, mesh, accum):
  # total_steps stays that of the reference (it shapes the cosine); the run is stopped at 6.
  config = tiny_config(mesh=mesh, grad_accum_steps=accum, ckpt_every=100)
  assert _run_steps(config, str(tmp_path), 6) == {"step": 6, "preempted": True}
  sharded, expected = losses(str(tmp_path)), losses(reference)
  assert sorted(sharded) == list(range(1, 7))
  np.testing.assert_allclose([sharded[s] for s in range(1, 7)],
                             [expected[s] for s in range(1, 7)], rtol=2e-4, atol=2e-5)


def test_gradient_accumulation_equals_whole_batch():
  vit = models.get("vit").Model(num_classes=10, width=16, depth=1, mlp_dim=32, num_heads=2,
                                patch_size=(4, 4), head_zeroinit=False)
  schedule = optim.make_schedule(1e-2, dict(decay_type="constant"), 10)
  tx = optim.make_optimizer("sgd", dict(momentum=0.9, weight_decay=1e-3), schedule, 1.0)
  state = jax.jit(step_lib.make_init_fn(vit, tx, (8, 8, 1)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(12, 8, 8, 1)), jnp.float32),
           "labels": jax.nn.one_hot(rng.integers(0, 10, 12), 10)}
  outs = [jax.jit(step_lib.make_train_step(vit, tx, schedule, grad_accum_steps=k))(
      state, batch, jax.random.key(1)) for k in (1, 3)]
  (s1, m1), (s3, m3) = outs
  np.testing.assert_allclose(m1["train/loss"], m3["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["train/grad_norm"], m3["train/grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s3["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps 5"):
    jax.jit(step_lib.make_train_step(vit, tx, schedule, grad_accum_steps=5))(
        state, batch, jax.random.key(1))


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
  get_dataset = data.get_dataset

  def poisoned(*args, **kwargs):
    """Train batches from the second on hold a NaN pixel."""
    count = iter(range(1 << 30))

    def poison(batch):
      if next(count) >= 1:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 0, 0, 0] = np.nan
      return batch

    ds = get_dataset(*args, **kwargs)
    return ds.map(poison) if kwargs["train"] else ds

  monkeypatch.setattr(data, "get_dataset", poisoned)
  config = tiny_config(total_steps=4, ckpt_every=100)
  with pytest.raises(FloatingPointError, match="train/loss is nan at step 2"):
    main_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "2"))


def test_vit_2b_dry_run_reports_parameters_memory_and_flops(capsys):
  config = _config_module("vit_2b").get_config("batch=8")
  config.dry_run = True
  report = main_lib.train_and_evaluate(config, None)
  printed = capsys.readouterr().out
  assert f"parameters: {report['parameters']}" in printed
  assert 1.7e9 <= report["parameters"] <= 2.1e9
  assert "memory per device" in printed and "flops per step" in printed
  # Forward + backward is about 6 FLOPs per parameter per token (256 patches x 8 images),
  # plus the rematerialised forward and attention: all 48 layers counted, not one scan body.
  dense = 6 * report["parameters"] * 256 * 8
  assert 0.9 * dense < report["flops"] < 2 * dense, report["flops"] / dense
  # FSDP over 8 devices: each device holds about an eighth of the f32 params and of the
  # memory-saving Adafactor's state (a bfloat16 first moment, a factored second one).
  assert report["memory"]["argument"] < (4 + 2.1) * report["parameters"] / 8 * 1.3


def test_warmup_longer_than_the_run_shrinks_to_a_tenth():
  # vit_digits' 100 warmup steps in a 50-step run: warm up over 5 steps, then the cosine.
  fn = optim.make_schedule(1.0, dict(warmup_steps=100, decay_type="cosine"), 50)
  np.testing.assert_allclose([float(fn(s)) for s in (0, 1, 5, 50)],
                             [0.0, 0.2, 1.0, 0.0], atol=1e-6)
  # steps=1: no warmup, the one update (optimizer count 0) takes the full rate.
  assert float(optim.make_schedule(1.0, dict(warmup_steps=100), 1)(0)) == 1.0
  with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
    optim.make_schedule(1.0, dict(warmup_steps=-1), 50)


def test_optimizers_and_weight_decay_mask():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "scale": jnp.ones((3,))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False}
  grads = jax.tree.map(jnp.zeros_like, params)
  schedule = optim.make_schedule(0.1, dict(decay_type="constant"), 10)
  for name in optim.OPTIMIZERS:
    tx = optim.make_optimizer(name, dict(weight_decay=0.5), schedule)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Zero gradients: only weight decay moves the kernel; biases and scales stay put.
    assert float(jnp.abs(updates["kernel"]).max()) > 0, name
    assert float(jnp.abs(updates["bias"]).max()) == 0, name
    assert float(jnp.abs(updates["scale"]).max()) == 0, name
  rsqrt = optim.make_schedule(1.0, dict(warmup_steps=4, decay_type="rsqrt"), 100)
  np.testing.assert_allclose([float(rsqrt(s)) for s in (2, 4, 12)],
                             [0.5, 1.0, (4 / 12) ** 0.5], rtol=1e-6)
  cosine = optim.make_schedule(1.0, dict(decay_type="cosine"), 10)
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10)], [1.0, 0.5, 0.0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="optax_name must be one of"):
    optim.make_optimizer("adam_typo", {}, schedule)
  with pytest.raises(ValueError, match="does not take"):
    optim.make_optimizer("sgd", dict(b2=0.9), schedule)
  with pytest.raises(ValueError, match="decay_type must be one of"):
    optim.make_schedule(1.0, dict(decay_type="linear_typo"), 10)


def test_config_typos_and_impossible_meshes_raise(tmp_path):
  path = os.path.join(ROOT, "configs", "vit_digits.py")

  def parse(*argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config

  config = parse(f"--config={path}:steps=7", "--config.lr=0.5")
  assert config.lr == 0.5 and config.total_steps == 7
  with pytest.raises(AttributeError, match='Did you mean "lr" instead of "lrr"'):
    parse(f"--config={path}", "--config.lrr=0.5")
  with pytest.raises(ValueError, match="unknown config arg 'variantt'"):
    _config_module("vit_i1k").get_config("variantt=B/16")
  with pytest.raises(ValueError, match="cannot read 'many' as int"):
    _config_module("vit_digits").get_config("steps=many")
  with pytest.raises(ValueError, match=r"unknown keys \['lrr'\]"):
    config = tiny_config()
    config.lrr = 0.1
    main_lib.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match="needs 16 devices but 8"):
    main_lib.train_and_evaluate(tiny_config(mesh=[("data", 16)]), str(tmp_path))
  with pytest.raises(ValueError, match="batch_size 16 must be a multiple of 32"):
    main_lib.train_and_evaluate(tiny_config(mesh=[("data", -1)], grad_accum_steps=4),
                                str(tmp_path))
  with pytest.raises(ValueError, match="config.model does not fit"):
    main_lib.train_and_evaluate(tiny_config(**{"model.widht": 8}), str(tmp_path))


def test_every_config_builds():
  for name, arg in (("vit_digits", None), ("vit_cifar10", "runlocal"), ("vit_i1k", None),
                    ("vit_2b", None)):
    config = _config_module(name).get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in _config_module(name).__doc__


def test_no_compilation_after_the_first_step(reference_run):
  # Train step and evaluator are compiled before the loop; logging, evaluation at steps 5 and
  # 12 and checkpoint saves compile nothing.
  assert reference_run.late_compiles == []


def test_throughput_and_mfu_are_logged(reference):
  peak = metrics_lib.peak_flops_per_device(jax.devices()[:1])
  for r in read_metrics(reference):
    np.testing.assert_allclose(r["train/examples_per_sec"] * r["train/step_time"], 16)
    assert r["train/tflops_per_device"] > 0 and "train/tokens_per_sec" not in r
    np.testing.assert_allclose(r["train/mfu"], r["train/tflops_per_device"] * 1e12 / peak)
  steps = [r["train/elapsed_time"] for r in read_metrics(reference)]
  assert steps == sorted(steps) and steps[0] > 0
  # One step of the tiny ViT: about 6 FLOPs per parameter per token (16 images x 4 patches).
  vit = models.get("vit").Model(num_classes=10, **dict(tiny_config().model.to_dict(),
                                                         dtype=jnp.float32))
  params = step_lib.count_params(jax.eval_shape(
      lambda: step_lib.init_variables(vit, jax.random.key(0), (8, 8, 1))))
  r = read_metrics(reference)[-1]
  flops = r["train/tflops_per_device"] * 1e12 * r["train/step_time"]
  assert 4 * params * 64 < flops < 12 * params * 64, flops / (params * 64)
  scalars = _read_events(os.path.join(reference, "tensorboard",
                                      os.listdir(os.path.join(reference, "tensorboard"))[0]))
  assert {"train/mfu", "train/examples_per_sec"} <= {tag for _, tag, _ in scalars}


def test_peak_flops_per_device_from_device_kind():
  def device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform, process_index=0)

  assert metrics_lib.peak_flops_per_device([device("NVIDIA H100 80GB HBM3")]) == 989e12
  assert metrics_lib.peak_flops_per_device([device("NVIDIA H100 PCIe")]) == 756e12
  assert metrics_lib.peak_flops_per_device([device("NVIDIA A100-SXM4-40GB")]) == 312e12
  assert metrics_lib.peak_flops_per_device([device("TPU v5 lite", "tpu")]) == 197e12
  assert metrics_lib.peak_flops_per_device([device("TPU v5", "tpu")]) == 459e12
  assert metrics_lib.peak_flops_per_device([device("TPU v6 lite", "tpu")]) == 918e12
  assert metrics_lib.peak_flops_per_device([device("a new chip")]) is None
  # CPU: the cores are shared by the process's devices in the mesh.
  cpu = metrics_lib.peak_flops_per_device(jax.devices()[:1])
  np.testing.assert_allclose(metrics_lib.peak_flops_per_device(jax.devices()[:4]), cpu / 4)


def test_rerunning_a_finished_workdir_prints_its_summary(reference, caplog):
  before = read_metrics(reference)
  with caplog.at_level(logging.INFO):
    assert main_lib.train_and_evaluate(tiny_config(), reference) == {
        "step": TOTAL_STEPS, "preempted": False}
  assert read_metrics(reference) == before
  summary = metrics_lib.summary(reference)
  assert summary in caplog.text and "compiling" not in caplog.text
  evals = {r["step"]: r for r in before if "eval/accuracy" in r}
  best = max(evals.values(), key=lambda r: r["eval/accuracy"])
  assert f"last eval (step 12): eval/accuracy={evals[12]['eval/accuracy']:.4g}" in summary
  assert f"eval/accuracy={best['eval/accuracy']:.4g} (step {best['step']})" in summary
  assert f"trained {TOTAL_STEPS} steps in " in summary
  assert f"checkpoints: {os.path.join(reference, 'checkpoints')} (steps 8, 12)" in summary
  assert f"tensorboard --logdir={os.path.join(reference, 'tensorboard')}" in summary


def test_console_shows_progress_compile_time_evals_and_a_summary(reference_run):
  records = reference_run.console
  # No orbax, grain, absl or jax INFO lines: every line below WARNING comes from big_attn.
  package = os.path.join(ROOT, "big_attn")
  assert all(r.pathname.startswith(package) for r in records if r.levelno < logging.WARNING), {
      r.pathname for r in records if not r.pathname.startswith(package)}
  lines = [r.getMessage() for r in records]
  assert any(re.fullmatch(r"compiled the train step in \d+\.\d s", line) for line in lines)
  progress = [line for line in lines if "ETA" in line]
  assert [int(re.search(r"step (\d+)/12", line)[1]) for line in progress] == list(range(1, 13))
  assert all("ex/s" in line and "MFU" in line for line in progress)
  # Metrics on the console with 4 significant digits (metrics.jsonl keeps them all).
  last = read_metrics(reference_run.workdir)[-1]
  assert f"loss={last['train/loss']:.4g} " in progress[-1]
  assert [re.match(r"step (\d+): eval/accuracy=", line)[1] for line in lines
          if re.match(r"step \d+: eval/", line)] == ["5", "12"]
  assert f"eval/accuracy={last['eval/accuracy']:.4g} " in lines[-2]
  assert lines[-1].endswith(metrics_lib.summary(reference_run.workdir))
  with pytest.raises(ValueError, match="--log_level must be one of"):
    metrics_lib.configure_console("loud")


def test_prefetch_keeps_the_data_order():
  input_config = dict(name="digits", image_size=8, augment=dict(crop_padding=1, flip=False))
  mesh = mesh_lib.make_mesh([("data", 2), ("tensor", 4)])
  sharding = mesh_lib.data_sharding(mesh, mesh_lib.DEFAULT_RULES)

  def dataset(**kwargs):
    return data.get_dataset(input_config, split="train", batch_size=8, seed=3, train=True,
                            start_batch=5, **kwargs)

  expected = list(itertools.islice(iter(dataset()), 4))
  batches = prefetch_lib.Prefetch(
      dataset(), lambda b: mesh_lib.shard_batch({"image": b["image"]}, sharding, 8), count=4)
  got = list(batches)
  batches.close()
  assert len(got) == 4
  for batch, want in zip(got, expected):
    assert batch["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["image"]), want["image"])

  def failing():
    yield 1
    raise OSError("disk gone")

  batches = prefetch_lib.Prefetch(failing(), lambda x: x * 2)
  assert next(batches) == 2
  with pytest.raises(OSError, match="disk gone"):
    next(batches)
  batches.close()
  with pytest.raises(ValueError, match="depth must be a positive int"):
    prefetch_lib.Prefetch([], lambda x: x, depth=0)


def test_progress_eta_runs_on_the_steady_pace_and_step_time_leaves_out_pauses(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: clock[0])
  progress = metrics_lib.Progress(0, 100, 8, tokens_per_example=4, flops_per_step=2e12,
                                  num_devices=2, peak_flops_per_device=4e12, elapsed=50.0)
  clock[0] += 10.0  # step 1: a slow first step
  first = progress.measure(1)
  assert first["train/step_time"] == 10.0 and progress.eta(1) == 99 * 10.0
  for step in range(2, 6):  # then 1 s per step, and a 3 s evaluation after step 3
    clock[0] += 1.0
    if step == 4:
      with progress.paused():
        clock[0] += 3.0
  out = progress.measure(5)
  assert out["train/step_time"] == 1.0 and out["train/examples_per_sec"] == 8.0
  assert out["train/tokens_per_sec"] == 32.0 and out["train/tflops_per_device"] == 1.0
  assert out["train/mfu"] == 0.25 and out["train/elapsed_time"] == 50.0 + 17.0
  # ETA: 95 steps at the pace since step 1 (wall time, evaluation included): 7 s / 4 steps.
  assert progress.eta(5) == 95 * 7.0 / 4


class _BatchNormNet(nn.Module):
  """Dense -> BatchNorm -> Dense: the smallest classifier with batch statistics."""

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = nn.Dense(4, name="dense")(images.reshape(images.shape[0], -1))
    x = layers.batch_norm(not train, name="bn")(x)
    return nn.Dense(3, name="head")(x)


def test_batch_stats_are_updated_by_the_step_saved_and_restored(tmp_path):
  """BatchNorm statistics live in the state: each (micro)batch moves them by momentum 0.99
  towards its own statistics, in order; checkpoints carry them; evaluation reads them."""
  model, tx = _BatchNormNet(), optax.sgd(0.1)
  x = np.random.default_rng(0).normal(size=(4, 2, 2, 1)).astype(np.float32)
  batch = {"image": x, "labels": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]}
  state = jax.jit(step_lib.make_init_fn(model, tx, (2, 2, 1)))(jax.random.key(0))
  assert set(state) == {"step", "params", "opt_state", "batch_stats"}
  dense = state["params"]["dense"]
  hidden = x.reshape(4, -1).astype(np.float64) @ dense["kernel"] + dense["bias"]

  def moved(stats, h):
    return {"mean": 0.99 * stats["mean"] + 0.01 * h.mean(0),
            "var": 0.99 * stats["var"] + 0.01 * h.var(0)}

  start = {"mean": np.zeros(4), "var": np.ones(4)}
  for accum, expected in ((1, moved(start, hidden)),
                          (2, moved(moved(start, hidden[0::2]), hidden[1::2]))):
    new, metrics = jax.jit(step_lib.make_train_step(
        model, tx, lambda s: 0.1, grad_accum_steps=accum))(state, batch, jax.random.key(1))
    assert np.isfinite(metrics["train/loss"])
    for key in ("mean", "var"):
      np.testing.assert_allclose(new["batch_stats"]["bn"][key], expected[key], rtol=1e-5,
                                 atol=1e-6)
  variables = step_lib.model_variables(new)
  assert set(variables) == {"params", "batch_stats"}
  h = x.reshape(4, -1) @ new["params"]["dense"]["kernel"] + new["params"]["dense"]["bias"]
  bn, stats = new["params"]["bn"], new["batch_stats"]["bn"]
  want = ((h - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * bn["scale"] + bn["bias"]) \
      @ new["params"]["head"]["kernel"] + new["params"]["head"]["bias"]
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), want, rtol=1e-4, atol=1e-5)

  mesh = mesh_lib.make_mesh([("data", -1)])
  boxed = step_lib.abstract_state(model, tx, (2, 2, 1))
  abstract = step_lib.with_shardings(boxed, step_lib.state_shardings(
      boxed, mesh, mesh_lib.DEFAULT_RULES))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1, max_to_keep=1)
  checkpointer.save(1, new, force=True)
  checkpointer.close()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1, max_to_keep=1)
  step, restored = checkpointer.restore_latest(abstract)
  checkpointer.close()
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored["batch_stats"], new["batch_stats"])
