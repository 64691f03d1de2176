"""Functional attention ops: pure functions `q, k, v, ... -> out` found by name.

    from big_attn import ops
    out = ops.get("sigmoid")(q, k, v, is_causal=True)   # [batch, seq, heads, head_dim]

Every op has the leading signature `op(query, key, value, *, mask=None, is_causal=False,
scale=None, **mechanism_args)`; its docstring names the paper and gives the formula.
"""
from __future__ import annotations

import inspect
from typing import Callable

from big_attn.ops.registry import accepts, get, names, register
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


def as_attention_fn(name: str, **mechanism_args) -> Callable:
  """The op `name` as an `attention_fn` for `flax.linen.MultiHeadDotProductAttention`.

  Flax passes `(query, key, value, bias=..., mask=..., dropout_rate=..., deterministic=...,
  dtype=...)`; the mask (Flax's masks may be float: nonzero = attend) and bias are forwarded
  to the op, `mechanism_args` are bound.
  Attention-weight dropout is not supported (the ops never materialise weights for Flax).
  """
  op = get(name)
  accepts_bias = accepts(op, "bias")

  def attention_fn(query, key, value, bias=None, mask=None, dropout_rate=0.0,
                   deterministic=True, dtype=None):
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(
          f"as_attention_fn({name!r}) does not support attention dropout; set "
          "dropout_rate=0.0 or deterministic=True")
    kwargs = dict(mechanism_args)
    if bias is not None:
      if not accepts_bias:
        raise ValueError(f"attention op {name!r} takes no additive bias")
      kwargs["bias"] = bias
    if mask is not None:
      mask = mask.astype(bool)
    out = op(query, key, value, mask=mask, **kwargs)
    return out if dtype is None else out.astype(dtype)

  attention_fn.__name__ = f"{name}_attention_fn"
  return attention_fn


__all__ = ["accepts", "as_attention_fn", "dot_product_attention", "get", "names", "register"]
