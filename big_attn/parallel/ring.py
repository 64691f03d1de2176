"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context"): exact softmax attention over a sequence split across devices.

Device i of a ring of P holds queries, keys and values of shard i. At ring step s it attends its
queries to the key/value block of shard (i - s) mod P, while the `ppermute` that brings the next
block (i -> i+1) is already in flight; block results `(O_s, lse_s)` are merged in float32 through
the log-sum-exp:

    lse = log(e^lse_a + e^lse_b),   O = e^(lse_a - lse) O_a + e^(lse_b - lse) O_b.

The backward pass (a `custom_vjp`) runs the ring again: each block's gradient is recomputed from
the saved global lse (`blockwise`), dQ stays local and the dK/dV accumulators travel around the
ring with their K/V block, so every device holds O(local sequence) activations, never the global
sequence or a global score matrix. Which blocks are computed, skipped or causally masked is
`blockwise.block_plan`; the same loop runs the striped schedule (`striped.py`).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from big_attn.ops import common
from big_attn.parallel import blockwise

Array = jax.Array


class RingConfig(NamedTuple):
  """Static description of one ring computation (hashable: a `custom_vjp` nondiff argument)."""
  axis_name: Any
  num_shards: int
  schedule: str
  is_causal: bool
  scale: float
  block: blockwise.BlockImpl


def axis_size(axis_name, caller: str) -> int:
  """The size of a bound mesh axis; a `ValueError` that says so when it is not bound."""
  try:
    return lax.axis_size(axis_name)
  except (NameError, ValueError):  # "unbound axis name" (the type differs across versions)
    raise ValueError(
        f"{caller}: axis_name {axis_name!r} is not a bound mesh axis; call it inside "
        "jax.shard_map over a mesh that has this axis (the axis that splits the sequence)"
    ) from None


def _shift(tree, cfg: RingConfig):
  """Sends every leaf of `tree` one step around the ring (device i -> i + 1)."""
  perm = [(j, (j + 1) % cfg.num_shards) for j in range(cfg.num_shards)]
  return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _ring_loop(cfg: RingConfig, first, step, kv):
  """Runs the ring: `first(kv)` on the local block, then `step(s, local, travelling, kv)`.

  At step s the device holds `kv` of shard (i - s) mod P; the ppermute bringing step s+1's
  block is issued before step s's compute, and none follows the last step. `travelling` (the
  dK/dV accumulators of the backward pass, `()` in the forward pass) is sent along with its
  block after each step's compute, so it is back on its owner when the loop ends.
  """
  if cfg.num_shards == 1:
    return first(kv)
  incoming = _shift(kv, cfg)
  local, travelling = first(kv)
  travelling, kv = _shift(travelling, cfg), incoming

  def body(carry, s):
    local, travelling, kv = carry
    incoming = _shift(kv, cfg)
    local, travelling = step(s, local, travelling, kv)
    return (local, _shift(travelling, cfg), incoming), None

  if cfg.num_shards > 2:
    (local, travelling, kv), _ = lax.scan(
        body, (local, travelling, kv), jnp.arange(1, cfg.num_shards - 1))
  local, travelling = step(cfg.num_shards - 1, local, travelling, kv)
  return local, _shift(travelling, cfg)


def _plan(cfg: RingConfig, s):
  """The block plan of ring step `s` on this device (queries of shard i, keys of i - s)."""
  i = lax.axis_index(cfg.axis_name)
  return blockwise.block_plan(cfg.schedule, cfg.is_causal, i, (i - s) % cfg.num_shards)


def _diagonal_offset(cfg: RingConfig):
  """The causal offset of the local (diagonal) block: its plan is static and never SKIP."""
  kind, offset = blockwise.block_plan(cfg.schedule, cfg.is_causal, 0, 0)
  return offset if kind == blockwise.TRIANGLE else None


def _off_diagonal_kinds(cfg: RingConfig) -> tuple[int, ...]:
  """The block kinds of steps s > 0 (the plan depends only on the order of the two shards)."""
  return tuple(sorted({blockwise.block_plan(cfg.schedule, cfg.is_causal, 1, 0)[0],
                       blockwise.block_plan(cfg.schedule, cfg.is_causal, 0, 1)[0]}))


