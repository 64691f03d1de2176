"""The device mesh and the logical-to-mesh sharding rules, both read from the config.

    config.mesh = [("data", -1)]                           # pure data parallel
    config.mesh = [("fsdp", -1)]                           # ZeRO-3: params and optimizer state
    config.mesh = [("data", 2), ("tensor", -1)]            # data x tensor (Megatron) parallel
    config.sharding_rules = DEFAULT_RULES                  # one table, every strategy

The mesh always has the four axes `data, fsdp, tensor, seq` (unnamed ones have size 1), so one
rule table serves every strategy: a rule that names an axis of size 1 shards nothing. Modules
annotate parameters and activations with logical names only (`embed`, `mlp`, `heads`, `batch`,
...); `logical_shardings` turns them into `NamedSharding`s with flax's priority rules (a mesh axis
is used at most once per array, the first matching rule wins). A dimension that the assigned mesh
axes do not divide is replicated instead (for example 10 classes over fsdp=8).

Parameters, optimizer state and batches are placed by these rules (`jit` in/out shardings);
XLA propagates the shardings of activations from them. The training loop does not make the
mesh global (`jax.set_mesh`), so modules' `nn.with_logical_constraint` calls on activations are
inert there; models that need an explicit activation layout (the LM's sequence parallelism)
take the mesh as a field and use `shard_map`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "seq")

# Logical axis -> mesh axes. Batch is split over every data-like axis; weights' `embed` dimension
# over fsdp (ZeRO-3); the Megatron dimensions (mlp, heads) over tensor; sequences over seq.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels_in", None),
    ("position", None),
    ("classes", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def _check_axis_spec(mesh_config: Sequence[Any]) -> list[tuple[str, int]]:
  pairs = []
  for entry in mesh_config:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      raise ValueError(f"config.mesh entries must be (axis, size) pairs, got {entry!r}")
    name, size = entry
    if name not in MESH_AXES:
      raise ValueError(f"config.mesh axis {name!r} is not one of {MESH_AXES}")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1
                                                                            and size != -1):
      raise ValueError(f"config.mesh size of axis {name!r} must be a positive int or -1, "
                       f"got {size!r}")
    pairs.append((name, int(size)))
  names = [n for n, _ in pairs]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh names an axis twice: {names}")
  if sum(s == -1 for _, s in pairs) > 1:
    raise ValueError(f"config.mesh may use -1 (the rest) for one axis only, got {pairs}")
  return pairs


def mesh_shape(mesh_config: Sequence[Any], num_devices: int, *,
               allow_subset: bool = True) -> dict[str, int]:
  """Sizes of all four mesh axes for `num_devices`; -1 takes the rest, unnamed axes are 1.

  Without -1 the mesh may use fewer devices than there are (the first ones) when
  `allow_subset`. Raises `ValueError` saying why when the sizes need more devices, leave
  devices unused without `allow_subset`, or -1 has no integer size.
  """
  pairs = _check_axis_spec(mesh_config)
  known = math.prod(s for _, s in pairs if s != -1)
  sizes = dict(pairs)
  rest = [n for n, s in pairs if s == -1]
  if rest:
    if num_devices % known:
      raise ValueError(f"config.mesh {pairs}: the fixed axes use {known} devices, which does "
                       f"not divide the {num_devices} available, so -1 has no integer size")
    sizes[rest[0]] = num_devices // known
  elif known > num_devices:
    raise ValueError(f"config.mesh {pairs} needs {known} devices but {num_devices} are "
                     "available")
  elif known < num_devices and not allow_subset:
    raise ValueError(f"config.mesh {pairs} uses {known} of the {num_devices} devices; give one "
                     "axis size -1 (the rest) to use them all, or set config.mesh_subset=True "
                     f"to run on the first {known}")
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(mesh_config: Sequence[Any], devices: Sequence[Any] | None = None, *,
              allow_subset: bool = True) -> Mesh:
  """A `Mesh` with axes `data, fsdp, tensor, seq` (auto sharding) from `[(axis, size)]`."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices), allow_subset=allow_subset)
  sizes = tuple(shape[a] for a in MESH_AXES)
  devices = devices[:math.prod(sizes)]
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_rules(rules: Sequence[Any]) -> tuple[tuple[str, Any], ...]:
  """Validates `config.sharding_rules` (`[(logical, mesh axis | tuple | None)]`) as a tuple."""
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"config.sharding_rules entries must be (logical_name, mesh_axes) "
                       f"pairs, got {rule!r}")
    logical, target = rule
    targets = (target,) if isinstance(target, str) or target is None else tuple(target)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"config.sharding_rules maps {logical!r} to unknown mesh axis {t!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((logical, target if isinstance(target, str) or target is None else
                tuple(target)))
  return tuple(out)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """`spec` with the dimensions its mesh axes do not divide replicated."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if size > 1 and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Any]) -> Any:
  """`NamedSharding`s for a tree whose leaves may be `nn.Partitioned` (logical names).

  Leaves without names (plain arrays, optimizer counters) are replicated. `abstract_tree` is
  what `jax.eval_shape(model.init, ...)` returns (boxed); the result has the unboxed structure.
  """
  rules = check_rules(rules)
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.unbox(abstract_tree)

  def to_sharding(spec, leaf):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, _fit(spec, np.shape(leaf), mesh))

  return jax.tree.map(to_sharding, mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_spec(names: Sequence[str | None], rules: Sequence[Any]) -> PartitionSpec:
  """The mesh `PartitionSpec` of one array with logical dimension `names`."""
  return nn.logical_to_mesh_axes(tuple(names), check_rules(rules))


def data_sharding(mesh: Mesh, rules: Sequence[Any]) -> NamedSharding:
  """Sharding of a batch: leading dimension over the mesh axes of logical `batch`."""
  return NamedSharding(mesh, logical_spec(("batch",), rules))


def batch_divisor(mesh: Mesh, rules: Sequence[Any]) -> int:
  """How many ways a batch is split (global batch sizes must be multiples of it)."""
  axes = logical_spec(("batch",), rules)[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in names)


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold under `sharding`.

  Processes whose devices hold the same rows (a model axis across hosts) get the same slice, so
  they read the same examples. Raises `ValueError` when this process holds no rows or rows
  that are not contiguous (a device order the input pipeline cannot serve).
  """
  spans = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                  for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
  if not spans:
    raise ValueError(f"process {jax.process_index()} holds no device of the mesh; every "
                     "process must take part in config.mesh")
  start, stop = spans[0]
  for begin, end in spans[1:]:
    if begin > stop:
      raise ValueError(f"process {jax.process_index()} holds rows {spans} of the batch, which "
                       "are not contiguous; order config.mesh so that each process's devices "
                       "are neighbours along the batch axes")
    stop = max(stop, end)
  return slice(start, stop)


def shard_batch(batch: Any, sharding: NamedSharding, batch_size: int | None = None) -> Any:
  """Global arrays of `batch_size` rows from this process's rows of them (`process_rows`);
  `batch_size` None: the process holds the whole batch or its even share of it."""
  def place(x):
    x = np.asarray(x)
    shape = None if batch_size is None else (batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(place, batch)

