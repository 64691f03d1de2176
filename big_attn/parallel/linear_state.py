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

from big_attn.ops import recurrent

Array = jax.Array


def _exclusive_sum(local: Array, axis_name, index: Array) -> Array:
  """Σ over the shards before this one of `local` (all-gathered)."""
  gathered = lax.all_gather(local, axis_name)
  before = jnp.arange(gathered.shape[0]) < index
  return jnp.sum(jnp.where(before.reshape((-1,) + (1,) * local.ndim), gathered, 0), axis=0)


def linear_state_attention(query: Array, key: Array, value: Array, *, op: str, axis_name,
                           is_causal: bool = True, token_order: str = "contiguous",
                           **op_args) -> Array:
  """Causal linear/recurrent op `op` over a sequence split in contiguous shards (LASP).

  A per-shard function, called inside `jax.shard_map` over a mesh whose axis `axis_name`
  splits the sequence (axis 1) into equal contiguous shards. Equals
  `ops.get(op)(query, key, value, is_causal=True, **op_args)` on the whole sequence;
  differentiable.

  Args:
    query, key, value: the local shard, `[batch, n, heads, dim]` (as many keys as queries;
      keys/values may have fewer heads).
    op: a registered op with a state form (`ops.recurrent.STATE_FORMS`).
    axis_name: the mesh axis that splits the sequence.
    is_causal: must be True (the state form is the causal recurrence).
    token_order: "contiguous"; "striped" is refused (module docstring).
    **op_args: the op's arguments (no mask or segment ids).

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
  _, contribution = form.append(start, query, key, value)
  gathered = lax.all_gather(contribution, axis_name)

  def fold(prefix, shard):
    later, j = shard
    combined = recurrent.combine_states(prefix, later, form.log_decay)
    return jax.tree.map(lambda new, old: jnp.where(j < index, new, old), combined, prefix), None

  num_shards = jax.tree.leaves(gathered)[0].shape[0]
  prefix, _ = lax.scan(fold, initial, (gathered, jnp.arange(num_shards)))
  out, _ = form.append(prefix, query, key, value)
  return out
