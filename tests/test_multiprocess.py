"""Several hosts, simulated: 2 processes x 4 CPU devices (gloo collectives over 127.0.0.1) train
exactly as 1 process x 8 devices — data parallel, FSDP across the hosts with tensor parallelism
within each, and the LM's striped sequence parallelism across hosts — resume a 1-process run on 2 processes and a 2-process run on
1, and stop together at one step with one checkpoint when one process gets SIGTERM.

One launch of `tests/multiprocess_worker.py` runs every case; each process has a time limit.
The ViT scenarios are one model on one batch: the mesh changes the sharding, not the math
(their losses agree to 1e-7 on 8 local devices), so one 1-process run is their reference.
JAX's persistent compilation cache (a directory of the test run) serves the repeats of one config
to the 1-process runs and to process 0. Process 1 compiles each run itself: JAX writes the cache
from process 0 only, and a program's key differs between the processes.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from big_attn import main as main_lib
from tests import processes
from tests.test_train import ROOT, _config_module, _run_steps, losses, tiny_config

pytestmark = pytest.mark.xdist_group("multiprocess")  # one worker builds `runs` once
SCENARIOS = ("data", "fsdp_tensor", "lm_seq_striped")
# The first axis of size > 1 spans the processes (`parallel.mesh.MESH_AXES` order).
_MESHES = {"data": [("data", -1)], "fsdp_tensor": [("fsdp", 2), ("tensor", 4)]}


def reference_of(name: str) -> str:
  """The scenario whose 1-process run is `name`'s expected losses."""
  return name if name == "lm_seq_striped" else "data"
TIMEOUT_S = 600
STEPS = 6  # every data-parallel run (scenario, resume, preempt) is one config, so one compile
_CACHE_EVERYTHING = {"jax_persistent_cache_min_compile_time_secs": 0,
                     "jax_persistent_cache_min_entry_size_bytes": -1}


def scenario_config(name: str) -> ml_collections.ConfigDict:
  """A tiny ViT on digits over `_MESHES[name]`, or a tiny byte LM whose sequences are split
  over all 8 devices (striped), so over both processes."""
  if name == "lm_seq_striped":
    config = _config_module("lm_bytes").get_config("runlocal,seq_shards=8,strategy=striped,"
                                                   "seq_len=32")
    config.model.variant = None
    config.model.update(width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        dtype="float32")
    config.input.update(batch_size=2, max_files=40)
    config.update(total_steps=STEPS, log_every=1, ckpt_every=100, lr=1e-2)
    config.evals = {}
    return ml_collections.ConfigDict(config.to_dict())
  return tiny_config(mesh=_MESHES[name], mesh_subset=False, total_steps=STEPS, ckpt_every=3)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def compilation_cache(path: str):
  """JAX's persistent compilation cache in `path`, every program cached, while the block runs."""
  settings = dict(_CACHE_EVERYTHING, jax_compilation_cache_dir=path)
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()  # JAX decides once whether the cache is on
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    cc.reset_cache()


def _launch(root: str) -> list[dict[str, dict]]:
  """Runs the 2 worker processes to the end (or kills both at `TIMEOUT_S`); their results."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=os.path.join(root, "compilation_cache"),
             XLA_FLAGS=processes.xla_flags(device_count=4),
             **{name.upper(): str(value) for name, value in _CACHE_EVERYTHING.items()})
  # Output to files, not pipes: a process blocked on a full pipe would stall the collectives.
  logs = [os.path.join(root, f"process_{i}.log") for i in range(2)]
  with contextlib.ExitStack() as stack:
    files = [stack.enter_context(open(log, "w", encoding="utf-8")) for log in logs]
    procs = [stack.enter_context(subprocess.Popen(
        [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port), root], cwd=ROOT,
        env=env, stdout=f, stderr=subprocess.STDOUT, text=True)) for i, f in enumerate(files)]
    try:
      for proc in procs:
        proc.wait(timeout=TIMEOUT_S)
    finally:
      for proc in procs:
        proc.kill()
  outputs = []
  for proc, log in zip(procs, logs):
    with open(log, encoding="utf-8") as f:
      outputs.append(f.read())
    assert proc.returncode == 0, outputs[-1][-4000:]
  return [{line.split()[1]: json.loads(line.split(maxsplit=2)[2])
           for line in out.splitlines() if line.startswith("RESULT ")} for out in outputs]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """The persistent compilation cache of this module's 1-process runs."""
  return str(tmp_path_factory.mktemp("compilation_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
  root = str(tmp_path_factory.mktemp("multiprocess"))
  reference = str(tmp_path_factory.mktemp("reference"))
  with compilation_cache(cache_dir):
    expected = {name: losses(_train(scenario_config(name), os.path.join(reference, name)))
                for name in {reference_of(n) for n in SCENARIOS}}
    # A 1-process run stopped after step 3, for the 2 processes to resume.
    stopped = _run_steps(scenario_config("data"), os.path.join(root, "resume_1to2"), 3)
  assert stopped == {"step": 3, "preempted": True}
  return root, expected, _launch(root)


def _train(config, workdir):
  assert not main_lib.train_and_evaluate(config, workdir)["preempted"]
  return workdir


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_train_as_one_with_eight_devices(runs, name):
  root, expected, results = runs
  assert [r[name] for r in results] == [{"step": STEPS, "preempted": False}] * 2
  got, want = losses(os.path.join(root, name)), expected[reference_of(name)]
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-5)


def test_a_one_process_run_resumes_on_two(runs):
  root, expected, results = runs
  assert [r["resume_1to2"] for r in results] == [{"step": STEPS, "preempted": False}] * 2
  got, want = losses(os.path.join(root, "resume_1to2")), expected["data"]
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_on_one(runs, cache_dir):
  root, expected, results = runs
  stopped = [r["preempt"] for r in results]
  assert stopped[0] == stopped[1] and stopped[0]["preempted"], stopped
  step = stopped[0]["step"]
  assert 3 <= step < STEPS
  workdir = os.path.join(root, "preempt")
  assert step in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit()]
  # Resumed by one process with 8 devices: the same losses as the uninterrupted run.
  with compilation_cache(cache_dir):
    resumed = main_lib.train_and_evaluate(scenario_config("data"), workdir)
  assert resumed == {"step": STEPS, "preempted": False}
  got, want = losses(workdir), expected["data"]
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
