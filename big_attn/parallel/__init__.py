"""Sequence parallelism: attention over a sequence split across the devices of a mesh axis.

    from big_attn import parallel
    out = parallel.sequence_parallel_attention(q, k, v, mesh=mesh, strategy="striped")

`ring_attention` and `striped_attention` are per-shard functions for use inside `jax.shard_map`;
`sequence_parallel_attention` wraps them (or an all-gather of K/V) for global arrays.
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_attn import compat
from big_attn.ops import common
from big_attn.ops.softmax import dot_product_attention
from big_attn.parallel.blockwise import BlockImpl, block_plan
from big_attn.parallel.ring import ring_attention
from big_attn.parallel.striped import stripe, striped_attention, unstripe

Array = jax.Array

STRATEGIES = ("ring", "striped", "all_gather")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _all_gather_attention(query, key, value, q_seg, kv_seg, *, axis_name, is_causal, scale):
  """Local queries against all keys/values gathered over `axis_name` (contiguous shards)."""
  t = query.shape[1]
  gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
  key, value = gather(key), gather(value)
  mask = None
  if is_causal:
    q_pos = lax.axis_index(axis_name) * t + jax.numpy.arange(t)
    mask = (jax.numpy.arange(key.shape[1])[None, :] <= q_pos[:, None])[None, None]
  segments = None if q_seg is None else (q_seg, gather(kv_seg))
  return dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=False,
                               segment_ids=segments, implementation="xla")


def _layout(mesh, seq_axis: str, dims: common.Dims):
  """Mesh axes for the batch and heads dimensions: `(batch_axes or None, head_axis or None)`."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a != seq_axis)
  num_batch = math.prod(mesh.shape[a] for a in batch_axes)
  if dims.batch % num_batch:
    raise ValueError(
        f"batch size {dims.batch} is not divisible by the mesh axes {batch_axes} it is sharded "
        f"over (size {num_batch})")
  head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names and HEAD_AXIS != seq_axis else None
  if head_axis is not None:
    size = mesh.shape[head_axis]
    if dims.num_heads % size or dims.num_kv_heads % size:
      raise ValueError(
          f"query heads ({dims.num_heads}) and key/value heads ({dims.num_kv_heads}) must be "
          f"divisible by the size {size} of mesh axis {head_axis!r} they are sharded over")
  return (batch_axes or None), head_axis


