"""Restarting a workdir never loses work: a changed config is refused before anything is touched,
checksums catch corrupt files, nothing is set aside without proof of corruption, no silent
start-over, one metrics line per step after a resume, and SIGTERM during restore."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from big_attn import checkpoint_io as ckpt_lib
from big_attn import main as main_lib
from big_attn.train import config_lib
from tests.test_train import ROOT, _read_events, losses, read_metrics, tiny_config

pytestmark = pytest.mark.xdist_group("checkpoint")  # one worker builds `finished` once
STEPS = 8


def _config(**overrides):
  return tiny_config(**{"total_steps": STEPS, "ckpt_every": 4, "model.attention": "softmax",
                        **overrides})


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _snapshot(workdir):
  """Every file of the workdir with its SHA-256 (what "nothing was touched" compares)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, workdir)] = ckpt_lib.sha256(path)
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run of 8 steps with checkpoints 4 and 8."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  assert main_lib.train_and_evaluate(_config(), workdir) == {"step": STEPS, "preempted": False}
  assert _checkpoint_steps(workdir) == [4, 8]
  return workdir


@pytest.fixture
def run(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


@pytest.mark.parametrize("override, key", [({"model.width": 32}, "model.width"),
                                           ({"model.attention": "sigmoid"}, "model.attention"),
                                           ({"optax_name": "sgd"}, "optax_name")])
def test_changed_config_is_refused_and_nothing_is_touched(run, override, key):
  before = _snapshot(run)
  with pytest.raises(main_lib.RunRefused, match=rf"(?s){key}: .* -> .*resume_policy") as e:
    main_lib.train_and_evaluate(_config(**override), run)
  assert "total_steps" in str(e.value)  # the keys that may change are named
  assert _snapshot(run) == before


def test_resumable_keys_may_change(run):
  result = main_lib.train_and_evaluate(_config(total_steps=10, log_every=2, ckpt_every=5), run)
  assert result == {"step": 10, "preempted": False}
  assert _checkpoint_steps(run) == [8, 10]


def test_accept_changes_resumes_and_keeps_the_previous_config(run):
  config = _config(lr=1e-3, total_steps=9, resume_policy="accept_changes")
  assert main_lib.train_and_evaluate(config, run)["step"] == 9
  previous = [f for f in os.listdir(run) if f.startswith("config.2") and f.endswith(".json")]
  assert len(previous) == 1
  with open(os.path.join(run, previous[0]), encoding="utf-8") as f:
    assert json.load(f)["lr"] == 3e-3
  assert config_lib.load_config(run).lr == 1e-3


def test_flipped_bits_are_detected_and_the_previous_checkpoint_resumes(run, finished):
  arrays = os.path.join(run, "checkpoints", "8", "state")
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(arrays) for f in fs),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:
    data = bytearray(f.read())
    for i in range(16):  # 16 single-bit flips spread over the file
      data[(i * 7919) % len(data)] ^= 1 << (i % 8)
    f.seek(0)
    f.write(data)
  os.remove(os.path.join(run, "metrics.jsonl"))
  assert main_lib.train_and_evaluate(_config(), run) == {"step": STEPS, "preempted": False}
  corrupt = [d for d in os.listdir(os.path.join(run, "checkpoints")) if ".corrupt-" in d]
  assert [d.split(".")[0] for d in corrupt] == ["8"]
  redone, expected = losses(run), losses(finished)
  assert sorted(redone) == [5, 6, 7, 8]
  np.testing.assert_array_equal([redone[s] for s in redone], [expected[s] for s in redone])


def test_no_verified_checkpoint_stops_unless_restart_is_asked(run, finished):
  for step in (4, 8):
    with open(os.path.join(run, "checkpoints", str(step), "state", "_METADATA"), "ab") as f:
      f.write(b" ")
  with pytest.raises(ckpt_lib.RestoreError, match="refusing to start over.*restart"):
    main_lib.train_and_evaluate(_config(), run)
  assert len([d for d in os.listdir(os.path.join(run, "checkpoints")) if ".corrupt-" in d]) == 2

  # An explicit restart keeps the old run aside and starts from step 0 with fresh data.
  assert main_lib.train_and_evaluate(_config(resume_policy="restart"), run)["step"] == STEPS
  assert [d for d in os.listdir(run) if d.startswith("checkpoints.previous-")]
  assert [d for d in os.listdir(run) if d.startswith("metrics.previous-")]
  restarted, expected = losses(run), losses(finished)
  assert sorted(restarted) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([restarted[s] for s in restarted],
                                [expected[s] for s in restarted])


def test_a_state_that_does_not_fit_is_not_called_corrupt(run):
  # accept_changes lets a different width through the config check; the restore then fails,
  # and that is no proof of corruption: the checkpoints stay where they are.
  before = _snapshot(os.path.join(run, "checkpoints"))
  with pytest.raises(ckpt_lib.RestoreError, match="not proof that it is corrupt"):
    main_lib.train_and_evaluate(_config(**{"model.width": 32,
                                           "resume_policy": "accept_changes"}), run)
  assert _snapshot(os.path.join(run, "checkpoints")) == before


def test_checkpoint_without_checksums_is_restored_unverified(run, finished):
  shutil.rmtree(os.path.join(run, "checkpoints-sha256"))
  result = main_lib.train_and_evaluate(_config(total_steps=10), run)
  assert result["step"] == 10 and _checkpoint_steps(run) == [8, 10]


def test_metrics_hold_each_step_once_after_dying_past_a_checkpoint(run, finished):
  # As after kill -9 at step 8 before its checkpoint: metrics reach 8, checkpoints only 4.
  shutil.rmtree(os.path.join(run, "checkpoints", "8"))
  assert main_lib.train_and_evaluate(_config(), run)["step"] == STEPS
  steps = [r["step"] for r in read_metrics(run)]
  assert steps == list(range(1, STEPS + 1))
  resumed, expected = losses(run), losses(finished)
  np.testing.assert_array_equal([resumed[s] for s in steps], [expected[s] for s in steps])
  # TensorBoard: the resumed run's file starts with SessionLog.START (status 1) at step 5,
  # which makes TensorBoard drop the first run's events of steps 5.. .
  logdir = os.path.join(run, "tensorboard")
  starts = [e for name in os.listdir(logdir) for e in _read_events(os.path.join(logdir, name))
            if e[1] == "session_log"]
  assert starts == [(5, "session_log", 1)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_restore_stops_cleanly_without_a_new_checkpoint(run, monkeypatch, signum):
  shutil.rmtree(os.path.join(run, "checkpoints", "8"))
  restore = ckpt_lib.Checkpointer.restore_latest

  def preempted_restore(self, *args):
    os.kill(os.getpid(), signum)  # main's handler only records it
    return restore(self, *args)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_latest", preempted_restore)
  # The handlers the process had: a shell's background job starts with SIGINT ignored.
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  assert main_lib.train_and_evaluate(_config(), run) == {"step": 4, "preempted": True}
  assert _checkpoint_steps(run) == [4]
  assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers put back


def test_command_line_refusal_exits_non_zero_without_a_traceback(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  saved = _config()
  config_lib.save_config(saved, str(workdir))
  overrides = [f"--config.{k}={v}" for k, v in (("total_steps", STEPS), ("ckpt_every", 4))]
  proc = subprocess.run(
      [sys.executable, "-m", "big_attn.main", "--config=configs/vit_digits.py:runlocal",
       f"--workdir={workdir}", *overrides], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "model.width: 16 -> " in proc.stderr and "Nothing was changed" in proc.stderr
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]
