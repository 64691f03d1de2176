"""Functional attention ops: pure functions `q, k, v, ... -> out` found by name.

    from big_attn import ops
    out = ops.get("sigmoid")(q, k, v, is_causal=True)   # [batch, seq, heads, head_dim]

Every op has the leading signature `op(query, key, value, *, mask=None, is_causal=False,
scale=None, **mechanism_args)`; its docstring names the paper and gives the formula.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import (BLOCK_MERGES, BlockForm, HeadArg, OpSpec, PairScores,
                                   PairTerms, get, has_causal_form, names, register, spec)
from big_attn.ops.registry import OpParams, params_module, register_params
from big_attn.ops.softmax import dot_product_attention

# Importing a family module registers its ops.
from big_attn.ops import softmax as _softmax  # noqa: F401  pylint: disable=unused-import
from big_attn.ops import sigmoid as _sigmoid  # noqa: F401
from big_attn.ops import scoring as _scoring  # noqa: F401
from big_attn.ops import linear as _linear  # noqa: F401
from big_attn.ops import latent as _latent  # noqa: F401
from big_attn.ops import local as _local  # noqa: F401
from big_attn.ops import retention as _retention  # noqa: F401
from big_attn.ops import windowed as _windowed  # noqa: F401
from big_attn.ops import reduction as _reduction  # noqa: F401
from big_attn.ops import routing as _routing  # noqa: F401
from big_attn.ops import decode as _decode  # noqa: F401
from big_attn.ops import positional as _positional  # noqa: F401
from big_attn.ops import quantized as _quantized  # noqa: F401
from big_attn.ops import sparse as _sparse  # noqa: F401
from big_attn.ops import learned_scoring as _learned_scoring  # noqa: F401
from big_attn.ops import experts as _experts  # noqa: F401
from big_attn.ops import bottleneck as _bottleneck  # noqa: F401
from big_attn.ops import combiner as _combiner  # noqa: F401
from big_attn.ops import quadtree as _quadtree  # noqa: F401
from big_attn.ops import ngpt as _ngpt  # noqa: F401
from big_attn.ops import hyena as _hyena  # noqa: F401
from big_attn.ops import deformable as _deformable  # noqa: F401
from big_attn.ops import outlook as _outlook  # noqa: F401
from big_attn.ops import efficient as _efficient  # noqa: F401
from big_attn.ops import serialized as _serialized  # noqa: F401
from big_attn.ops import geometric as _geometric  # noqa: F401
from big_attn.ops import hard as _hard  # noqa: F401
from big_attn.ops import wavelet as _wavelet  # noqa: F401
from big_attn.ops import tree as _tree  # noqa: F401
from big_attn.ops import sparsifiner as _sparsifiner  # noqa: F401
from big_attn.ops import reweighted as _reweighted  # noqa: F401
from big_attn.ops import graph as _graph  # noqa: F401
from big_attn.ops import probabilistic as _probabilistic  # noqa: F401
from big_attn.ops import interpretable as _interpretable  # noqa: F401
from big_attn.ops import layout as _layout  # noqa: F401
from big_attn.ops import super_attention as _super_attention  # noqa: F401
from big_attn.ops import sdm as _sdm  # noqa: F401
from big_attn.ops.forms import check_form, decoding_form, sequence_parallel_form
from big_attn.ops.learned_scoring import pointer_log_probs
from big_attn.ops.hard import variational_kl
from big_attn.ops.sdm import sdm_softmax_beta


def _flatten_batch(x, batch_shape, trailing: int):
  """`[*batch_shape, *the last `trailing` axes]`, batch axes broadcast (missing ones added),
  -> `[prod(batch_shape), *the last axes]`."""
  x = x.reshape((1,) * (len(batch_shape) + trailing - x.ndim) + x.shape)
  x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
  return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])


def as_attention_fn(name: str, **mechanism_args) -> Callable:
  """The op `name` as an `attention_fn` for `flax.linen.MultiHeadDotProductAttention`.

  Behaves as `flax.linen.dot_product_attention` where Flax's default attention works: inputs
  `[batch..., seq, heads, head_dim]` with any number of leading batch axes (none included),
  masks and biases broadcastable to `[batch..., heads, q_len, kv_len]` (a float mask:
  nonzero = attend), computation in `dtype` (inputs cast to it, as Flax's `promote_dtype`),
  attention-weight dropout (`dropout_rate`, `dropout_rng`, `deterministic`,
  `broadcast_dropout`, the same random bits as Flax) and, with `module` (Flax passes it for
  `sow_weights=True`), `module.sow('intermediates', 'attention_weights', weights)` with the
  weights `[batch..., heads, q_len, kv_len]` before dropout. `mechanism_args` are bound.

  Dropout and sowing need the attention matrix, which the ops never materialise otherwise:
  it is the op's output for one-hot values (row i is the op's weights over the keys), so they
  apply to ops whose output is a weighted sum of the values, and cost O(q_len·kv_len).
  """
  op_spec = spec(name)
  op = op_spec.fn

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   module=None):
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"as_attention_fn({name!r}): dtype must be floating, got {dtype}")
    for arg, x in (("query", query), ("key", key), ("value", value)):
      common.check_float(arg, x)
      if x.ndim < 3:
        raise ValueError(f"{arg} must be [batch..., seq, heads, head_dim], got {x.shape}")
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
      raise ValueError(f"query, key and value must share the batch axes, got {query.shape}, "
                       f"{key.shape} and {value.shape}")
    kwargs = dict(mechanism_args)
    if bias is not None:
      if not op_spec.bias:
        raise ValueError(f"attention op {name!r} takes no additive bias")
      kwargs["bias"] = _flatten_batch(bias, batch_shape, 3)
    if mask is not None:
      kwargs["mask"] = _flatten_batch(mask, batch_shape, 3).astype(bool)
    q, k, v = (_flatten_batch(x, batch_shape, 3) for x in (query, key, value))
    dropout = not deterministic and dropout_rate > 0.0
    if not dropout and module is None:
      return op(q, k, v, **kwargs).reshape(batch_shape + query.shape[-3:-1] + value.shape[-1:])

    kv_len, kv_heads = k.shape[1], k.shape[2]
    one_hot = jnp.broadcast_to(jnp.eye(kv_len, dtype=dtype)[None, :, None, :],
                               (q.shape[0], kv_len, kv_heads, kv_len))
    weights = jnp.swapaxes(op(q, k, one_hot, **kwargs), 1, 2)  # [b, heads, q_len, kv_len]
    weights = weights.reshape(batch_shape + weights.shape[1:])
    if module is not None:
      module.sow("intermediates", "attention_weights", weights)
    if dropout:  # As flax.linen.dot_product_attention_weights.
      if dropout_rng is None:
        raise ValueError(f"as_attention_fn({name!r}): dropout needs dropout_rng")
      keep_prob = 1.0 - dropout_rate
      shape = ((1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout
               else weights.shape)
      keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
      weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
    groups = query.shape[-2] // key.shape[-2]
    return jnp.einsum("...hqk,...khd->...qhd", weights, jnp.repeat(value, groups, axis=-2))

  attention_fn.__name__ = f"{name}_attention_fn"
  return attention_fn


__all__ = ["BLOCK_MERGES", "BlockForm", "HeadArg", "OpSpec", "PairScores", "PairTerms", "as_attention_fn",
           "dot_product_attention", "get", "has_causal_form", "names",
           "register", "spec"]
__all__ += ["OpParams", "params_module", "register_params"]
__all__ += ["check_form", "decoding_form", "sequence_parallel_form", "pointer_log_probs",
            "variational_kl", "sdm_softmax_beta"]
