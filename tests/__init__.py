"""The test suite (its set-up is in `conftest.py`)."""
import os
import re


def xla_flags_for_subprocess() -> str:
  """This run's `XLA_FLAGS` without the simulated device count, for a process that chooses its
  own (the compile flags of `conftest.py` still reach it)."""
  return re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "",
                os.environ.get("XLA_FLAGS", "")).strip()
