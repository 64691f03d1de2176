"""Attention over a reduced axis: spatially reduced keys/values, and attention across channels.

- `spatial_reduction`: PVT / Twins-SVT global sub-sampled attention, MViTv2 pooling attention,
  CvT-style strided key/value reduction: keys and values come from a downsampled token map.
- `channel_attention`: DaViT channel group attention, a `[head_dim, head_dim]` attention map
  per head with the sequence as the contracted axis: linear in the sequence length.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

METHODS = ("avg", "conv")


def _check_sr_kernel(name: str, kernel, size: tuple[int, int], num_kv_heads: int,
                     channels: int):
  """`[rh, rw, channels]` (shared by all heads) or `[rh, rw, num_kv_heads, channels]`."""
  if kernel is None:
    raise ValueError(f"method='conv' needs {name}: [rh, rw, channels] or "
                     f"[rh, rw, num_kv_heads, channels] with (rh, rw) = {size}")
  common.check_float(name, kernel)
  shared, per_head = size + (channels,), size + (num_kv_heads, channels)
  if kernel.shape not in (shared, per_head):
    raise ValueError(f"{name} must have shape {shared} (shared by the heads) or {per_head}, "
                     f"got {kernel.shape}")
  return kernel.reshape(size[0] * size[1], -1, channels)  # [rh·rw, k|1, channels]


def _reduce(x, grid, size, kernel):
  """`[b, h·w, k, c]` -> `[b, (h/rh)·(w/rw), k, c]`: mean or kernel-weighted sum per patch."""
  patches = windowed.to_groups(x, grid, size, dilated=False)  # [b, P, rh·rw, k, c]
  if kernel is None:
    out = jnp.mean(patches.astype(jnp.float32), axis=2)
  else:
    out = jnp.einsum("bpwkc,wkc->bpkc", patches, kernel.astype(x.dtype),
                     preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


# PVT's and Twins-SVT's reduction ratio of the first stage (R = 8; 4, 2, 1 later).
PVT_REDUCTION = 8
# The fewest reduced keys per side the default ratio leaves (a side shorter than this keeps its
# tokens): R = 8 on a side of 4 would leave one key, and softmax over one key passes no gradient
# to the queries.
MIN_REDUCED_SIDE = 2


def default_reduction(grid: tuple[int, int]) -> tuple[int, int]:
  """PVT's R = 8 per side, clipped to the largest divisor of the side that leaves at least
  `MIN_REDUCED_SIDE` reduced tokens along it (1 for a side shorter than that)."""
  return tuple(common.largest_divisor(side, max(1, min(PVT_REDUCTION, side // MIN_REDUCED_SIDE)))
               for side in grid)


@register("spatial_reduction", causal=False, implementation=True, grid=True)
def spatial_reduction_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                                grid=None, reduction=None, method="avg", sr_key_kernel=None,
                                sr_value_kernel=None, implementation=None):
  """Spatial-reduction attention: Pyramid Vision Transformer (Wang et al., 2021) and Twins
  global sub-sampled attention (Chu et al., 2021); MViTv2 pooling attention (Li et al., 2022);
  CvT convolutional projection (Wu et al., 2021).

  Keys and values on the `grid=(h, w)` image are reduced over non-overlapping `r_h × r_w`
  patches P_p before a softmax attention that every query sees in full:

      K'_p = R(K)_p,  V'_p = R(V)_p,  out = softmax(s·Q K'ᵀ) V'

  with R the average over the patch (`method="avg"`, MViTv2 average pooling) or a depthwise
  strided convolution with kernel size = stride = r (`method="conv"`: R(X)_p = Σ_{o∈r_h×r_w}
  W_o ⊙ X_{p·r+o}, the patch geometry of PVT/Twins) with separate kernels for keys and values.
  The op acts on the projected heads, as MViTv2's pooling does. Not covered here: PVT/Twins
  convolve (channel-mixing) before the projection, CvT and MViTv2 use overlapping kernels
  (3×3, stride r), and all of them normalise after the reduction; those are layer choices.
  Cost O(q_len·h·w/(r_h·r_w)). No causal form. Queries need not be on the
  grid (cross-attention to a reduced image works).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`, row-major image tokens.
    mask: optional boolean mask over the REDUCED keys, broadcastable to `[batch, num_heads,
      q_len, (h/r_h)·(w/r_w)]`.
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)` of the key/value image.
    reduction: ratio r (an int or `(r_h, r_w)`) dividing `(h, w)`; default PVT's and Twins'
      first-stage R = 8, per side the largest divisor of the grid's side up to 8 that leaves
      at least 2 reduced tokens along the side (`default_reduction`: 4 on an 8 x 8 map, 2 on
      4 x 4).
    method: "avg" or "conv".
    sr_key_kernel, sr_value_kernel: `method="conv"` weights, `[r_h, r_w, channels]` (shared
      by all kv heads, as MViTv2) or `[r_h, r_w, num_kv_heads, channels]`.
    implementation: backend of the inner `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("spatial_reduction", is_causal)
  dims = common.check_qkv(query, key, value)
  grid = windowed.check_grid(grid, dims.kv_len)
  size = (default_reduction(grid) if reduction is None
          else windowed.check_partition("reduction", reduction, grid, PVT_REDUCTION))
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "conv":
    key_kernel = _check_sr_kernel("sr_key_kernel", sr_key_kernel, size, dims.num_kv_heads,
                                  dims.head_dim)
    value_kernel = _check_sr_kernel("sr_value_kernel", sr_value_kernel, size,
                                    dims.num_kv_heads, dims.value_dim)
  elif sr_key_kernel is not None or sr_value_kernel is not None:
    raise ValueError("sr_key_kernel/sr_value_kernel are only used with method='conv', got "
                     f"method={method!r}")
  else:
    key_kernel = value_kernel = None
  reduced_key = _reduce(key, grid, size, key_kernel)
  reduced_value = _reduce(value, grid, size, value_kernel)
  return dot_product_attention(query, reduced_key, reduced_value, mask=mask, scale=scale,
                               implementation=implementation)


@register("channel_attention", causal=False)
def channel_attention(query, key, value, *, mask=None, is_causal=False, scale=None):
  """Channel group attention: DaViT, Dual Attention Vision Transformers (Ding et al., 2022).

  Each head is a group of C = head_dim channels; tokens are the contracted axis, so the
  attention map is `[C, C]` per head and the cost is linear in the sequence length:

      A = softmax_row(s · Qᵀ K)   (A_{c,c'} = softmax_{c'}(s·Σ_t Q_{t,c} K_{t,c'}))
      out = V Aᵀ                  (out_{t,c} = Σ_{c'} A_{c,c'} V_{t,c'})

  The official code feeds the projected q/k/v into these roles in another order; with learned
  projections the mechanisms are the same. Masks: a token is dropped from the sum over t when
  no query may attend to it (key padding), and query rows with nothing to attend to return
  zeros. No causal form (every channel map sums over all tokens).

  Args:
    query: `[batch, seq, num_heads, head_dim]`.
    key: `[batch, seq, num_kv_heads, head_dim]`.
    value: `[batch, seq, num_kv_heads, head_dim]` (same length and width as the query).
    mask: optional boolean key-padding mask broadcastable to `[batch, num_heads, seq, seq]`.
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None (DaViT's choice).

  Returns:
    `[batch, seq, num_heads, head_dim]` in the query's dtype.
  """
  common.check_no_causal("channel_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len:
    raise ValueError("channel_attention contracts the sequence of queries and keys: q_len must "
                     f"equal kv_len, got {dims.q_len} and {dims.kv_len}")
  if dims.value_dim != dims.head_dim:
    raise ValueError(f"channel_attention mixes the head's channels: value head_dim "
                     f"({dims.value_dim}) must equal the query head_dim ({dims.head_dim})")
  scale = common.default_scale(dims.head_dim, scale)
  q = common.group_query(query, dims.num_kv_heads)  # [b, t, k, g, c]
  full = common.make_mask(dims, mask=mask)
  if full is not None:
    used = jnp.any(full, axis=2)  # [b|1, n|1, t]: tokens some query may attend to
    used = used.reshape(used.shape[0], *((dims.num_kv_heads, dims.groups)
                                         if used.shape[1] != 1 else (1, 1)), dims.kv_len)
    q = jnp.where(jnp.moveaxis(used, 3, 1)[..., None], q, np.zeros((), q.dtype))
  logits = jnp.einsum("btkgc,btke->bkgce", q, key,
                      preferred_element_type=jnp.float32) * jnp.float32(scale)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgce,btke->btkgc", probs.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  out = out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.head_dim)
  return common.apply_row_mask(out, full, dims).astype(query.dtype)


@register_params("spatial_reduction")
class SpatialReductionParams(OpParams):
  """Depthwise strided reduction kernels of spatial-reduction attention with
  `op_args["method"] == "conv"` (MViTv2 conv pooling; the PVT/Twins reduction applied to the
  projected heads): `sr_key_kernel [r_h, r_w, head_dim]` and `sr_value_kernel [r_h, r_w,
  value_dim]`, shared by the heads as in MViTv2, initialised to average pooling (1/(r_h·r_w)).
  Returns `{}` for `method="avg"`, which has no weights.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query
    op_args = self.op_args or {}
    if op_args.get("method", "avg") != "conv":
      return {}
    reduction = op_args.get("reduction")
    if reduction is None:  # The op's default, which depends on the grid.
      rh, rw = windowed.check_partition(
          "reduction", None, windowed.patch_grid(op_args, key.shape[1]), PVT_REDUCTION)
    else:
      rh, rw = checks.int_tuple("op_args['reduction']", reduction)
    init = nn.initializers.constant(1.0 / (rh * rw))
    kernels = {}
    for name, x in (("sr_key_kernel", key), ("sr_value_kernel", value)):
      kernels[name] = self.param(
          name, nn.with_logical_partitioning(init, ("conv_height", "conv_width", "head_dim")),
          (rh, rw, x.shape[-1]), self.param_dtype)
    key_kernel, value_kernel = nn.dtypes.promote_dtype(
        kernels["sr_key_kernel"], kernels["sr_value_kernel"], dtype=self.dtype)
    return {"sr_key_kernel": key_kernel, "sr_value_kernel": value_kernel}
