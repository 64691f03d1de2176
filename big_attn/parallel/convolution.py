"""Sequence parallelism of Hyena's convolutions (Hyena Hierarchy: Towards Larger Convolutional
Language Models, Poli et al. 2023).

Every convolution of the op, (h * z)_t = Σ_s h_{t−s} z_s, is a sum over the shards j that hold
the source tokens s. With the sequence of length L = P·n split over P shards, shard i's output
block is Σ_j g_ij * z_j: z_j is shard j's block of the convolution's input and g_ij the 2n − 1
taps of h at the offsets between the two blocks' global positions,

    t − s = (a − c) + (i − j)·n    contiguous shards (token a of shard i is i·n + a),
    t − s = (a − c)·P + (i − j)    striped order (token a of shard i is a·P + i).

Each block pair is one convolution of length n by FFT (on packed rows a dense Toeplitz product
within segments, as the single-device op), so a shard needs the other shards' inputs of each
convolution: "ring" and "striped" pass them around the ring (`ppermute`, P − 1 steps), and
"all_gather" gathers them. Between two convolutions Hyena's recurrence z_{n+1} = x_n ⊙ (h_n * z_n
+ D_n ⊙ z_n) is token-wise, so every order is exact once its inputs have been passed; the short
depthwise filters of the projections are convolutions of the same kind with k taps. Causal
filters are zero at negative offsets, so a source block after the destination adds zero (it is
computed all the same: every shard steps through the whole ring).

Communication is P − 1 blocks `[batch, n, heads, head_dim]` per convolution and shard (2N + 1
convolutions of order N with short filters); memory is proportional to the local sequence
("all_gather": to the whole). Gradients flow through the collectives by autodiff (the
transpose of the ring is the reverse ring, that of `all_gather` a reduce-scatter).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from big_attn import ops
from big_attn.ops import common
from big_attn.ops import hyena

Array = jax.Array

STRATEGIES = ("ring", "striped", "all_gather")


def _centred(filt: Array, length: int, is_causal: bool) -> Array:
  """A long filter in the op's layout (causal taps `[L, ...]` at offsets 0..L−1, or centred
  `[2L − 1, ...]`) as centred taps at offsets −(L−1)..L−1, zero at negative offsets when
  causal."""
  if filt.shape[0] == 2 * length - 1:
    filt = filt[length - 1:] if is_causal else filt
  if filt.shape[0] == 2 * length - 1:
    return filt
  return jnp.concatenate([jnp.zeros((length - 1,) + filt.shape[1:], filt.dtype), filt])


def _short_centred(kernel: Array, length: int, is_causal: bool) -> Array:
  """`hyena.short_conv`'s depthwise kernel `[k, ...]` (tap j reads token t + j − p, p = k − 1
  causal or ⌊(k − 1)/2⌋) as centred taps `[2L − 1, ...]` of a long filter; taps reaching
  beyond the sequence are dropped (they read padding)."""
  size = kernel.shape[0]
  offsets = (size - 1 if is_causal else (size - 1) // 2) - np.arange(size)
  keep = np.abs(offsets) < length
  taps = jnp.zeros((2 * length - 1,) + kernel.shape[1:], kernel.dtype)
  return taps.at[offsets[keep] + length - 1].set(kernel[keep])


def _block_taps(centred: Array, block: int, num_shards: int, shard_offset: Array,
                striped: bool) -> Array:
  """The 2·block − 1 centred taps between a destination block and a source block
  `shard_offset` = i − j shards before it (module docstring)."""
  within = jnp.arange(-(block - 1), block)
  offset = within * num_shards + shard_offset if striped else within + shard_offset * block
  return centred[offset + block * num_shards - 1]


def _sharded_conv(z: Array, centred: Array, *, axis_name, strategy: str, index: Array,
                  num_shards: int, segment_ids: Array | None,
                  all_segment_ids: Array | None) -> Array:
  """The local block of (h * z) over the whole sequence, h as centred taps `[2L − 1, heads,
  head_dim]`, z the local `[b, n, heads, head_dim]`; packed rows: the local `segment_ids`
  `[b, n]` and every shard's, `all_segment_ids` `[P, b, n]`."""
  block = z.shape[1]

  def contribution(z_j, j):
    taps = _block_taps(centred, block, num_shards, index - j, strategy == "striped")
    if segment_ids is None:
      return hyena._long_conv(z_j, taps, (block,), False, False)
    same = segment_ids[:, :, None] == all_segment_ids[j][:, None, :]
    return hyena._long_conv_segments(z_j, taps, False, False, same)

  if strategy == "all_gather":
    gathered = lax.all_gather(z, axis_name)
    return jnp.sum(jax.vmap(contribution)(gathered, jnp.arange(num_shards)), axis=0)
  ring = [(i, (i + 1) % num_shards) for i in range(num_shards)]

  def step(carry, hops):
    z_j, total = carry
    z_j = lax.ppermute(z_j, axis_name, ring)
    return (z_j, total + contribution(z_j, (index - hops) % num_shards)), None

  (_, total), _ = lax.scan(step, (z, contribution(z, index)), jnp.arange(1, num_shards))
  return total