def _working_mesh(mesh, *arrays):
  """`mesh`, or its Auto-axes view when neither the inputs' types nor a `jax.set_mesh`
  context carry Explicit axes.

  An output typed as sharded over Explicit axes can only be used where a mesh context exists
  (`jax.grad` builds its cotangent from the output's type), so the result's type follows the
  caller: Explicit in, Explicit out; unsharded in (an Explicit `jax.make_mesh` passed without
  `jax.set_mesh`), an array laid out on the mesh whose type is unsharded.
  """
  explicit = jax.sharding.AxisType.Explicit
  if explicit not in tuple(getattr(mesh, "axis_types", ())):
    return mesh
  typed = [jax.typeof(x).sharding.mesh for x in arrays if x is not None]
  if any(explicit in tuple(m.axis_types) for m in typed + [jax.sharding.get_abstract_mesh()]
         if not m.empty):
    return mesh
  return mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def sequence_parallel_attention(query: Array, key: Array, value: Array, *, mesh,
                                seq_axis: str = "seq", strategy: str = "striped",
                                is_causal: bool = True, segment_ids=None,
                                scale: float | None = None) -> Array:
  """Softmax attention of global arrays with the sequence split over the mesh axis `seq_axis`.

  out = softmax(s·QKᵀ, masked) V, exactly as `big_attn.ops.dot_product_attention`, computed by
  - "ring": `ring_attention` (Liu et al. 2023) on contiguous shards;
  - "striped": `striped_attention` (Brandon et al. 2023): the tokens are laid out in striped
    order for the computation (shard j holds tokens j, j+P, ...) and the output is returned in
    natural order, so causal work is balanced over the devices;
  - "all_gather": each device gathers all keys/values and attends its local queries.

  Layout: the sequence dimension is sharded over `seq_axis`; the batch over the mesh axes
  "data" and "fsdp" that exist in `mesh`; the heads over "tensor" if it exists; every other
  mesh axis replicates. The output has the same layout. For "striped", the striped order is a
  sharding of the sequence viewed as `[seq / P, P]` with the P dimension over `seq_axis`, so no
  separate permutation is materialised (in a model, `stripe` the tokens once at the input and
  call `striped_attention` inside `jax.shard_map` instead).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`, natural token order.
    key: `[batch, kv_len, num_kv_heads, head_dim]` (GQA: num_heads % num_kv_heads == 0).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mesh: a `jax.sharding.Mesh` with the axis `seq_axis` (Auto or Explicit axes).
    seq_axis: the mesh axis that splits the sequence; both lengths must be divisible by it.
    strategy: "ring", "striped" or "all_gather".
    is_causal: query i attends keys j <= i (needs q_len == kv_len).
    segment_ids: `[batch, seq]` ints or a pair `(q_segment_ids, kv_segment_ids)`.
    scale: logit scale; `1/sqrt(head_dim)` when None.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype, natural order.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if seq_axis not in mesh.axis_names:
    raise ValueError(
        f"seq_axis {seq_axis!r} is not an axis of the mesh (axes {tuple(mesh.axis_names)})")
  dims = common.check_qkv(query, key, value)
  segments = common.normalize_segment_ids(segment_ids, dims)
  if is_causal and dims.q_len != dims.kv_len:
    raise ValueError(
        f"is_causal=True needs q_len == kv_len, got {dims.q_len} and {dims.kv_len}")
  num_shards = mesh.shape[seq_axis]
  for name, length in (("query", dims.q_len), ("key/value", dims.kv_len)):
    if length % num_shards:
      raise ValueError(
          f"{name} sequence length {length} is not divisible by the size {num_shards} of "
          f"mesh axis {seq_axis!r}")
  batch_axes, head_axis = _layout(mesh, seq_axis, dims)
  return _sharded_attention(
      query, key, value, segments, mesh=_working_mesh(mesh, query, key, value),
      seq_axis=seq_axis, strategy=strategy, is_causal=is_causal,
      scale=common.default_scale(dims.head_dim, scale), batch_axes=batch_axes,
      head_axis=head_axis)


# Jitted so that a call outside `jax.jit` compiles the `shard_map` once instead of running its
# body op by op; under an outer `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "strategy", "is_causal",
                                             "scale", "batch_axes", "head_axis"))
def _sharded_attention(query, key, value, segments, *, mesh, seq_axis, strategy, is_causal,
                       scale, batch_axes, head_axis):
  """`sequence_parallel_attention` after its checks: the shard_map and the layout around it."""
  dims = common.check_qkv(query, key, value)
  num_shards = mesh.shape[seq_axis]

  # The sequence viewed as [shard, token] (contiguous) or [token, shard] (striped); the shard
  # dimension is the one split over seq_axis.
  shard_dim = 2 if strategy == "striped" else 1
  def split(x, with_heads=True):
    b, length = x.shape[:2]
    pair = (length // num_shards, num_shards) if shard_dim == 2 else (num_shards,
                                                                       length // num_shards)
    rest = [head_axis, None] if with_heads else []
    spec = [batch_axes, None, None] + rest
    spec[shard_dim] = seq_axis
    spec = P(*spec)
    # Contiguous over seq_axis first: the gradient's way back to the input's layout.
    x = compat.constrain(x, NamedSharding(mesh, P(batch_axes, seq_axis, *rest)))
    x = compat.reshape_with_sharding(x, (b,) + pair + x.shape[2:], NamedSharding(mesh, spec))
    return x, spec

  local = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])
  (q, q_spec), (k, kv_spec), (v, _) = split(query), split(key), split(value)
  q_seg = kv_seg = seg_spec = None
  if segments is not None:
    (q_seg, seg_spec), (kv_seg, _) = (split(s, with_heads=False) for s in segments)

  def per_shard(q, k, v, q_seg, kv_seg):
    out_shape = q.shape[:3] + (q.shape[3], v.shape[4])
    q, k, v = local(q), local(k), local(v)
    q_seg, kv_seg = (None if s is None else local(s) for s in (q_seg, kv_seg))
    segs = None if q_seg is None else (q_seg, kv_seg)
    if strategy == "all_gather":
      out = _all_gather_attention(q, k, v, q_seg, kv_seg, axis_name=seq_axis,
                                  is_causal=is_causal, scale=scale)
    else:
      attend = striped_attention if strategy == "striped" else ring_attention
      out = attend(q, k, v, axis_name=seq_axis, is_causal=is_causal, segment_ids=segs,
                   scale=scale)
    return out.reshape(out_shape)

  out = compat.shard_map(per_shard, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec)(q, k, v, q_seg, kv_seg)
  out_sharding = NamedSharding(mesh, P(batch_axes, seq_axis, head_axis, None))
  return compat.reshape_with_sharding(
      out, (dims.batch, dims.q_len, dims.num_heads, dims.value_dim), out_sharding)


__all__ = ["BlockImpl", "STRATEGIES", "block_plan", "ring_attention", "sequence_parallel_attention",
           "stripe", "striped_attention", "unstripe"]
