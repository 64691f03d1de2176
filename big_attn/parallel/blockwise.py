"""Per-block attention for the ring schedules: one query shard against one key/value shard.

A ring step attends the local queries to the key/value block currently held and returns the
block's output normalised *within the block* together with its log-sum-exp; the ring merges
blocks through the lse (FlashAttention's online softmax, one block per device step). The
backward pass of a block takes the *global* lse and `delta = rowsum(dO ∘ O)` of the finished
forward pass, so each block's gradient is exact on its own and blocks can be visited in any
order (FlashAttention-2, Dao 2023):

    P = exp(s·QKᵀ - lse),  dV = PᵀdO,  dS = P ∘ (dO Vᵀ - delta),  dQ = s·dS K,  dK = s·dSᵀQ.

Which blocks a device computes, and with which causal rule, is `block_plan`: the ring kernels
and the load-balance report (`experiments/bench_sequence_parallel.py`) both use it.

The block interface (`BlockImpl`) is what a fused kernel implements to plug in; `XLA` (below)
and `PALLAS` (the flash kernels of `pallas_kernels.flash_attention`, GPU Triton or TPU Mosaic;
on CPU the GPU kernel in the Pallas interpreter, which only tests should do) implement it:
  forward(q, k, v, *, scale, causal_offset, q_segment_ids, kv_segment_ids) -> (out, lse)
  backward(q, k, v, dout, lse, delta, *, scale, causal_offset, q_segment_ids,
           kv_segment_ids) -> (dq, dk, dv)
with `q` `[b, t, n, d]`, `k`/`v` `[b, s, k, d|dv]` (n % k == 0, never repeated), `out` float32
`[b, t, n, dv]`, `lse` and `delta` float32 `[b, n, t]` (lse is -inf for a row with no key),
gradients float32 in the shapes of q, k, v. `causal_offset` None means no causal rule; an int
(or int32 scalar) `o` admits key index `j` for query index `i` iff `j <= i + o` (local indices,
t == s, o in {0, -1}: the two diagonals the ring and striped schedules produce).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import common
from big_attn.ops import softmax

Array = jax.Array

# Block kinds of `block_plan`.
SKIP, FULL, TRIANGLE = 0, 1, 2
KIND_NAMES = {SKIP: "skip", FULL: "full", TRIANGLE: "triangle"}
SCHEDULES = ("ring", "striped")

# A triangular (causal) block is cut into this many query chunks; query chunk c only meets the
# key prefix it can see, so about (C + 1) / 2C of the full block is computed.
TRIANGLE_CHUNKS = 4


def block_plan(schedule: str, is_causal: bool, q_shard, kv_shard):
  """How the queries of shard `q_shard` meet the keys of shard `kv_shard`: `(kind, offset)`.

  `kind` is SKIP (nothing visible), FULL (every key visible) or TRIANGLE (key index j visible
  to query index i iff j <= i + offset). Shard indices may be Python/NumPy ints (the result is
  then concrete) or traced scalars (inside the ring); the plan depends only on the order of the
  two indices. `offset` only matters for TRIANGLE blocks (it is None without `is_causal`).

  - "ring" (Ring Attention, Liu et al. 2023), contiguous shards: blocks below the diagonal are
    FULL, the diagonal block is causal (offset 0), blocks above it are skipped.
  - "striped" (Striped Attention, Brandon et al. 2023), shard j holds tokens j, j+P, j+2P, ...:
    key index b of shard j is visible to query index a of shard i iff b < a, or b == a and
    j <= i, so every block is a TRIANGLE with offset 0 (j <= i) or -1 (j > i).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if not is_causal:
    return FULL, None
  concrete = all(isinstance(x, (int, np.integer)) for x in (q_shard, kv_shard))
  if schedule == "ring":
    if concrete:
      kind = FULL if kv_shard < q_shard else TRIANGLE if kv_shard == q_shard else SKIP
    else:
      kind = jnp.where(kv_shard < q_shard, FULL, jnp.where(kv_shard == q_shard, TRIANGLE, SKIP))
    return kind, 0
  if concrete:
    return TRIANGLE, 0 if kv_shard <= q_shard else -1
  return TRIANGLE, jnp.where(kv_shard <= q_shard, 0, -1).astype(jnp.int32)


