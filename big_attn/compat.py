"""Version shims for the JAX releases we run on (0.10.2 on CPU machines, 0.11.x on GPUs).

Every difference between JAX versions is bridged here, and only here.
"""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def triton_compiler_params(**kwargs):
  """Pallas `CompilerParams` that select the Triton GPU lowering for a `pallas_call`.

  JAX 0.9+ lowers GPU `pallas_call`s through Mosaic GPU unless these are passed; the Triton
  module lives at `jax.experimental.pallas.triton` on 0.10 and 0.11 (deprecated on 0.11, so its
  import warning is silenced here).
  """
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(**kwargs)


def tpu_interpret_mode(interpret):
  """The `interpret=` value that runs a Mosaic TPU `pallas_call` on CPU.

  `True` picks the TPU interpreter (`pltpu.InterpretParams()`, JAX 0.7+), which simulates VMEM
  scratch, DMAs and semaphores; the generic `interpret=True` HLO interpreter is the fallback on
  releases without it. `False` and ready-made `InterpretParams` pass through.
  """
  if interpret is not True:
    return interpret
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  params = getattr(pltpu, "InterpretParams", None)
  return True if params is None else params()
