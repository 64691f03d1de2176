"""Test set-up: 8 simulated CPU devices (set before JAX is imported), platform markers, and the
tests marked `slow` or `xdist_group` run first."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top


def pytest_collection_modifyitems(config, items):
  del config
  platform = jax.default_backend()
  for item in items:
    if "gpu_only" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu_only" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
  # `--dist=loadgroup` (pyproject.toml) hands pytest-xdist workers one test, or one `xdist_group`
  # (tests sharing an expensive module fixture, built once on one worker), at a time in this order:
  # long ones started first leave no worker running a long test alone at the end of the run.
  items.sort(key=lambda item: "slow" not in item.keywords
             and item.get_closest_marker("xdist_group") is None)
