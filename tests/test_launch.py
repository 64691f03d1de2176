"""How `big_attn.main` decides on a multi-process launch: manual flags or environment, srun steps,
Open MPI 4 and 5, TPU pods, and one process otherwise; errors name what is missing."""
import subprocess
import sys

import pytest

from big_attn import main as main_lib
from tests.test_train import ROOT


def test_manual_launch_from_flags_or_environment():
  want = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
  assert main_lib.distributed_args({}, **want) == want
  env = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="2")
  assert main_lib.distributed_args(env) == want
  assert main_lib.distributed_args(dict(env, JAX_PROCESS_ID="0"))["process_id"] == 0
  # Open MPI 5 gives count and id; the coordinator comes from the flag.
  ompi5 = dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2")
  assert main_lib.distributed_args(ompi5, coordinator_address="10.0.0.1:1234") == want


def test_detected_clusters_and_single_process():
  srun = dict(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_PROCID="1")
  assert main_lib.distributed_args(srun) == {}  # JAX's own SLURM detection
  assert main_lib.distributed_args(dict(srun, SLURM_NTASKS="1")) is None
  # A plain `python` inside an allocation (no srun step) is one process.
  assert main_lib.distributed_args(dict(SLURM_JOB_ID="7", SLURM_NTASKS="8")) is None
  assert main_lib.distributed_args(dict(OMPI_COMM_WORLD_SIZE="2",
                                        OMPI_MCA_orte_hnp_uri="1.2.3.4:5")) == {}
  assert main_lib.distributed_args({}, tpu_pod=True) == {}
  assert main_lib.distributed_args({}) is None


def test_launch_errors_name_what_is_missing():
  with pytest.raises(ValueError, match="not --num_processes and --process_id"):
    main_lib.distributed_args({}, coordinator_address="h:1")
  with pytest.raises(ValueError, match=r"--process_id=3 must be in \[0, --num_processes=2\)"):
    main_lib.distributed_args({}, coordinator_address="h:1", num_processes=2, process_id=3)
  with pytest.raises(ValueError, match="Open MPI 5.*--coordinator_address"):
    main_lib.distributed_args(dict(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0"))


def test_command_line_launch_error_has_no_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "big_attn.main", "--config=configs/vit_digits.py:runlocal",
       f"--workdir={tmp_path}", "--coordinator_address=127.0.0.1:1", "--num_processes=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert "not --process_id" in proc.stderr and "Traceback" not in proc.stderr
