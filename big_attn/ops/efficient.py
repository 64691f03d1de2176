"""Memory-efficient vision attention: EfficientViT's cascaded group attention and SHViT's
single-head attention.

- `cascaded_group_attention`: EfficientViT (Liu et al., 2023): head j attends with its own
  projections plus the output of head j−1, and a depthwise convolution on its queries.
- `single_head_attention`: SHViT (Yun and Ro, 2024): one head over a fraction of the channels,
  the others passed through.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import hyena
from big_attn.ops import windowed
from big_attn.ops.registry import BlockForm, OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

# EfficientViT's depthwise kernel on the queries (kernels=[5, 5, 5, 5] in every stage).
CGA_KERNEL = 5
# SHViT's partial ratio: the attended channels are C / 4.67 of the C channels.
SHVIT_RATIO = 1 / 4.67


def _spatial(grid, length: int) -> tuple[int, ...]:
  return (length,) if grid is None else windowed.check_grid(grid, length)


@register("cascaded_group_attention", grid=True,
          block_refusal=(
              "head j's queries, keys and values add head j−1's output over all keys and its "
              "queries are convolved over neighbouring tokens, so each head needs the previous "
              "head's complete result: the heads cannot share one pass of key blocks"))
def cascaded_group_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                             cascade_query=None, cascade_key=None, cascade_value=None,
                             query_conv=None, grid=None, kernel_size=None):
  """Cascaded group attention: EfficientViT: Memory Efficient Vision Transformer with
  Cascaded Group Attention (Liu et al., 2023).

  Head j sees its own split of the features plus the output of head j−1 (EfficientViT's
  X'_j = X_j + X̃_{j−1}, then per-head projections W_j). With the layer's projections
  q_j = X W^Q_j (and k_j, v_j), the cascade adds the previous head's output through per-head
  maps C_j:

      q'_j = DW(q_j + õ_{j−1} C^Q_j),  k'_j = k_j + õ_{j−1} C^K_j,  v'_j = v_j + õ_{j−1} C^V_j,
      õ_j = softmax(s·q'_j k'_jᵀ) v'_j,      õ_{−1} = 0,

  with DW a depthwise convolution of the queries over the tokens (EfficientViT's token
  interaction: 5 x 5 on the `grid=(h, w)` image, 1-D over a sequence; causal padding with
  `is_causal`). The heads run one after the other; the output is [õ_0, ..., õ_{n−1}] (the
  layer's output projection follows). Key/value heads are shared across a query group (GQA)
  before the cascade makes them per head.

  Args:
    query: `[batch, seq, num_heads, head_dim]`.
    key, value: `[batch, seq, num_kv_heads, head_dim | value_dim]` (self-attention).
    mask: boolean, broadcastable to `[batch, num_heads, seq, seq]`.
    is_causal: query i attends keys j <= i; the query convolution sees tokens up to i.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    cascade_query, cascade_key: C^Q, C^K `[num_heads − 1, value_dim, head_dim]`.
    cascade_value: C^V `[num_heads − 1, value_dim, value_dim]`.
    query_conv: optional depthwise kernel `[k, k, num_heads, head_dim]` with a grid,
      `[k, num_heads, head_dim]` without; None: no convolution.
    grid: `(h, w)` of the image (`h·w == seq`) for the 2-D convolution; None: 1-D.
    kernel_size: optional check of k (`CascadedGroupParams` sizes the kernel from it).

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  spatial = check_cascade(query, key, value, cascade_query, cascade_key, cascade_value,
                          query_conv, grid=grid, kernel_size=kernel_size)
  return _cascade(query, key, value, cascade_query, cascade_key, cascade_value, query_conv,
                  common.make_mask(common.check_qkv(query, key, value), mask=mask), scale,
                  spatial=spatial, is_causal=bool(is_causal))


def check_cascade(query, key, value, cascade_query, cascade_key, cascade_value, query_conv, *,
                  grid=None, kernel_size=None) -> tuple[int, ...]:
  """The arguments of `cascaded_group_attention` (arrays or shapes of the whole sequence);
  returns the token layout the query convolution runs on: `grid` or `(seq,)`."""
  dims = common.check_qkv(query, key, value)
  n, d, dv = dims.num_heads, dims.head_dim, dims.value_dim
  if dims.q_len != dims.kv_len:
    raise ValueError("cascaded_group_attention adds a head's output to the next head's keys and "
                     f"values: q_len must equal kv_len, got {dims.q_len} and {dims.kv_len}")
  layout = "[num_heads − 1, value_dim, {}]"
  common.check_weight("cascade_query", cascade_query, (n - 1, dv, d), layout.format("head_dim"))
  common.check_weight("cascade_key", cascade_key, (n - 1, dv, d), layout.format("head_dim"))
  common.check_weight("cascade_value", cascade_value, (n - 1, dv, dv),
                      layout.format("value_dim"))
  spatial = _spatial(grid, dims.q_len)
  if query_conv is not None:
    common.check_float("query_conv", query_conv)
    if (query_conv.ndim != len(spatial) + 2 or query_conv.shape[-2:] != (n, d)
        or len(set(query_conv.shape[:-2])) != 1):
      kernel = ", ".join(["k"] * len(spatial))
      raise ValueError(f"query_conv must have shape [{kernel}, num_heads, head_dim] with "
                       f"num_heads, head_dim = {(n, d)}, got {query_conv.shape}")
    if kernel_size is not None and query_conv.shape[0] != kernel_size:
      raise ValueError(f"kernel_size={kernel_size!r} disagrees with query_conv of shape "
                       f"{query_conv.shape}")
  return spatial


def cascade_heads(query, key, value, cascade_query, cascade_key, cascade_value, *, attend,
                  convolve=None):
  """The heads of `cascaded_group_attention` one after the other, `[batch, seq, num_heads,
  value_dim]`: head j's queries, keys and values add õ_{j−1} through C^Q_j, C^K_j, C^V_j, its
  queries pass through `convolve(j, q)` (`[batch, seq, head_dim]`; None: no convolution), and
  `attend(j, q, k, v)` gives õ_j `[batch, seq, value_dim]`. On one device `attend` is softmax
  attention over the sequence; sequence-parallel (`big_attn.parallel.cascade`) it is a ring
  over the shards and `convolve` sees the neighbouring shards' queries."""
  groups = query.shape[2] // key.shape[2]
  previous = None
  outs = []
  for j in range(query.shape[2]):
    q, k, v = query[:, :, j], key[:, :, j // groups], value[:, :, j // groups]
    if previous is not None:
      q = q + jnp.einsum("btc,cd->btd", previous, cascade_query[j - 1].astype(previous.dtype))
      k = k + jnp.einsum("btc,cd->btd", previous, cascade_key[j - 1].astype(previous.dtype))
      v = v + jnp.einsum("btc,cd->btd", previous, cascade_value[j - 1].astype(previous.dtype))
    if convolve is not None:  # DW on the head's cascaded queries
      q = convolve(j, q)
    previous = attend(j, q, k, v)
    outs.append(previous)
  return jnp.stack(outs, axis=2).astype(query.dtype)


def convolve_query(j: int, q, *, query_conv, spatial: tuple[int, ...], is_causal: bool):
  """Head j's depthwise query convolution of `q` `[batch, seq, head_dim]` laid out on
  `spatial`."""
  b, t, d = q.shape
  q = hyena.short_conv(q.reshape(b, *spatial, 1, d),
                       query_conv[..., j:j + 1, :].astype(q.dtype), is_causal)
  return q.reshape(b, t, d)


@functools.partial(jax.jit, static_argnames=("spatial", "is_causal"))
def _cascade(query, key, value, cascade_query, cascade_key, cascade_value, query_conv, full,
             scale, *, spatial, is_causal):
  """`cascade_heads` on one device, compiled once per configuration."""

  def attend(j, q, k, v):
    head_mask = None if full is None else full[:, j if full.shape[1] != 1 else 0][:, None]
    return dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                 mask=head_mask, is_causal=is_causal, scale=scale,
                                 implementation="xla")[:, :, 0]

  convolve = None
  if query_conv is not None:
    convolve = functools.partial(convolve_query, query_conv=query_conv, spatial=spatial,
                                 is_causal=is_causal)
  return cascade_heads(query, key, value, cascade_query, cascade_key, cascade_value,
                       attend=attend, convolve=convolve)


def _attended_heads(num_heads: int, partial_ratio) -> int:
  """SHViT's m = max(1, round(n/r)) attended heads of n."""
  return max(1, round(num_heads * checks.unit_interval("partial_ratio", partial_ratio)))


def _joined(x, m: int, num_heads: int):
  """The first m (query) heads of `x` `[batch, seq, heads, d]` as one head `[batch, seq, 1,
  m·d]`; key/value heads are repeated to the `num_heads` query heads first (GQA)."""
  groups = num_heads // x.shape[2]
  x = jnp.repeat(x[:, :, :-(-m // groups)], groups, axis=2)[:, :, :m]
  return x.reshape(x.shape[0], x.shape[1], 1, m * x.shape[3])


def _pass_through(attended, query, m: int):
  """The attended head `[batch, seq, 1, m·d]` split back into m heads, then the query's other
  heads: `[batch, seq, num_heads, d]`."""
  b, t, _, d = query.shape
  return jnp.concatenate([attended.reshape(b, t, m, d), query[:, :, m:]], axis=2)


def _check_single_head(query, key, value_dim: int) -> None:
  if query.shape[1] != key.shape[1] or value_dim != query.shape[3]:
    raise ValueError("single_head_attention passes query channels through beside the attended "
                     "ones: q_len must equal kv_len and value_dim head_dim, got query "
                     f"{query.shape}, key {key.shape} and value_dim {value_dim}")


def _single_head_block_form(query, key, scale, *, partial_ratio=SHVIT_RATIO) -> BlockForm:
  """The one attended head's softmax blocks merged through the log-sum-exp; the value map
  joins the attended value channels, the output map appends the passed-through query
  channels."""
  _check_single_head(query, key, query.shape[3])
  n = query.shape[2]
  m = _attended_heads(n, partial_ratio)

  def joined_value(value):
    _check_single_head(query, key, value.shape[3])
    return _joined(value, m, n)

  return BlockForm("softmax", _joined(query, m, n), _joined(key, m, n), scale,
                   value_map=joined_value,
                   output_map=lambda out, _: _pass_through(out, query, m).astype(
                       query.dtype))


@register("single_head_attention", block_form=_single_head_block_form)
def single_head_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                          partial_ratio=SHVIT_RATIO):
  """Single-head attention: SHViT: Single-Head Vision Transformer with Memory Efficient
  Macro Design (Yun and Ro, 2024).

  SHViT splits the C channels into C_p = C/r attended channels and C − C_p passed through
  unchanged, then projects the concatenation. Here the split falls on head boundaries: the
  first m = max(1, round(n/r)) of the n heads form one head of m·head_dim channels,

      out[:, :m] = softmax(s·Q_p K_pᵀ) V_p      (Q_p, K_p, V_p: those heads' channels joined),
      out[:, m:] = Q[:, m:]                     (the other heads' query channels),

  with s = 1/sqrt(m·head_dim). The passed-through channels are the layer's query projection of
  x, a learned linear map of the input as SHViT's identity-then-output-projection is; the
  layer's output projection follows. Masks and causal attention apply to the one head; a query
  row with nothing to attend to returns zeros in every channel. Needs q_len == kv_len and
  value_dim == head_dim.

  Args:
    query: `[batch, seq, num_heads, head_dim]`.
    key, value: `[batch, seq, num_kv_heads, head_dim]` (GQA: key/value heads repeated).
    mask: boolean, broadcastable to `[batch, num_heads, seq, seq]`; only its first head is
      read when it has one per head (there is one attention head).
    is_causal: query i attends keys j <= i.
    scale: logit scale s; `1/sqrt(m·head_dim)` when None.
    partial_ratio: 1/r, the attended fraction of the channels (SHViT: 1/4.67).

  Returns:
    `[batch, seq, num_heads, head_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  _check_single_head(query, key, dims.value_dim)
  m = _attended_heads(dims.num_heads, partial_ratio)
  joined = [_joined(x, m, dims.num_heads) for x in (query, key, value)]
  full = common.make_mask(dims, mask=mask)
  head_mask = None if full is None else full[:, :1]
  attended = dot_product_attention(*joined, mask=head_mask, is_causal=is_causal, scale=scale,
                                   implementation="xla")
  out = _pass_through(attended, query, m)
  return common.apply_row_mask(out, head_mask, dims).astype(query.dtype)


def centred_delta(rank: int) -> Callable:
  """Initialiser of a depthwise kernel `[k, ..., k, ...]` with `rank` spatial axes: 1 at the
  centre tap, 0 elsewhere (the identity convolution)."""

  def init(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.zeros(shape, dtype).at[tuple(size // 2 for size in shape[:rank])].set(1)

  return init


@register_params("cascaded_group_attention")
class CascadedGroupParams(OpParams):
  """The cascade maps and the query convolution of cascaded group attention (EfficientViT).

  `cascade_query`, `cascade_key` `[num_heads − 1, value_dim, head_dim]` and `cascade_value`
  `[num_heads − 1, value_dim, value_dim]` (value_dim the width of the values it is called
  with) with fan-in scaled normal initialisation; `query_conv [k, k, num_heads, head_dim]` on `op_args["grid"]` (`[k,
  num_heads, head_dim]` without one), `k = op_args.get("kernel_size", 5)`, initialised to the
  identity (a centred delta) so the cascade starts as plain per-head attention.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, key
    op_args = self.op_args or {}
    k = checks.positive_int("op_args['kernel_size']", op_args.get("kernel_size", CGA_KERNEL))
    rank = 1 if op_args.get("grid") is None else 2
    n, d, dv = self.num_heads, self.head_dim, value.shape[-1]
    init = nn.initializers.normal(stddev=dv ** -0.5)
    weights = {name: self.param(name, nn.with_logical_partitioning(
        init, ("heads", "head_dim", None)), (n - 1, dv, width), self.param_dtype)
               for name, width in (("cascade_query", d), ("cascade_key", d),
                                   ("cascade_value", dv))}

    axes = ("conv_height", "conv_width")[:rank] + ("heads", "head_dim")
    weights["query_conv"] = self.param("query_conv", nn.with_logical_partitioning(
        centred_delta(rank), axes),
                                       (k,) * rank + (n, d), self.param_dtype)
    names = sorted(weights)
    return dict(zip(names, nn.dtypes.promote_dtype(*(weights[x] for x in names),
                                                    dtype=self.dtype)))
