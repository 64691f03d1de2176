"""Head-parallel sequence parallelism for ops whose heads are independent (DeepSpeed-Ulysses:
Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models").

Some causal ops choose what each query sees from its whole row (a top-k over all its keys, a
partition of the whole sequence into blocks, quantisation blocks cut from the whole sequence),
so key blocks cannot be merged shard by shard. When each head's output depends only on that
head's queries, keys, values and weights (`OpSpec.head_args`), the devices can split the heads
instead: an all-to-all turns the local `[batch, seq / P, heads, d]` shard into `[batch, seq,
heads / P, d]`, each device runs the op itself on the whole sequence of its heads, and a second
all-to-all returns the output to the sequence split. The result is the op's, exactly, for any
token order of the shards (a striped order is undone for the op and redone after it).

Memory per device is that of the op on one P-th of the heads; the heads (query heads, and the
key/value heads or, with GQA when they are fewer than P per device, their copies per query head)
must divide by P.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_attn.ops import common
from big_attn.ops import registry
from big_attn.parallel.striped import stripe, unstripe

Array = jax.Array


def _check_heads(op: str, num_heads: int, num_kv_heads: int, num_shards: int) -> bool:
  """Whether the key/value heads must be repeated per query head to split over `num_shards`
  devices; a `ValueError` naming the op when the query heads do not divide."""
  if num_heads % num_shards:
    raise ValueError(
        f"attention op {op!r} runs sequence-parallel by splitting its heads over the "
        f"{num_shards} devices of the sequence axis; its {num_heads} heads are not divisible "
        f"by {num_shards}")
  return num_kv_heads % num_shards != 0


def head_parallel_attention(query: Array, key: Array, value: Array, *, op: str, axis_name,
                            striped: bool = False, is_causal: bool = True,
                            segment_ids: Array | None = None, **op_args) -> Array:
  """Op `op` (registered with `head_args`) on this device's sequence shard, inside
  `jax.shard_map` over `axis_name`, exactly as on the whole sequence.

  Args:
    query, key, value: the local `[batch, seq / P, heads | kv_heads, dim]` shards, in natural
      token order, or in striped order (`striped=True`: shard j holds tokens j, j + P, ...).
    op: the op's registry name.
    axis_name: the mesh axis the sequence is split over.
    striped: the shards hold the striped token order.
    is_causal: the op's causal form.
    segment_ids: the local `[batch, seq / P]` ids of packed rows, or None (a mask of the
      whole rows for an op that takes no `segment_ids`).
    **op_args: the op's arguments; those named in its `head_args` are split with the heads
      (per-token ones as local shards laid out as the query, weights whole with the heads
      leading), the others are passed unchanged.

  Returns:
    the local `[batch, seq / P, heads, value_dim]` output shard, in the inputs' token order.
  """
  spec = registry.spec(op)
  if spec.head_args is None:
    raise ValueError(f"attention op {op!r} has no independent heads (no head_args in its "
                     "registration): it cannot run head-parallel")
  if op_args.get("rng") is not None:
    raise ValueError(
        f"attention op {op!r} draws its samples with keys of the global head and batch indices "
        "(rng): its sampled form does not run with the heads split over devices; its "
        "deterministic form (rng=None) does")
  num_shards = lax.axis_size(axis_name)
  num_heads, num_kv_heads = query.shape[2], key.shape[2]
  repeat_kv = _check_heads(op, num_heads, num_kv_heads, num_shards)
  groups = num_heads // num_kv_heads
  index = lax.axis_index(axis_name)

  def as_query_heads(x, axis):
    return jnp.repeat(x, groups, axis=axis) if repeat_kv else x

  def whole_sequence(x):
    """`[batch, seq / P, heads, ...]` → `[batch, seq, heads / P, ...]` in natural order."""
    x = lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
    return unstripe(x, num_shards) if striped else x

  def local_heads(w):
    """This device's slice of a weight `[heads, ...]`."""
    size = w.shape[0] // num_shards
    return lax.dynamic_slice_in_dim(w, index * size, size, axis=0)

  args = dict(op_args)
  for name, arg in spec.head_args.items():
    x = args.get(name)
    if x is None:
      continue
    if arg.kv:
      x = as_query_heads(x, 2 if arg.per_token else 0)
    args[name] = whole_sequence(x) if arg.per_token else local_heads(x)
  query, key, value = (whole_sequence(query), whole_sequence(as_query_heads(key, 2)),
                       whole_sequence(as_query_heads(value, 2)))
  if segment_ids is not None:
    segment_ids = lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    segment_ids = unstripe(segment_ids, num_shards) if striped else segment_ids
    if spec.segment_ids:
      args["segment_ids"] = segment_ids
    else:  # folded into the mask, as `Attention.attend` does on one device
      args["mask"] = common.make_mask(common.check_qkv(query, key, value),
                                      segment_ids=segment_ids)
  out = spec.fn(query, key, value, is_causal=is_causal, **args)
  out = stripe(out, num_shards) if striped else out
  return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