def hyena_shard_attention(query: Array, key: Array, value: Array, *, axis_name,
                          strategy: str = "ring", is_causal: bool = True,
                          segment_ids: Array | None = None, **op_args) -> Array:
  """The op `hyena` over a sequence split over the mesh axis `axis_name` (module docstring).

  A per-shard function, called inside `jax.shard_map`. Equals `ops.get("hyena")(query, key,
  value, is_causal=..., segment_ids=..., **op_args)` on the whole sequence (in the strategy's
  token order: contiguous for "ring" and "all_gather", striped for "striped"); differentiable.

  Args:
    query, key, value: the local shard `[batch, n, heads, head_dim]` (keys/values may have fewer
      heads).
    axis_name: the mesh axis that splits the sequence.
    strategy: "ring", "striped" or "all_gather".
    is_causal: causal convolutions.
    segment_ids: None or the local `[batch, n]` ids of packed rows.
    **op_args: the op's arguments for the whole sequence (`filters` of its length; `gates`
      `[N − 2, batch, n, heads, head_dim]` local); a 1-D sequence without `mask`.

  Returns:
    `[batch, n, heads, head_dim]`, the local shard of the output.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  for arg in ("mask", "grid"):
    if op_args.get(arg) is not None:
      raise ValueError(f"hyena_shard_attention: {arg} is not supported (the sequence-parallel "
                       "form is of 1-D sequences, packed by segment_ids)")
  try:
    num_shards, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
  except (NameError, ValueError):
    raise ValueError(f"hyena_shard_attention: axis_name {axis_name!r} is not a bound mesh "
                     "axis; call it inside jax.shard_map over the axis that splits the "
                     "sequence") from None
  dims = common.check_qkv(query, key, value)
  gates = op_args.pop("gates", None)
  _check_whole(query, key, value, gates, segment_ids, num_shards, is_causal, op_args)
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  length = dims.q_len * num_shards
  key, value = (jnp.repeat(x, dims.groups, axis=2) for x in (key, value))
  inputs = [value, key] + ([] if gates is None else list(gates)) + [query]
  inputs = [x.astype(dtype) for x in inputs]
  conv = functools.partial(
      _sharded_conv, axis_name=axis_name, strategy=strategy, index=index,
      num_shards=num_shards, segment_ids=segment_ids,
      all_segment_ids=None if segment_ids is None else lax.all_gather(segment_ids, axis_name))
  short_filters = op_args.get("short_filters")
  if short_filters is not None:
    inputs = [conv(x, _short_centred(w.astype(dtype), length, is_causal))
              for x, w in zip(inputs, short_filters)]
  filters = [_centred(f.astype(dtype), length, is_causal) for f in op_args["filters"]]
  bias = op_args.get("filter_bias")
  z = hyena.gated_recurrence(inputs, filters, None if bias is None else bias.astype(dtype), conv)
  return z.astype(query.dtype)


def _check_whole(query, key, value, gates, segment_ids, num_shards, is_causal, op_args):
  """The op's own checks on the shapes of the whole sequence (traced, nothing computed)."""
  whole = lambda x, axis=1: jax.ShapeDtypeStruct(  # noqa: E731
      x.shape[:axis] + (x.shape[axis] * num_shards,) + x.shape[axis + 1:], x.dtype)
  args = [whole(x) for x in (query, key, value)]
  args += [None if gates is None else whole(gates, 2),
           None if segment_ids is None else whole(segment_ids)]
  jax.eval_shape(lambda q, k, v, g, s: ops.get("hyena")(
      q, k, v, is_causal=is_causal, gates=g, segment_ids=s, **op_args), *args)