def _by_kind(cfg: RingConfig, kind, offset, compute, carry):
  """Updates `carry` with `compute(causal_offset, carry)` as the block kind says.

  A concrete kind calls its branch directly; a traced one selects among the kinds the schedule
  can produce with `lax.switch`, so a skipped block costs nothing (it is not computed and then
  masked).
  """
  branches = {blockwise.SKIP: lambda c: c,
              blockwise.FULL: lambda c: compute(None, c),
              blockwise.TRIANGLE: lambda c: compute(offset, c)}
  if isinstance(kind, int):
    return branches[kind](carry)
  kinds = _off_diagonal_kinds(cfg)
  index = jnp.argmax(jnp.asarray(kinds) == kind)
  return lax.switch(index, [branches[k] for k in kinds], carry)


def _merge(acc, block):
  """Merges two normalised partial results `(out [b,t,n,d], lse [b,n,t])` in float32."""
  (out_a, lse_a), (out_b, lse_b) = acc, block
  top = jnp.maximum(lse_a, lse_b)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)  # exp(-inf) = 0 for empty rows
  total = w_a + w_b
  lse = jnp.where(total > 0.0, top + jnp.log(jnp.where(total > 0.0, total, 1.0)), -jnp.inf)
  safe = jnp.where(total > 0.0, total, 1.0)
  w_a = jnp.transpose(w_a / safe, (0, 2, 1))[..., None]
  w_b = jnp.transpose(w_b / safe, (0, 2, 1))[..., None]
  return out_a * w_a + out_b * w_b, lse


def ring_reduce(cfg: RingConfig, contribution, combine, kv):
  """`combine` over the ring of `contribution(causal_offset, kv)`, one per visible K/V block.

  `kv` is the local tuple of per-key arrays that travels around the ring; blocks the plan
  skips contribute nothing (they are not computed).
  """
  def first(kv):
    return contribution(_diagonal_offset(cfg), kv), ()

  def step(s, acc, travelling, kv):
    kind, offset = _plan(cfg, s)
    return _by_kind(cfg, kind, offset, lambda o, c: combine(c, contribution(o, kv)),
                    acc), travelling

  return _ring_loop(cfg, first, step, kv)[0]


def shard_positions(cfg: RingConfig, shard, length: int):
  """Int32 global positions `[length]` of the tokens of shard `shard` in the schedule's token
  order: i·t + a (contiguous shards) or a·P + i (striped)."""
  local = jnp.arange(length, dtype=jnp.int32)
  shard = jnp.asarray(shard, jnp.int32)
  if cfg.schedule == "striped":
    return local * cfg.num_shards + shard
  return shard * length + local


def ring_gradients(cfg: RingConfig, grads, kv):
  """Float32 `(dq, dk, dv)` summed over the ring from `grads(causal_offset, kv) -> (dq, dk,
  dv)` of each visible block; dq (an array or a tree of local gradients) stays local, dk/dv
  travel with their block and end on its owner."""
  def first(kv):
    dq, dk, dv = grads(_diagonal_offset(cfg), kv)
    return dq, (dk, dv)

  def step(s, dq, dkv, kv):
    def accumulate(offset, carry):
      (dq, (dk, dv)), (dq_b, dk_b, dv_b) = carry, grads(offset, kv)
      return jax.tree.map(jnp.add, dq, dq_b), (dk + dk_b, dv + dv_b)
    kind, offset = _plan(cfg, s)
    return _by_kind(cfg, kind, offset, accumulate, (dq, dkv))

  dq, (dk, dv) = _ring_loop(cfg, first, step, kv)
  return dq, dk, dv


