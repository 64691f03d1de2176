"""The caches of decoding, one per decoding form (`big_attn.ops.decoding_form`): `KVCache`
(softmax attention's keys and values), `RecurrentCache` (the constant-size state of an op with
a recurrent state form) and `InputCache` (the layer inputs, over which any other causal op is
evaluated whole)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn import ops
from big_attn.ops import recurrent

Array = jax.Array


class KVCache(nn.Module):
  """Softmax attention of new queries over a key/value cache of `length` tokens.

  Each call writes the new keys and values at the cache's index and attends the new queries to
  the valid part of the cache with the split-KV op `lean_decode` (Lean Attention). The cache is
  in the collection "cache" (`key`, `value` `[batch, length, kv_heads, dim]` and the int
  `index`); apply with `mutable=["cache"]`. Queries and keys arrive already in their softmax
  form (`ops.spec(op).softmax_form`).

  Attributes:
    length: cache entries per sequence (prompt plus generated tokens).
  """
  length: int

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, is_causal: bool = False,
               scale: float | None = None, local_window_size: Any = None) -> Array:
    """`[batch, new, heads, dim]` queries over the cache after appending `key`/`value`.

    `local_window_size` `(left, 0)`: a query at position p sees cache entries >= p - left
    (a sliding window)."""
    if not isinstance(self.length, int) or self.length < 1:
      raise ValueError(f"KVCache length must be a positive int, got {self.length!r}")
    batch, _, kv_heads, _ = key.shape

    def cache(name, like):
      return self.variable("cache", name, jnp.zeros, (batch, self.length, kv_heads,
                                                      like.shape[-1]), like.dtype)

    cached_key, cached_value = cache("key", key), cache("value", value)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = index.value
    mask = None
    if local_window_size is not None:
      query_pos = start + jnp.arange(query.shape[1])[:, None]
      visible = jnp.arange(self.length)[None, :] >= query_pos - local_window_size[0]
      mask = visible[None, None]
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, key.astype(cached_key.value.dtype), (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, start, 0, 0))
    index.value = start + query.shape[1]
    return ops.get("lean_decode")(query, cached_key.value, cached_value.value, mask=mask,
                                  is_causal=is_causal, scale=scale, kv_length=index.value)


class RecurrentCache(nn.Module):
  """Causal op `op` over new tokens after the tokens seen before, from a state of constant size.

  The state (`big_attn.ops.recurrent.RecurrentState`: the decayed sum of phi(k) v^T, its
  normaliser and the statistics later tokens depend on) is the variable `state` of the
  collection "cache"; each call appends the new tokens with the op's `StateForm.append` and
  returns their causal outputs, equal to the full causal op at those positions. Apply with
  `mutable=["cache"]`.

  Attributes:
    op: a registered op with a state form (`recurrent.STATE_FORMS`).
  """
  op: str

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **op_args) -> Array:
    form = recurrent.state_form(self.op, query, key, value, **op_args)
    state = self.variable("cache", "state", lambda: form.initial)
    out, state.value = form.append(state.value, query, key, value)
    return out


class InputCache(nn.Module):
  """The inputs of a causal attention layer of `length` tokens, for ops decoded by
  recomputation (`big_attn.ops.decoding_form` "inputs").

  Each call writes the new tokens' features and positions at the cache's index and returns the
  whole cache, which the layer then attends over causally, keeping the new tokens' outputs
  (`new_tokens`): the entries after them are zeros that a causal op does not read. Collection
  "cache": `inputs [batch, length, features]`, `positions [batch, length]` and the int
  `index`; apply with `mutable=["cache"]`.

  Attributes:
    length: cache entries per sequence (prompt plus generated tokens).
  """
  length: int

  @nn.compact
  def __call__(self, inputs: Array, positions: Array | None = None
               ) -> tuple[Array, Array, Array]:
    """`inputs [batch, new, features]` and their `positions` (`[batch|1, new]` or `[new]`;
    None: the next positions after the cached tokens) -> the cached inputs `[batch, length,
    features]`, positions `[batch, length]` and the index of the first new token."""
    if not isinstance(self.length, int) or self.length < 1:
      raise ValueError(f"InputCache length must be a positive int, got {self.length!r}")
    batch, new, features = inputs.shape
    cached = self.variable("cache", "inputs", jnp.zeros, (batch, self.length, features),
                           inputs.dtype)
    cached_pos = self.variable("cache", "positions", jnp.zeros, (batch, self.length),
                               jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = index.value
    if positions is None:
      positions = start + jnp.arange(new)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, new))
    cached.value = jax.lax.dynamic_update_slice(cached.value, inputs.astype(cached.value.dtype),
                                                (0, start, 0))
    cached_pos.value = jax.lax.dynamic_update_slice(cached_pos.value, positions, (0, start))
    index.value = start + new
    return cached.value, cached_pos.value, start


def new_tokens(outputs: Array, start: Array, count: int) -> Array:
  """The `count` outputs `[batch, count, ...]` of the tokens an `InputCache` call added at
  `start`, from the outputs `[batch, length, ...]` over the whole cache."""
  return jax.lax.dynamic_slice_in_dim(outputs, start, count, axis=1)
