"""nGPT attention: softmax attention of unit-norm queries and keys scaled by a learned s_qk.

nGPT: Normalized Transformer with Representation Learning on the Hypersphere (Loshchilov et
al., 2024), Section 2.3.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / ‖x‖ along `axis` (computed in float32, returned in x's dtype); 0 stays 0."""
  x32 = x.astype(jnp.float32)
  norm2 = jnp.sum(x32 * x32, axis=axis, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(norm2, eps))).astype(x.dtype)


def _check_scaling(name: str, s: Array | None, heads: int, head_dim: int) -> None:
  if s is None:
    return
  common.check_float(name, s)
  if s.shape not in ((head_dim,), (heads, head_dim), (1, head_dim)):
    raise ValueError(f"{name} must have shape [head_dim] = ({head_dim},) or [heads, head_dim] = "
                     f"({heads}, {head_dim}), got {tuple(s.shape)}")


def normalize_qk(query: Array, key: Array, *, s_qk: Array | None = None,
                 s_k: Array | None = None) -> tuple[Array, Array]:
  """nGPT's queries and keys: q ← s_qk ⊙ q/‖q‖, k ← s_k ⊙ k/‖k‖ per head (s_k = s_qk by
  default, which then needs as many key heads as query heads unless s_qk is `[head_dim]`).

  The arrays are `[batch, seq, heads, head_dim]`; the scalings are `[head_dim]` or
  `[heads, head_dim]` (already restored, s_qk·(s_qk_init/s_qk_scale)).
  """
  num_heads, head_dim = query.shape[2], query.shape[3]
  num_kv_heads = key.shape[2]
  _check_scaling("s_qk", s_qk, num_heads, head_dim)
  if s_k is None and s_qk is not None and s_qk.ndim == 2 and s_qk.shape[0] not in (
      1, num_kv_heads):
    raise ValueError(f"s_qk has {s_qk.shape[0]} heads but key has {num_kv_heads}: pass s_k "
                     "[num_kv_heads, head_dim] for grouped-query attention")
  s_k = s_qk if s_k is None else s_k
  _check_scaling("s_k", s_k, num_kv_heads, head_dim)
  q, k = l2_normalize(query), l2_normalize(key)
  if s_qk is not None:
    q = (q * s_qk.astype(jnp.float32)).astype(query.dtype)
  if s_k is not None:
    k = (k * s_k.astype(jnp.float32)).astype(key.dtype)
  return q, k


def ngpt_scale(head_dim: int, scale: float | None) -> float:
  """nGPT's softmax scale √d_k (q·k is a cosine times the scalings), or `scale` if given."""
  return head_dim ** 0.5 if scale is None else scale


def _ngpt_form(query, key, scale, **op_args):
  """nGPT attention as softmax attention: `normalize_qk` queries and keys, scale √d_k."""
  query, key = normalize_qk(query, key, **op_args)
  return query, key, ngpt_scale(query.shape[-1], scale)


@register("ngpt", segment_ids=True, implementation=True, softmax_form=_ngpt_form)
def ngpt_attention(query, key, value, *, mask=None, is_causal=False, scale=None, s_qk=None,
                   s_k=None, segment_ids=None, implementation=None):
  """nGPT attention (Loshchilov et al., 2024, "nGPT: Normalized Transformer with Representation
  Learning on the Hypersphere", Section 2.3):

      q̂_i = s_qk ⊙ q_i/‖q_i‖,   k̂_j = s_qk ⊙ k_j/‖k_j‖,
      o_i = Σ_j softmax_j(√d_k · q̂_i·k̂_j) v_j,

  per head; s_qk is a learned `[heads, head_dim]` (or `[head_dim]`) scaling, restored by the
  caller as s_qk·(s_qk_init/s_qk_scale) (`NGPTParams` below owns it). The
  softmax scale is √d_k instead of 1/√d_k because q̂·k̂ is a cosine (times s_qk²).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends keys j <= i.
    scale: softmax scale; √head_dim when None.
    s_qk: query (and by default key) scaling; None means 1 (plain cosine attention).
    s_k: separate key scaling `[num_kv_heads, head_dim]` (grouped-query attention).
    segment_ids: as in `dot_product_attention`.
    implementation: backend of the inner `dot_product_attention` ("pallas": the flash
      kernel on the normalised queries and keys).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  q, k = normalize_qk(query, key, s_qk=s_qk, s_k=s_k)
  return dot_product_attention(q, k, value, mask=mask, is_causal=is_causal,
                               segment_ids=segment_ids, scale=ngpt_scale(dims.head_dim, scale),
                               implementation=implementation)


@register_params("ngpt")
class NGPTParams(OpParams):
  """nGPT's query/key scaling s_qk (Loshchilov et al. 2024, Section 2.3), `[num_heads,
  head_dim]`, stored as s_qk_scale = 1/√features and restored as s_qk·(s_qk_init/s_qk_scale)
  with s_qk_init = 1 (the paper's reparametrisation). With grouped-query attention a second
  `s_k [num_kv_heads, head_dim]` scales the keys. Returns `{"s_qk"}` (and `{"s_k"}`).
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    scale = inputs_q.shape[-1] ** -0.5
    out = {}
    for name, heads in (("s_qk", self.num_heads), ("s_k", self.num_kv_heads)):
      if name == "s_k" and heads == self.num_heads:
        break
      s = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(scale),
                                                        ("heads", "head_dim")),
                     (heads, self.head_dim), self.param_dtype)
      (s,) = nn.dtypes.promote_dtype(s / scale, dtype=self.dtype)
      out[name] = s
    return out