def triangle_chunks(length: int) -> list[tuple[int, int]]:
  """Query chunks `[start, stop)` of a causal block of `length` tokens (static)."""
  num = min(TRIANGLE_CHUNKS, length)
  bounds = [round(c * length / num) for c in range(num + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def block_score_count(kind: int, q_len: int, kv_len: int) -> int:
  """Scores `q·k` the XLA block implementation computes for a block of this kind."""
  if kind == SKIP:
    return 0
  if kind == FULL:
    return q_len * kv_len
  return sum((stop - start) * stop for start, stop in triangle_chunks(q_len))


def visible_pair_count(kind: int, offset, length: int) -> int:
  """(query, key) pairs the causal rule admits in a block: the work of an ideal kernel."""
  if kind == SKIP:
    return 0
  if kind == FULL:
    return length * length
  return length * (length + 1) // 2 + int(offset) * length


class BlockImpl(NamedTuple):
  """A per-block attention implementation (see the module docstring for the contract)."""
  name: str
  forward: Callable
  backward: Callable


def _block_mask(dims: common.Dims, causal_offset, q_start: int, q_segment_ids, kv_segment_ids):
  """Grouped boolean mask `[b|1, 1, 1, t, s]` for a (piece of a) block, or None."""
  mask = None
  if q_segment_ids is not None:
    mask = common.grouped(
        common.make_mask(dims, segment_ids=(q_segment_ids, kv_segment_ids)), dims)
  if causal_offset is not None:
    q_pos = q_start + jnp.arange(dims.q_len)[:, None]
    k_pos = jnp.arange(dims.kv_len)[None, :]
    causal = (k_pos <= q_pos + causal_offset)[None, None, None]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  return mask


def _heads_last(x: Array, dims: common.Dims) -> Array:
  """Grouped `[b, k, g, t]` -> `[b, n, t]`."""
  return x.reshape(dims.batch, dims.num_heads, dims.q_len)


def _grouped_rows(x: Array, dims: common.Dims) -> Array:
  """`[b, n, t]` -> grouped `[b, k, g, t]`."""
  return x.reshape(dims.batch, dims.num_kv_heads, dims.groups, dims.q_len)


def _piece_forward(q, k, v, mask, scale):
  dims = common.check_qkv(q, k, v)
  logits = common.attention_logits(q, k, dims, scale)  # [b, k, g, t, s] float32
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  unnormalized = jnp.exp(logits - row_max[..., None])  # masked entries: exp(-inf) = 0
  denom = jnp.sum(unnormalized, axis=-1)
  probs = unnormalized / jnp.where(denom == 0.0, 1.0, denom)[..., None]
  out = common.weighted_values(probs, v, dims)
  lse = jnp.where(denom > 0.0, row_max + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), -jnp.inf)
  return out, _heads_last(lse, dims)


def _piece_backward(q, k, v, dout, lse, delta, mask, scale):
  dims = common.check_qkv(q, k, v)
  logits = common.attention_logits(q, k, dims, scale)
  lse = _grouped_rows(lse, dims)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  dout_g = common.group_query(dout, dims.num_kv_heads)  # [b, t, k, g, dv]
  q_g = common.group_query(q, dims.num_kv_heads)
  dv = jnp.einsum("bkgts,btkgd->bskd", probs.astype(dout.dtype), dout_g,
                  preferred_element_type=jnp.float32)
  dprobs = jnp.einsum("btkgd,bskd->bkgts", dout_g, v, preferred_element_type=jnp.float32)
  dlogits = (probs * (dprobs - _grouped_rows(delta, dims)[..., None]) * scale).astype(q.dtype)
  dq = jnp.einsum("bkgts,bskd->btkgd", dlogits, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgts,btkgd->bskd", dlogits, q_g, preferred_element_type=jnp.float32)
  return dq.reshape(q.shape), dk, dv


def _rows(x, start, stop, axis):
  return None if x is None else jax.lax.slice_in_dim(x, start, stop, axis=axis)


def _check_square(dims: common.Dims) -> None:
  if dims.q_len != dims.kv_len:
    raise ValueError(
        "a causal block (causal_offset set) needs as many queries as keys, got "
        f"{dims.q_len} and {dims.kv_len}")


def xla_block_forward(query, key, value, *, scale, causal_offset=None, q_segment_ids=None,
                      kv_segment_ids=None):
  """Block forward in XLA: `(out, lse)`; causal blocks only compute each chunk's key prefix."""
  dims = common.check_qkv(query, key, value)
  if causal_offset is None:
    mask = _block_mask(dims, None, 0, q_segment_ids, kv_segment_ids)
    return _piece_forward(query, key, value, mask, scale)
  _check_square(dims)
  outs, lses = [], []
  for start, stop in triangle_chunks(dims.q_len):
    q = _rows(query, start, stop, 1)
    k, v, kv_seg = (_rows(x, 0, stop, 1) for x in (key, value, kv_segment_ids))
    mask = _block_mask(common.check_qkv(q, k, v), causal_offset, start,
                       _rows(q_segment_ids, start, stop, 1), kv_seg)
    out, lse = _piece_forward(q, k, v, mask, scale)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def xla_block_backward(query, key, value, dout, lse, delta, *, scale, causal_offset=None,
                       q_segment_ids=None, kv_segment_ids=None):
  """Block backward in XLA from the global `lse` and `delta`: float32 `(dq, dk, dv)`."""
  dims = common.check_qkv(query, key, value)
  if causal_offset is None:
    mask = _block_mask(dims, None, 0, q_segment_ids, kv_segment_ids)
    return _piece_backward(query, key, value, dout, lse, delta, mask, scale)
  _check_square(dims)
  dqs = []
  dk = jnp.zeros(key.shape, jnp.float32)
  dv = jnp.zeros(value.shape, jnp.float32)
  for start, stop in triangle_chunks(dims.q_len):
    q, do = (_rows(x, start, stop, 1) for x in (query, dout))
    k, v, kv_seg = (_rows(x, 0, stop, 1) for x in (key, value, kv_segment_ids))
    mask = _block_mask(common.check_qkv(q, k, v), causal_offset, start,
                       _rows(q_segment_ids, start, stop, 1), kv_seg)
    dq_c, dk_c, dv_c = _piece_backward(q, k, v, do, _rows(lse, start, stop, 2),
                                       _rows(delta, start, stop, 2), mask, scale)
    dqs.append(dq_c)
    dk = dk.at[:, :stop].add(dk_c)
    dv = dv.at[:, :stop].add(dv_c)
  return jnp.concatenate(dqs, axis=1), dk, dv


XLA = BlockImpl("xla", xla_block_forward, xla_block_backward)


def _with_static_offset(fn, causal_offset):
  """`fn(offset)` with a Python-int offset, as the Pallas kernels need (they skip blocks by it).

  A traced offset (the striped schedule's `jnp.where(j <= i, 0, -1)`) selects between the two
  compiled kernels with `lax.cond`; it must be 0 or -1, the offsets `block_plan` produces.
  """
  if causal_offset is None or isinstance(causal_offset, (int, np.integer)):
    return fn(None if causal_offset is None else int(causal_offset))
  return jax.lax.cond(causal_offset == 0, lambda: fn(0), lambda: fn(-1))


def _pallas_options() -> dict:
  """Kernel backend by platform; on CPU the GPU kernel in the Pallas interpreter (tests only)."""
  return dict(backend=None, interpret=jax.default_backend() == "cpu")


def _segments(q_segment_ids, kv_segment_ids):
  return None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)


def pallas_block_forward(query, key, value, *, scale, causal_offset=None, q_segment_ids=None,
                         kv_segment_ids=None):
  """Block forward with the Pallas flash kernel (`pallas_kernels.flash_block_forward`)."""
  from pallas_kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
  return _with_static_offset(
      lambda offset: api.flash_block_forward(
          query, key, value, causal_offset=offset, scale=scale,
          segment_ids=_segments(q_segment_ids, kv_segment_ids), **_pallas_options()),
      causal_offset)


def pallas_block_backward(query, key, value, dout, lse, delta, *, scale, causal_offset=None,
                          q_segment_ids=None, kv_segment_ids=None):
  """Block backward with the Pallas flash kernels (`pallas_kernels.flash_block_backward`)."""
  from pallas_kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
  return _with_static_offset(
      lambda offset: api.flash_block_backward(
          query, key, value, None, lse, dout, delta=delta, causal_offset=offset, scale=scale,
          segment_ids=_segments(q_segment_ids, kv_segment_ids), **_pallas_options()),
      causal_offset)


PALLAS = BlockImpl("pallas", pallas_block_forward, pallas_block_backward)
BLOCK_IMPLS = (None, "xla", "pallas")


def _pallas_supported(query, key, value, is_causal) -> bool:
  """Whether `block_impl=None` takes the Pallas kernels: where the dispatch table of
  `big_attn.ops.softmax` (`KERNEL_RUNS`, recorded hardware runs) picks them for the shards."""
  return softmax.default_implementation(query, key, value, is_causal=is_causal) == "pallas"


def get_block_impl(block_impl, query=None, key=None, value=None,
                   is_causal=False) -> BlockImpl:
  """The `BlockImpl` for `block_impl`: "xla" the blocks above, "pallas" the Pallas flash
  kernels (on CPU in the Pallas interpreter: correct but slow, for tests), None "pallas" where
  a recorded hardware run (`big_attn.ops.softmax.KERNEL_RUNS`) shows the kernels correct and
  fast for these (local) shards, "xla" otherwise (always on CPU); a `BlockImpl` is used as
  given."""
  if isinstance(block_impl, BlockImpl):
    return block_impl
  if block_impl is None:
    supported = query is not None and _pallas_supported(query, key, value, is_causal)
    return PALLAS if supported else XLA
  if block_impl == "xla":
    return XLA
  if block_impl == "pallas":
    return PALLAS
  raise ValueError(
      f"block_impl must be one of {BLOCK_IMPLS} or a blockwise.BlockImpl, got {block_impl!r}")
