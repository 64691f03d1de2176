"""Test set-up: 8 simulated CPU devices and cheaper code generation (set before JAX is
imported), one persistent compilation cache for the whole run, platform markers, and the tests
marked `slow` or `xdist_group` run first.
"""
import os
import shutil
import tempfile

# The tests' programs are tiny: compiling them costs far more than running them, so XLA compiles
# them at backend optimisation level 1 (LLVM optimises the generated code less): about 15% less
# CPU time per test file. Level 0 saves 30% but changes results (a NaN in a bfloat16 gradient of
# `retention`, FFT round-off beyond the property tests' bound). XLA's CPU fusion emitters are off:
# the older loop emitters compile the same fusions in about 35% less time
# (`experiments/results/test_times.md`). Set XLA_FLAGS to override.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=1"
                    " --xla_cpu_use_fusion_emitters=false"),
     "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same program (a tiny training step, a model's forward) through new jitted
# functions, which JAX's in-memory caches cannot match: XLA compiles each once per run, and the
# tests, the pytest-xdist workers and the processes the tests start (they inherit the environment)
# load it from this directory. The process that creates it (the first to load this file, unless
# the variable is set) removes it at the end. Programs that compile faster than
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS are not stored.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="big_attn_test_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