def _forward(cfg: RingConfig, q, k, v, q_seg, kv_seg):
  def attend(offset, kv):
    k, v, kv_seg = kv
    return cfg.block.forward(q, k, v, scale=cfg.scale, causal_offset=offset,
                             q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  out, lse = ring_reduce(cfg, attend, _merge, (k, v, kv_seg))
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_core(cfg: RingConfig, q, k, v, q_seg, kv_seg):
  return _forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _ring_core_fwd(cfg, q, k, v, q_seg, kv_seg):
  out, lse = _forward(cfg, q, k, v, q_seg, kv_seg)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_core_bwd(cfg, residuals, dout):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  delta = jnp.einsum("btnd,btnd->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))

  def grads(offset, kv):
    k, v, kv_seg = kv
    return cfg.block.backward(q, k, v, dout, lse, delta, scale=cfg.scale, causal_offset=offset,
                              q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  dq, dk, dv = ring_gradients(cfg, grads, (k, v, kv_seg))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def ring_config(schedule: str, query: Array, key: Array, value: Array, *, axis_name,
                is_causal: bool, segment_ids, scale, block_impl, caller: str):
  """Checks the arguments of a per-shard ring function: `(RingConfig, q_seg, kv_seg)`."""
  dims = common.check_qkv(query, key, value)
  if is_causal and dims.q_len != dims.kv_len:
    raise ValueError(
        f"{caller}: is_causal=True needs local query and key/value shards of equal length, "
        f"got {dims.q_len} and {dims.kv_len}")
  num_shards = axis_size(axis_name, caller)
  segments = common.normalize_segment_ids(segment_ids, dims)
  q_seg, kv_seg = (None, None) if segments is None else segments
  cfg = RingConfig(axis_name, num_shards, schedule, bool(is_causal),
                   common.default_scale(dims.head_dim, scale),
                   blockwise.get_block_impl(block_impl, query, key, value, is_causal))
  return cfg, q_seg, kv_seg


def attention_over_ring(schedule: str, query: Array, key: Array, value: Array, *, axis_name,
                        is_causal: bool, segment_ids, scale, block_impl, caller: str) -> Array:
  """Checks the arguments of `ring_attention` / `striped_attention` and runs the ring."""
  cfg, q_seg, kv_seg = ring_config(schedule, query, key, value, axis_name=axis_name,
                                   is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                                   block_impl=block_impl, caller=caller)
  return _ring_core(cfg, query, key, value, q_seg, kv_seg)


def ring_attention(query: Array, key: Array, value: Array, *, axis_name, is_causal: bool = False,
                   segment_ids=None, scale: float | None = None, block_impl=None) -> Array:
  """Ring attention (Liu et al. 2023) on this device's sequence shard, inside `jax.shard_map`.

  out = softmax(s·QKᵀ, masked) V over the whole sequence, computed one K/V block per ring step
  and merged through the log-sum-exp; shard i of the mesh axis `axis_name` holds the contiguous
  tokens [i·t, (i+1)·t). With `is_causal`, blocks entirely in the future are skipped. Memory per
  device is O(local sequence) in the forward and backward passes.

  Args:
    query: local `[batch, t, num_heads, head_dim]`.
    key: local `[batch, s, num_kv_heads, head_dim]` (GQA: num_heads % num_kv_heads == 0).
    value: local `[batch, s, num_kv_heads, value_dim]`.
    axis_name: the mesh axis (or tuple of axes) that splits the sequence.
    is_causal: global query position p attends key positions <= p (needs t == s).
    segment_ids: local `[batch, t]` ints or a pair `(q_segment_ids, kv_segment_ids)`; the
      key/value ids travel around the ring with their block.
    scale: logit scale; `1/sqrt(head_dim)` when None.
    block_impl: per-block compute: "xla" (blockwise XLA), "pallas" (the Pallas flash kernels;
      on CPU they run in the Pallas interpreter, for tests only), None ("pallas" on GPU/TPU
      when the kernels support the shapes, "xla" otherwise and always on CPU), or a
      `blockwise.BlockImpl`.

  Returns:
    local `[batch, t, num_heads, value_dim]` in the query's dtype.
  """
  return attention_over_ring("ring", query, key, value, axis_name=axis_name,
                             is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                             block_impl=block_impl, caller="ring_attention")
