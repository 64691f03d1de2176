"""Version shims for the JAX releases we run on (0.10.2 on CPU machines, 0.11.x on GPUs).

Every difference between JAX versions is bridged here, and only here.
"""
from __future__ import annotations

import functools

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def pallas_triton():
  """The Pallas Triton module (`CompilerParams`, masked `load`/`store`): it lives at
  `jax.experimental.pallas.triton` on 0.10 and 0.11 (deprecated on 0.11, so its import warning
  is silenced here)."""
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton


def triton_compiler_params(**kwargs):
  """Pallas `CompilerParams` that select the Triton GPU lowering for a `pallas_call` (JAX 0.9+
  lowers GPU `pallas_call`s through Mosaic GPU unless these are passed)."""
  return pallas_triton().CompilerParams(**kwargs)


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


def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
  """`jax.shard_map` (JAX >= 0.7, `check_vma`), else `jax.experimental.shard_map` (`check_rep`)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as legacy  # pylint: disable=g-import-not-at-top
  return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def reshape_with_sharding(x, shape, sharding):
  """Reshapes `x` to `shape` laid out as `sharding` (a `NamedSharding`) on any kind of mesh.

  Explicit mesh axes (the `jax.make_mesh` default since 0.7) need the output sharding on the
  reshape itself (a sharded dimension may not be split or merged otherwise), then a `reshard`
  (the reshape ignores it for an unsharded input), and the same on the way back (the gradient
  goes to `x`'s own sharding, which must be expressible for the merged shape: lay `x` out with
  `constrain` first); Auto axes (`jax.sharding.Mesh`) take a sharding constraint.
  """
  if _has_explicit_axes(sharding.mesh):
    return _explicit_reshape(x, tuple(shape), sharding, jax.typeof(x).sharding)
  return jax.lax.with_sharding_constraint(jax.lax.reshape(x, tuple(shape)), sharding)


def _has_explicit_axes(mesh) -> bool:
  explicit = getattr(jax.sharding, "AxisType", None)
  return explicit is not None and explicit.Explicit in tuple(getattr(mesh, "axis_types", ()))


def constrain(x, sharding):
  """Lays `x` out as `sharding`: `jax.reshard` on Explicit axes (which also sets its type), a
  sharding constraint on Auto axes."""
  if _has_explicit_axes(sharding.mesh):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _reshape_to(x, shape, sharding):
  return jax.reshard(jax.lax.reshape(x, shape, out_sharding=sharding), sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _explicit_reshape(x, shape, sharding, in_sharding):
  """A reshape onto Explicit axes whose transpose names the input's sharding (JAX's own
  transpose of `lax.reshape` passes none, which Explicit axes reject when a sharded
  dimension is split or merged)."""
  del in_sharding
  return _reshape_to(x, shape, sharding)


def _explicit_reshape_fwd(x, shape, sharding, in_sharding):
  return _explicit_reshape(x, shape, sharding, in_sharding), x.shape


def _explicit_reshape_bwd(shape, sharding, in_sharding, in_shape, ct):
  del shape, sharding
  return (_reshape_to(ct, in_shape, in_sharding),)


_explicit_reshape.defvjp(_explicit_reshape_fwd, _explicit_reshape_bwd)


def pallas_out_struct(shape, dtype, *like):
  """`jax.ShapeDtypeStruct` for a `pallas_call` output that varies over the manual mesh axes
  its inputs `like` vary over: `shard_map(check_vma=True)` requires it (JAX >= 0.10 spells it
  `manual_axis_type`, 0.7-0.9 `vma`); outside a shard_map the set is empty and ignored."""
  avals = [jax.typeof(x) for x in like if x is not None]
  if avals and hasattr(avals[0], "manual_axis_type"):
    varying = frozenset().union(*(a.manual_axis_type.varying for a in avals))
    manual_axis_type = type(avals[0].manual_axis_type)(varying=varying)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual_axis_type)
  if avals and hasattr(avals[0], "vma"):
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset().union(*(a.vma for a in avals)))
  return jax.ShapeDtypeStruct(shape, dtype)


def tpu_cluster_types():
  """JAX's TPU pod detectors (private in every JAX we run on): classes with `is_env_present()`."""
  try:
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ()
  return tuple(getattr(cloud_tpu_cluster, name) for name in ("GceTpuCluster", "GkeTpuCluster")
               if hasattr(cloud_tpu_cluster, name))
