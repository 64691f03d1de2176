"""One of the 2 processes (4 CPU devices each) that `tests/test_multiprocess.py` launches.

    python -m tests.multiprocess_worker PROCESS_ID PORT ROOT

Its `XLA_FLAGS` (from the test) set the 4 CPU devices. Runs every scenario of
`test_multiprocess.SCENARIOS` in `ROOT/<name>`, then resumes `ROOT/resume_1to2` (stopped by a
1-process run), then runs `ROOT/preempt`, in which process 1 receives SIGTERM after step 3.
Prints one `RESULT <name> <json>` line per run.
"""
import json
import os
import signal
import sys

process_id, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)

from big_attn import main as main_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.train import metrics as metrics_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import test_multiprocess  # noqa: E402  pylint: disable=g-import-not-at-top


def run(name, config):
  result = main_lib.train_and_evaluate(config, os.path.join(root, name))
  print("RESULT", name, json.dumps(result), flush=True)


if not os.environ.get("ONLY_PREEMPT"):
  for scenario in test_multiprocess.SCENARIOS:
    run(scenario, test_multiprocess.scenario_config(scenario))
  run("resume_1to2", test_multiprocess.scenario_config("data"))

write = metrics_lib.MetricWriter.write


def write_then_preempt(self, step, metrics):
  write(self, step, metrics)
  if step == 3 and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)


metrics_lib.MetricWriter.write = write_then_preempt
run("preempt", test_multiprocess.scenario_config("data"))
