"""Mesh construction and logical-to-mesh sharding rules (8 simulated CPU devices)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_attn.parallel import mesh as mesh_lib

RULES = mesh_lib.DEFAULT_RULES


def test_mesh_sizes_rest_and_defaults():
  assert mesh_lib.mesh_shape([("data", -1)], 8) == dict(data=8, fsdp=1, tensor=1, seq=1)
  assert mesh_lib.mesh_shape([("data", 2), ("tensor", -1)], 8) == dict(
      data=2, fsdp=1, tensor=4, seq=1)
  assert mesh_lib.mesh_shape([("fsdp", 4), ("data", 2)], 8) == dict(
      data=2, fsdp=4, tensor=1, seq=1)
  mesh = mesh_lib.make_mesh([("data", 2), ("tensor", -1)])
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == dict(data=2, fsdp=1, tensor=4, seq=1)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  # Without -1 a mesh may use the first devices only (a single-device run on a larger host).
  single = mesh_lib.make_mesh([("data", 1)])
  assert single.size == 1 and single.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("spec, message", [
    ([("data", 16)], "needs 16 devices but 8"),
    ([("data", 3), ("fsdp", -1)], "does not divide"),
    ([("data", -1), ("fsdp", -1)], "one axis only"),
    ([("model", 8)], "not one of"),
    ([("data", 4), ("data", 2)], "twice"),
    ([("data", 0)], "positive int or -1"),
    (["data"], "pairs"),
])
def test_impossible_meshes_raise(spec, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(spec)


def test_rules_must_name_mesh_axes():
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    mesh_lib.check_rules([("embed", "model")])
  with pytest.raises(ValueError, match="pairs"):
    mesh_lib.check_rules(["embed"])


class _Tiny(nn.Module):
  """Params with the logical names of a transformer's weights."""

  @nn.compact
  def __call__(self, x):
    part = nn.with_logical_partitioning
    w_in = self.param("w_in", part(nn.initializers.ones_init(), ("embed", "mlp")), (16, 32))
    w_q = self.param("w_q", part(nn.initializers.ones_init(), ("embed", "heads", "head_dim")),
                     (16, 4, 8))
    scale = self.param("scale", part(nn.initializers.ones_init(), ("norm",)), (16,))
    head = self.param("head", part(nn.initializers.ones_init(), ("embed", "classes")), (16, 10))
    odd = self.param("odd", part(nn.initializers.ones_init(), ("embed", "mlp")), (12, 6))
    return x @ w_in, w_q, scale, head, odd


def _specs(mesh_spec):
  mesh = mesh_lib.make_mesh(mesh_spec)
  boxed = jax.eval_shape(lambda: _Tiny().init(jax.random.key(0), jnp.ones((2, 16))))["params"]
  return mesh, {k: v.spec for k, v in mesh_lib.logical_shardings(boxed, mesh, RULES).items()}


def test_data_parallel_replicates_params_and_splits_batch():
  mesh, specs = _specs([("data", -1)])
  # Axes of size 1 shard nothing: every parameter is replicated.
  assert all(all(axis is None for axis in spec) for spec in specs.values())
  assert mesh_lib.data_sharding(mesh, RULES).spec == P(("data", "fsdp"))
  assert mesh_lib.batch_divisor(mesh, RULES) == 8


def test_fsdp_shards_embed_dimension():
  mesh, specs = _specs([("fsdp", -1)])
  assert specs["w_in"] == P("fsdp", None)
  assert specs["w_q"] == P("fsdp", None, None)
  assert specs["scale"] == P(None)             # norm scales stay replicated
  assert specs["head"] == P("fsdp", None)
  assert specs["odd"] == P(None, None)         # 12 rows do not split 8 ways: replicated
  assert mesh_lib.batch_divisor(mesh, RULES) == 8


def test_tensor_parallel_shards_mlp_and_heads():
  mesh, specs = _specs([("data", 2), ("tensor", 4)])
  assert specs["w_in"] == P(None, "tensor")
  assert specs["w_q"] == P(None, "tensor", None)
  assert specs["odd"] == P(None, None)         # 6 columns do not split 4 ways
  assert mesh_lib.batch_divisor(mesh, RULES) == 2
  assert mesh_lib.data_sharding(mesh, RULES).spec == P(("data", "fsdp"))


def test_activation_specs_use_each_mesh_axis_once():
  # Batch takes (data, fsdp) first, so an activation's embed dimension is not split over fsdp.
  assert mesh_lib.logical_spec(("batch", "length", "embed"), RULES) == P(
      ("data", "fsdp"), "seq", None)
  assert mesh_lib.logical_spec(("batch", "length", "mlp"), RULES) == P(
      ("data", "fsdp"), "seq", "tensor")


def test_shard_batch_places_process_data_with_the_data_sharding():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
  sharding = mesh_lib.data_sharding(mesh, RULES)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  out = mesh_lib.shard_batch({"x": x}, sharding)["x"]
  assert out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out), x)
  assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}


class _FakeSharding:
  """What `process_rows` reads of a sharding: the row slices of this process's devices."""

  def __init__(self, slices):
    self._slices = slices

  def addressable_devices_indices_map(self, shape):
    del shape
    return {i: (s,) for i, s in enumerate(self._slices)}


def test_process_rows_are_the_rows_this_process_holds():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
  assert mesh_lib.process_rows(mesh_lib.data_sharding(mesh, RULES), 16) == slice(0, 16)
  seq = mesh_lib.make_mesh([("seq", -1)])  # batch replicated: every process reads it all
  assert mesh_lib.process_rows(mesh_lib.data_sharding(seq, RULES), 16) == slice(0, 16)
  # Two of four data shards (rows 8:16), each replicated over a model axis.
  held = [slice(8, 12), slice(12, 16), slice(8, 12), slice(12, 16)]
  assert mesh_lib.process_rows(_FakeSharding(held), 16) == slice(8, 16)
  with pytest.raises(ValueError, match="not contiguous"):
    mesh_lib.process_rows(_FakeSharding([slice(0, 4), slice(8, 12)]), 16)
  with pytest.raises(ValueError, match="holds no device"):
    mesh_lib.process_rows(_FakeSharding([]), 16)


def test_shard_batch_with_the_global_batch_size():
  mesh = mesh_lib.make_mesh([("data", -1)])
  sharding = mesh_lib.data_sharding(mesh, RULES)
  x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
  out = mesh_lib.shard_batch({"x": x}, sharding, 8)["x"]
  assert out.shape == (8, 2)
  np.testing.assert_array_equal(np.asarray(out), x)


def test_a_mesh_that_leaves_devices_unused_needs_mesh_subset():
  with pytest.raises(ValueError, match=r"uses 3 of the 8 devices.*config.mesh_subset=True"):
    mesh_lib.make_mesh([("data", 3)], allow_subset=False)
  assert mesh_lib.make_mesh([("data", 3)], allow_subset=True).size == 3
  assert mesh_lib.make_mesh([("data", 2), ("fsdp", -1)], allow_subset=False).size == 8
