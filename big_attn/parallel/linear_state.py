"""Linear attention sequence parallelism (Sun et al. 2024, "Linear Attention Sequence
Parallelism", LASP) for the causal ops with a recurrent state form (`big_attn.ops.recurrent`).

The sequence is split into P contiguous shards; shard i holds tokens [i·n, (i + 1)·n). A causal
linear op needs at a token only the fixed-size state of the tokens before it, so instead of
passing keys and values around a ring, each shard sends one state:

1. token statistics that later features depend on (lognormal_linear's moment sums) are
   all-gathered and summed over the shards before this one;
2. each shard runs the op's recurrence over its tokens from an empty kv state (at its position,
   with those sums): its contribution S_i, z_i (with its key max and last values);
3. the contributions are all-gathered and combined in order over the shards before this one,
   S_{<i} = λ^n·S_{<i−1} + S_{i−1} (each rescaled to the larger key max);
4. the shard runs the recurrence again from S_{<i}: its causal outputs.

Communication is P states of `[kv_heads, features, value_dim]` per shard, independent of the
sequence length; memory is proportional to the local sequence. Gradients flow through the
collectives by autodiff (the transpose of `all_gather` sums the cotangents of every shard's
prefix back onto the shard that produced each contribution).

Packed rows (`segment_ids`, runs of equal ids; the state resets at each run's start): a
shard's contribution is the state of its last run only (`append` with `key_valid`), a shard
that is one run continuing the previous shard's last run passes the state before it on, and
the state reaches only the shard's first run, when that run continues the previous shard's
last. The runs that start inside a shard see no other shard's kv state: their outputs are the
op's own packed form on the shard (after focused_linear's value window, which its convolution
reads across runs), lognormal_linear's packed form at the shard's position with the earlier
shards' moment sums (its α_t, β_t are matched over the row's tokens across runs:
`StateForm.runs_inside`), or latte's recurrence over runs (`StateForm.packed`).

Striped token order (token t on shard t mod P) is refused: the recurrence runs in token order,
and in striped order the tokens between two tokens of a shard lie on every other shard, so a
shard would need the other shards' state after each of its n/P tokens, not once per shard:
P·n/P = n states of `[features, value_dim]`, more than the keys and values a ring moves.
Striping also has nothing to fix here: it balances the causal triangle of softmax attention,
while a linear op costs the same per token wherever the token sits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_attn import ops
from big_attn.ops import recurrent

Array = jax.Array

# Ops whose single-device output on packed rows is not the recurrence reset at each run.
PACKED_REFUSALS: dict[str, str] = {
    "retention": (
        "on packed rows the single-device op is its masked form, softmax(s·QKᵀ + log γ·(i−j)) "
        "over the run's keys, whose normaliser is a row statistic of the visible keys, not "
        "the recurrence's decay sum c_t over all earlier positions"),
  }


def _exclusive_sum(local: Array, axis_name, index: Array) -> Array:
  """Σ over the shards before this one of `local` (all-gathered)."""
  gathered = lax.all_gather(local, axis_name)
  before = jnp.arange(gathered.shape[0]) < index
  return jnp.sum(jnp.where(before.reshape((-1,) + (1,) * local.ndim), gathered, 0), axis=0)


def _check_packed(op: str, query: Array, segment_ids: Array) -> None:
  """A `ValueError` unless `segment_ids` are the local `[batch, n]` integer ids of packed rows
  for an op whose packed form LASP reproduces (`PACKED_REFUSALS`)."""
  if op in PACKED_REFUSALS:
    raise ValueError(f"linear_state_attention({op!r}): packed rows (segment_ids) are not "
                     f"supported: {PACKED_REFUSALS[op]}")
  if (not hasattr(segment_ids, "shape") or segment_ids.shape != query.shape[:2]
      or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"linear_state_attention({op!r}): segment_ids must be integers of shape "
                     f"[batch, n] = {query.shape[:2]}, got {segment_ids!r}")


def linear_state_attention(query: Array, key: Array, value: Array, *, op: str, axis_name,
                           is_causal: bool = True, token_order: str = "contiguous",
                           segment_ids: Array | None = None, **op_args) -> Array:
  """Causal linear/recurrent op `op` over a sequence split in contiguous shards (LASP).

  A per-shard function, called inside `jax.shard_map` over a mesh whose axis `axis_name`
  splits the sequence (axis 1) into equal contiguous shards. Equals
  `ops.get(op)(query, key, value, is_causal=True, segment_ids=..., **op_args)` on the whole
  sequence;
  differentiable.

  Args:
    query, key, value: the local shard, `[batch, n, heads, dim]` (as many keys as queries;
      keys/values may have fewer heads).
    op: a registered op with a state form (`ops.recurrent.STATE_FORMS`).
    axis_name: the mesh axis that splits the sequence.
    is_causal: must be True (the state form is the causal recurrence).
    token_order: "contiguous"; "striped" is refused (module docstring).
    segment_ids: None or the local `[batch, n]` integer ids of packed rows (runs of equal
      ids); the op's `segment_ids` semantics (ops in `PACKED_REFUSALS` raise).
    **op_args: the op's arguments (no mask).

  Returns:
    `[batch, n, heads, value_dim]`, the local shard of the output.
  """
  if token_order != "contiguous":
    raise ValueError(
        f"linear_state_attention({op!r}): token_order must be 'contiguous', got "
        f"{token_order!r}: in striped order the tokens between two of a shard's tokens lie on "
        "every other shard, so the recurrent state would have to cross shards at every token "
        "(see big_attn.parallel.linear_state)")
  if not is_causal:
    raise ValueError(f"linear_state_attention({op!r}) passes the causal state; is_causal must be "
                     "True (non-causal linear attention needs only a psum of the global state)")
  form = recurrent.state_form(op, query, key, value, **op_args)
  if segment_ids is not None:
    _check_packed(op, query, segment_ids)
  try:
    index = lax.axis_index(axis_name)
  except (NameError, ValueError):
    raise ValueError(f"linear_state_attention({op!r}): axis_name {axis_name!r} is not a bound "
                     "mesh axis; call it inside jax.shard_map over the axis that splits the "
                     "sequence") from None
  # Inside shard_map (with check_vma) every carry of the scans over shards must be varying.
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  initial = jax.tree.map(lambda x: lax.pcast(x, names, to="varying"), form.initial)
  start = initial._replace(position=(index * query.shape[1]).astype(jnp.int32))
  if form.sums is not None:
    start = start._replace(sums=_exclusive_sum(form.sums(query, key), axis_name, index))
  if segment_ids is None:
    _, contribution = form.append(start, query, key, value)
    prefix = _prefix(form, initial, lax.all_gather(contribution, axis_name), index)
    return form.append(prefix, query, key, value)[0]
  first, last = segment_ids[:, 0], segment_ids[:, -1]
  # The state of the shard's last run only: the one a later shard may continue.
  runs = dict(segment_ids=segment_ids) if form.packed else {}
  _, contribution = form.append(start, query, key, value,
                                key_valid=segment_ids == last[:, None], **runs)
  whole = jnp.all(segment_ids == first[:, None], axis=1)
  gathered = lax.all_gather((contribution, first, last, whole), axis_name)
  prefix = _prefix(form, initial, gathered[0], index, gathered[1:])
  # The prefix reaches the shard's first run only if that run is the previous shard's last.
  previous_last = gathered[2][jnp.maximum(index - 1, 0)]
  prefix = _reset(prefix, initial, (index > 0) & (first == previous_last))
  out = form.append(prefix, query, key, value, **runs)[0]
  if form.packed:
    return out
  # The later runs start inside the shard: the op on the shard with its segments, after the
  # window's values (under a segment id of no run, so only a convolution over values sees them).
  outside = jnp.min(segment_ids) - 1
  q, k, v, segs = query, key, value, segment_ids
  if prefix.window is not None:
    size = prefix.window.shape[1]
    pad = lambda x, fill: jnp.concatenate(  # noqa: E731
        [jnp.full(x.shape[:1] + (size,) + x.shape[2:], fill, x.dtype), x], axis=1)
    q, k, segs = pad(query, 0), pad(key, 0), pad(segment_ids, outside)
    v = jnp.concatenate([prefix.window.astype(value.dtype), value], axis=1)
  if form.runs_inside is not None:
    rest = form.runs_inside(start, q, k, v, segs)
  else:
    rest = ops.get(op)(q, k, v, is_causal=True, segment_ids=segs, **op_args)
  in_first = (segment_ids == first[:, None])[:, :, None, None]
  return jnp.where(in_first, out, rest[:, rest.shape[1] - query.shape[1]:])


def _reset(state: recurrent.RecurrentState, initial: recurrent.RecurrentState,
           keep: Array) -> recurrent.RecurrentState:
  """`state` with its kv state (kv, norm, key max) emptied in the rows where `keep` `[b]` is
  False; its position, moment sums and value window are those of the row and stay."""
  def pick(x, empty):
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, empty)
  return state._replace(kv=pick(state.kv, initial.kv), norm=pick(state.norm, initial.norm),
                        key_max=pick(state.key_max, initial.key_max))


def _prefix(form, initial, contributions, index, runs=None):
  """The state before this shard from the gathered contributions of the shards before it.

  `runs`: None, or the gathered `(first, last, whole)` segment ids of each shard's first and
  last token and whether the shard is one run: a shard's contribution then holds its last
  run, which continues the state before it only if the shard is one run that continues the
  previous shard's last."""
  num_shards = jax.tree.leaves(contributions)[0].shape[0]

  def fold(carry, shard):
    prefix, previous_last = carry
    later, j, run = shard
    if run is not None:
      first, last, whole = run
      prefix = _reset(prefix, initial, whole & (first == previous_last))
      previous_last = jnp.where(j < index, last, previous_last)
    combined = recurrent.combine_states(prefix, later, form.log_decay)
    prefix = jax.tree.map(lambda new, old: jnp.where(j < index, new, old), combined, carry[0])
    return (prefix, previous_last), None

  previous_last = None if runs is None else jnp.full_like(runs[1][0], -1)
  (prefix, _), _ = lax.scan(fold, (initial, previous_last),
                            (contributions, jnp.arange(num_shards), runs))
  return prefix
