"""Sequence parallelism of cascaded group attention (EfficientViT: Memory Efficient Vision
Transformer with Cascaded Group Attention).

Head j's queries, keys and values add head j−1's output at the same token, so the heads run one
after the other, but each head is softmax attention over the whole sequence of token-wise
inputs: with the sequence split over P devices, every head is one pass of the ring (or striped
ring, or all-gather) of `parallel.shard_attention`, and the previous head's output is already on
the device of its token. The depthwise query convolution needs the neighbouring tokens, which
may sit on other shards: each head's queries `[batch, seq / P, head_dim]` are all-gathered,
convolved in natural token order and the local shard taken back. Exact for every strategy.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax import lax

from big_attn.ops import efficient
from big_attn.parallel.striped import stripe, unstripe

Array = jax.Array


def cascade_shard_attention(query: Array, key: Array, value: Array, *, axis_name,
                            shard_attend: Callable, striped: bool = False,
                            is_causal: bool = True, segment_ids: Array | None = None,
                            scale: float | None = None, cascade_query=None, cascade_key=None,
                            cascade_value=None, query_conv=None, grid=None,
                            kernel_size=None) -> Array:
  """`cascaded_group_attention` on this device's sequence shard, inside `jax.shard_map` over
  `axis_name`, exactly as on the whole sequence.

  Args:
    query, key, value: the local `[batch, seq / P, heads | kv_heads, dim]` shards, in the
      strategy's token order (striped with `striped=True`).
    axis_name: the mesh axis the sequence is split over.
    shard_attend: the strategy's per-shard softmax attention, `parallel.shard_attention` with
      `axis_name` and `strategy` bound.
    striped: the shards hold the striped token order.
    is_causal, scale, cascade_query, cascade_key, cascade_value, query_conv, grid,
      kernel_size: as `cascaded_group_attention` (weights whole; `grid` of the whole image).
    segment_ids: the local `[batch, seq / P]` ids of packed rows, or None; they mask the
      attention, not the query convolution (as a mask on one device does).

  Returns:
    the local `[batch, seq / P, heads, value_dim]` output shard.
  """
  num_shards = lax.axis_size(axis_name)
  length = query.shape[1]
  whole = lambda x: jax.ShapeDtypeStruct(  # noqa: E731
      (x.shape[0], x.shape[1] * num_shards) + x.shape[2:], x.dtype)
  spatial = efficient.check_cascade(whole(query), whole(key), whole(value), cascade_query,
                                    cascade_key, cascade_value, query_conv, grid=grid,
                                    kernel_size=kernel_size)
  segments = None if segment_ids is None else (segment_ids, segment_ids)

  def attend(j, q, k, v):
    del j
    return shard_attend(q[:, :, None], k[:, :, None], v[:, :, None], is_causal=is_causal,
                        segment_ids=segments, scale=scale)[:, :, 0]

  def convolve(j, q):
    full = lax.all_gather(q, axis_name, axis=1, tiled=True)
    full = unstripe(full, num_shards) if striped else full
    full = efficient.convolve_query(j, full, query_conv=query_conv, spatial=spatial,
                                    is_causal=is_causal)
    full = stripe(full, num_shards) if striped else full
    return lax.dynamic_slice_in_dim(full, lax.axis_index(axis_name) * length, length, axis=1)

  return efficient.cascade_heads(query, key, value, cascade_query, cascade_key, cascade_value,
                                 attend=attend,
                                 convolve=None if query_conv is None else convolve)
