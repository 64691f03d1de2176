"""Registry of attention ops by name, with the arguments each op declares."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

# Block-merge rules of `big_attn.parallel.merge`: how per-key-block results of an op combine.
BLOCK_MERGES = ("softmax", "sigmoid", "cog", "clipped_softmax", "linear", "moments", "hard")


class PairTerms(NamedTuple):
  """A block's terms that depend on the global positions of its queries and keys (hashable:
  part of the static block-merge rule).

  `fn(arrays, q_pos, k_pos, *, is_causal, **dict(static)) -> (bias, multiplier, allowed)`:
  `arrays` the op's arrays (`BlockForm.pair_arrays`, each with the heads as leading axis, so a
  schedule splits them with the heads), `q_pos [t]` and `k_pos [s]` the int32 global
  positions of the block's queries and keys; each result is None or broadcastable to
  `[heads, t, s]`: a logit bias added to the scores, a multiplier of the normalised weights,
  a boolean mask of the visible pairs. Written in jnp on position arrays (any order, any
  block), so the same function serves the whole sequence and every block of a schedule.
  """
  fn: Callable
  static: tuple = ()


class HeadArg(NamedTuple):
  """An op argument that holds one slice per head, which the head-parallel form
  (`big_attn.parallel.heads`) splits with the heads.

  `per_token`: a per-token array laid out as the query, `[batch, seq, heads, ...]`; otherwise a
  weight with the heads leading, `[heads, ...]`. `kv`: indexed by the key/value heads (GQA),
  not the query heads.
  """
  per_token: bool = False
  kv: bool = False


class PairScores(NamedTuple):
  """A block's scores as a function of each (query, key) pair, for ops whose score is not a dot
  product (hashable: part of the static block-merge rule).

  `fn(arrays, query, key, **dict(static)) -> scores`: `arrays` the op's arrays
  (`BlockForm.pair_arrays`, heads leading), `query [batch, t, heads, dim]` and `key [batch, s,
  kv_heads, dim]` a block's queries and keys; the float32 scores `[batch, heads, t, s]` before
  the form's scale. Differentiable in all three (the schedules pull the scores' gradient back
  through `jax.vjp`); the same function serves the whole sequence and every block.
  """
  fn: Callable
  static: tuple = ()


class BlockForm(NamedTuple):
  """An op as the ring and striped schedules compute it (`OpSpec.block_form` returns one).

  Attributes:
    merge: the block-merge rule (`BLOCK_MERGES`): "softmax" (log-sum-exp merge), "sigmoid"
      (block outputs add), "cog" (log-sum-exp merge of |s|, values weighted by sign(s)),
      "clipped_softmax" (clip((ζ-γ)p+γ, 0, 1) on the merged probabilities p), "linear" (the
      scores themselves as weights, block outputs add), "moments" (blocks return the sums
      Σv, Σs'·v, n, Σs', Σs'² over their visible keys of the scores s' = s − c about the
      row's mean c, and c, concatenated on the last axis of the output, `[batch, q_len, heads,
      2·value_dim + 4]`; `output_map` forms the op's output from them, a value that must not
      depend on c), "hard" (hard attention's sample: blocks keep the max of s + g over their
      keys, its value and global position, and their log-sum-exp; the max over blocks chooses
      v_z; `params` `sampled` (1.0: Gumbel noise of `pair_arrays`, the `[heads, batch]` keys
      of `ops.hard.pair_gumbel`, split with the heads and the batch; 0.0: the argmax) and `baseline` (1.0: the softmax output is
      merged too, the score-function gradient's baseline)).
    query, key, scale: the (transformed) queries and keys and the logit scale.
    params: None or a dict of the rule's static numbers: `soft_cap` (softmax, sigmoid),
      `logit_bias` (sigmoid), `zeta`, `gamma` (clipped_softmax).
    gate_logits: `[batch, q_len, num_heads]` logits of a gate σ(·) multiplied into the merged
      output, or None.
    value_map: None or a per-token map of the op's `value` `[batch, kv_len, kv_heads, ·]` to
      the values the blocks attend (the same batch, length and key heads).
    output_map: None or `(out, value) -> output`: a per-token map of the merged (and gated)
      output `[batch, q_len, heads, ·]` to the op's output; `value` is the op's own `value`
      (in the same token order: self-attention ops read the query token's value). Both maps
      act on each token alone, so they hold in any token order (natural or striped) and on
      the whole or the sharded sequence.
    pair_terms: None or the `PairTerms` of a block's global positions ("softmax": bias,
      multiplier and visible pairs; "linear": multiplier and visible pairs).
    pair_arrays: the arrays `pair_terms` and `pair_scores` read (a dict), differentiated with
      the op.
    pair_scores: None (scores scale·q_i·k_j) or the `PairScores` of a block's queries and keys
      (rules "softmax" and "linear").
    at_positions: None, or for forms whose per-token maps depend on each token's global
      position, `(q_pos, k_pos) -> BlockForm`: the form for queries and keys at the global
      positions `q_pos [q_len]`, `k_pos [kv_len]` (NumPy ints, in the order of the arrays the
      schedule attends: striped for the striped schedule). The form's own fields are those of
      the natural order.
  """
  merge: str
  query: Any
  key: Any
  scale: float | None
  params: dict | None = None
  gate_logits: Any = None
  value_map: Callable | None = None
  output_map: Callable | None = None
  pair_terms: PairTerms | None = None
  pair_arrays: Any = None
  pair_scores: PairScores | None = None
  at_positions: Callable | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """A registered op and what it declares (never read from its signature).

  Attributes:
    name: the registry name.
    fn: the op, `fn(query, key, value, *, mask=None, is_causal=False, scale=None, ...)`.
    causal: it has a causal form (`is_causal=True`); False: it raises `NotImplementedError`.
    segment_ids: it takes `segment_ids` (otherwise a caller folds them into the mask).
    implementation: it takes `implementation` ("xla", "pallas", "cudnn" or None).
    bias: it takes an additive logit `bias`.
    grid: it takes the `(h, w)` token `grid` of an image.
    softmax_form: for ops that are softmax attention of transformed queries and keys, the
      transform `(query, key, scale, **op_args) -> (query, key, scale)`; such ops also run
      sequence-parallel and over a key/value cache (the ring and the cache see the transformed
      queries and keys). None: no such form.
    block_form: `(query, key, scale, **op_args) -> BlockForm`: the op as blocks of keys merged
      by a rule, the form the ring and striped schedules run (computed on the whole sequence,
      so lengths are global). An op with a `softmax_form` has the softmax one. None: no block
      merge exists (the op is refused sequence-parallel unless it has a recurrent state).
    block_refusal: for a causal op without a block form, the op's own reason (what in its
      weights key blocks cannot merge), which the sequence-parallel refusal states; None: the
      registry's general reason.
    head_args: for a causal op without a block form whose heads are independent (each head's
      output depends only on its own queries, keys, values and weights), its arguments that
      hold one slice per head (`HeadArg`), by name; the op then runs sequence-parallel by
      splitting its heads instead of its tokens (`big_attn.parallel.heads`). None: its heads
      are not independent.
  """
  name: str
  fn: Callable
  causal: bool = True
  segment_ids: bool = False
  implementation: bool = False
  bias: bool = False
  grid: bool = False
  softmax_form: Callable | None = None
  block_form: Callable | None = None
  block_refusal: str | None = None
  head_args: Mapping[str, HeadArg] | None = None


_OPS: dict[str, OpSpec] = {}


def _softmax_block_form(softmax_form, query, key, scale, **op_args) -> BlockForm:
  """The block form of an op with a `softmax_form`: softmax of its transformed queries/keys."""
  return BlockForm("softmax", *softmax_form(query, key, scale, **op_args))


def register(name: str, *, causal: bool = True, segment_ids: bool = False,
             implementation: bool = False, bias: bool = False, grid: bool = False,
             softmax_form: Callable | None = None, block_form: Callable | None = None,
             block_refusal: str | None = None,
             head_args: Mapping[str, HeadArg] | None = None) -> Callable[[Callable], Callable]:
  """Decorator registering an op under `name` with the flags of `OpSpec`; a second
  registration of a name raises."""
  if not isinstance(name, str) or not name:
    raise TypeError(f"op name must be a non-empty string, got {name!r}")
  flags = dict(causal=causal, segment_ids=segment_ids, implementation=implementation,
               bias=bias, grid=grid)
  for flag, value in flags.items():
    if not isinstance(value, bool):
      raise TypeError(f"register({name!r}): {flag} must be a bool, got {value!r}")
  for field, value in (("softmax_form", softmax_form), ("block_form", block_form)):
    if value is not None and not callable(value):
      raise TypeError(f"register({name!r}): {field} must be None or callable, got {value!r}")
  if block_form is None and softmax_form is not None:
    block_form = functools.partial(_softmax_block_form, softmax_form)
  if block_refusal is not None and (not isinstance(block_refusal, str) or block_form is not None
                                    or not causal):
    raise TypeError(f"register({name!r}): block_refusal must be a string, for a causal op "
                    f"without a block form, got {block_refusal!r}")
  if head_args is not None and (block_form is not None or not causal or not all(
      isinstance(k, str) and isinstance(v, HeadArg) for k, v in dict(head_args).items())):
    raise TypeError(f"register({name!r}): head_args must map argument names to HeadArg, for a "
                    f"causal op without a block form, got {head_args!r}")

  def decorator(fn: Callable) -> Callable:
    if name in _OPS:
      raise ValueError(f"attention op {name!r} is already registered "
                       f"({_OPS[name].fn.__module__})")
    _OPS[name] = OpSpec(name=name, fn=fn, softmax_form=softmax_form, block_form=block_form,
                        block_refusal=block_refusal,
                        head_args=None if head_args is None else dict(head_args), **flags)
    return fn

  return decorator


def spec(name: str) -> OpSpec:
  """The `OpSpec` of op `name`; a `KeyError` listing the known names otherwise."""
  try:
    return _OPS[name]
  except KeyError:
    raise KeyError(f"unknown attention op {name!r}; known ops: {', '.join(names())}") from None


def get(name: str) -> Callable:
  """The op registered as `name`; a `KeyError` listing the known names otherwise."""
  return spec(name).fn


def has_causal_form(name: str) -> bool:
  """Whether op `name` takes `is_causal=True` (it was not registered with `causal=False`)."""
  return spec(name).causal


def names() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_OPS)


# Parameter modules: the learned weights of a mechanism, registered by its op's name in the
# op's own file, so that a mechanism is one file. `big_attn.layers.Attention` calls one as
#   extra_args = cls(num_heads=..., num_kv_heads=..., head_dim=..., op_args=..., dtype=...,
#                    param_dtype=...)(inputs_q, query, key, value)
# with `query/key/value` the projected `[batch, seq, heads, head_dim]` arrays, and passes
# `extra_args` (the weights, as keyword arguments of the op) to the op.

_PARAMS: dict[str, type[nn.Module]] = {}


class OpParams(nn.Module):
  """Base of the parameter modules (the fields `big_attn.layers.Attention` sets)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32


def register_params(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator registering the Linen module that owns op `name`'s weights; a second
  registration of a name raises."""

  def decorator(cls: type[nn.Module]) -> type[nn.Module]:
    if name in _PARAMS:
      raise ValueError(f"parameters for op {name!r} are already registered "
                       f"({_PARAMS[name].__module__})")
    _PARAMS[name] = cls
    return cls

  return decorator


def params_module(name: str) -> type[nn.Module] | None:
  """The module owning op `name`'s weights, or None for a mechanism without weights."""
  return _PARAMS.get(name)
