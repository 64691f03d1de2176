"""The environment of the processes tests start (notebook kernels, simulated hosts)."""
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(device_count: int | None = None) -> str:
  """conftest.py's XLA flags (cheaper compiles) with `device_count` CPU devices instead of the
  test process's 8 (None: the default, one)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(DEVICE_COUNT_FLAG)]
  if device_count is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
  return " ".join(flags)
