"""experiments/bench_flash.py and experiments/gpu_check.sh: the CPU-runnable parts.

The speed part in `--smoke` mode (tiny shapes, our kernel in the Pallas interpreter) writes its
table to `--out`, with each timing checked against the reference; the check flags a wrong
implementation; gpu_check.sh passes `bash -n`.
"""
import os
import subprocess

import jax.numpy as jnp
import pytest

from tests import experiments



@pytest.fixture(name="bench", scope="module")
def _bench():
  return experiments.load("bench_flash")


def test_smoke_speed_writes_checked_rows_to_out(bench, tmp_path):
  bench.main(["--only=speed", "--smoke", "--impls=ours,xla,no_such_impl", f"--out={tmp_path}"])
  assert sorted(os.listdir(tmp_path)) == ["flash_speed_cpu.md", "flash_speed_cpu.png"]
  table = (tmp_path / "flash_speed_cpu.md").read_text()
  assert table.count("| 16 | False | 48 | 1 |") == 2 and table.count("| 16 | True | 48 | 1 |") == 2
  assert "| ours | xla |" in table and "!" not in table.split("Each timing")[1].split("\n", 1)[1]
  assert "Failures" not in table and "Wrong results" not in table


def test_check_flags_a_wrong_implementation(bench):
  q, k, v, do = bench._inputs(1, 40, 2, 16, jnp.bfloat16)  # pylint: disable=protected-access
  ref = lambda q, k, v: bench.flash_attention_reference(q, k, v, is_causal=True)
  error, ok = bench.check_against_reference(ref, (q, k, v), causal=True)
  assert ok and error < 1e-2
  _, ok = bench.check_against_reference(lambda q, k, v: ref(q, k, v) * 1.1, (q, k, v),
                                        causal=True)
  assert not ok
  wrong_grad = bench._fwd_bwd(lambda q, k, v: ref(q * 1.1, k, v))  # pylint: disable=protected-access
  _, ok = bench.check_against_reference(wrong_grad, (q, k, v, do), causal=True)
  assert not ok


def test_gpu_check_script_parses():
  script = os.path.join(experiments.ROOT, "experiments", "gpu_check.sh")
  subprocess.run(["bash", "-n", script], check=True)
  assert os.access(script, os.X_OK)
