"""Striped attention (Brandon et al. 2023, "Striped Attention: Faster Ring Attention for Causal
Transformers"): ring attention over a striped token order, so causal work is balanced.

With contiguous shards, causal ring attention leaves device i idle for i of its P steps (blocks
in the future are skipped) while the last device computes at every step. Striping sends token t
to shard t mod P: shard j holds tokens j, j+P, j+2P, .... Then key index b of shard j is visible
to query index a of shard i iff

    b·P + j <= a·P + i   <=>   b < a, or b == a and j <= i,

so every block is a triangle (with or without its diagonal) and every device does about half a
block of work at every ring step. Tokens are permuted once (`stripe`) before the model's
attention layers and the outputs un-permuted once (`unstripe`).
"""
from __future__ import annotations

import jax

from big_attn.parallel import ring

Array = jax.Array


def _check_stripe_args(x, num_shards, axis: int) -> tuple[int, int]:
  if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} is out of range for an array of rank {x.ndim}")
  axis %= x.ndim
  if x.shape[axis] % num_shards:
    raise ValueError(
        f"the sequence length {x.shape[axis]} (axis {axis}) is not divisible by "
        f"num_shards={num_shards}")
  return axis, x.shape[axis] // num_shards


def stripe(x: Array, num_shards: int, axis: int = 1) -> Array:
  """Striped token order: token t goes to shard t mod `num_shards`.

  After striping, splitting `axis` into `num_shards` contiguous shards gives shard j the tokens
  j, j + P, j + 2P, ... (in that order). `unstripe` is the inverse.
  """
  axis, per_shard = _check_stripe_args(x, num_shards, axis)
  shape = x.shape
  split = x.reshape(shape[:axis] + (per_shard, num_shards) + shape[axis + 1:])
  return split.swapaxes(axis, axis + 1).reshape(shape)


def unstripe(x: Array, num_shards: int, axis: int = 1) -> Array:
  """The inverse of `stripe`: striped token order back to natural order."""
  axis, per_shard = _check_stripe_args(x, num_shards, axis)
  shape = x.shape
  split = x.reshape(shape[:axis] + (num_shards, per_shard) + shape[axis + 1:])
  return split.swapaxes(axis, axis + 1).reshape(shape)


def striped_attention(query: Array, key: Array, value: Array, *, axis_name,
                      is_causal: bool = False, segment_ids=None, scale: float | None = None,
                      block_impl=None) -> Array:
  """Striped attention (Brandon et al. 2023) on this device's shard, inside `jax.shard_map`.

  Same as `ring.ring_attention` except that the sequence is in striped order (`stripe`): shard
  i of `axis_name` holds tokens i, i+P, i+2P, .... For causal attention, block (i, j) admits key
  index b for query index a iff b < a, or b == a and j <= i, so all devices do nearly equal
  work at every ring step. Arguments and result as `ring_attention`, with every per-token input
  (queries, keys, values, segment ids) and the output in striped order.
  """
  return ring.attention_over_ring("striped", query, key, value, axis_name=axis_name,
                                  is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                                  block_impl=block_impl, caller="striped_attention")
