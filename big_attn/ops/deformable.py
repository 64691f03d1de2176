"""Deformable attention: keys and values sampled at points that the queries move.

- `deformable_attention`: DAT++: Spatially Dynamic Vision Transformer with Deformable
  Attention (Xia et al., 2023; DAT, Vision Transformer with Deformable Attention, 2022).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array

# DAT's offset kernels by stage are 9, 7, 5, 3: the third stage's (the deepest, where most
# deformable blocks sit) is the default; its range factor s = 2; one reference point per token
# (DAT++'s stride 1).
DAT_KERNEL = 5
DAT_OFFSET_RANGE = 2.0
DAT_STRIDE = 1


def bilinear_corners(py: Array, px: Array, height: int, width: int):
  """The four corners of bilinear sampling at `(py, px)` (token units) on a row-major
  `height x width` map: pairs `(flat_index, weight)`, the weight 0 for corners outside the map
  (zero padding, as `grid_sample(padding_mode="zeros")`) and the index then clipped into it; a
  NaN point has NaN weights."""
  y0, x0 = jnp.floor(py), jnp.floor(px)
  corners = []
  for dy in (0, 1):
    for dx in (0, 1):
      y, x = y0 + dy, x0 + dx
      weight = (1 - jnp.abs(py - y)) * (1 - jnp.abs(px - x))
      # Written as "not outside" so that a NaN point keeps its NaN weight.
      inside = ~((y < 0) | (y > height - 1) | (x < 0) | (x > width - 1))
      index = jnp.nan_to_num(jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1))
      index = index.astype(jnp.int32)
      corners.append((index, jnp.where(inside, weight, 0.0)))
  return corners


def _sample(x: Array, grid: tuple[int, int], py: Array, px: Array) -> Array:
  """`x [b, h·w, k, c]` bilinearly sampled at `py, px [b, M, k]` -> `[b, M, k, c]` float32."""
  out = 0.0
  for index, weight in bilinear_corners(py, px, *grid):
    picked = jnp.take_along_axis(x.astype(jnp.float32), index[..., None], axis=1)
    out = out + weight[..., None] * picked
  return out


def _offsets(query, grid, stride, offset_groups, dims, dw_kernel, dw_bias, norm_scale,
             norm_bias, pw_kernel):
  """DAT's offset network on the query groups: depthwise k x k conv with stride r, LayerNorm,
  GELU, pointwise conv to (Δy, Δx). `[b, h·w, n, d]` -> `[b, h'·w', offset_groups, 2]`."""
  (h, w), b = grid, dims.batch
  channels = dims.num_heads // offset_groups * dims.head_dim
  k = dw_kernel.shape[0]
  x = query.astype(jnp.float32).reshape(b, h, w, offset_groups * channels)
  kernel = jnp.tile(dw_kernel.astype(jnp.float32), (1, 1, offset_groups))[:, :, None, :]
  x = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(k // 2, k // 2)] * 2,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=offset_groups * channels)
  x = x.reshape(*x.shape[:3], offset_groups, channels)
  if dw_bias is not None:
    x = x + dw_bias.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(jnp.mean((x - mean) ** 2, axis=-1, keepdims=True) + 1e-5)
  if norm_scale is not None:
    x = x * norm_scale.astype(jnp.float32)
  if norm_bias is not None:
    x = x + norm_bias.astype(jnp.float32)
  x = jax.nn.gelu(x, approximate=False)
  offsets = jnp.einsum("bhwkc,co->bhwko", x, pw_kernel.astype(jnp.float32))
  return offsets.reshape(b, -1, offset_groups, 2)


@register("deformable_attention", causal=False, grid=True)
def deformable_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         grid=None, offset_dw_kernel=None, offset_pw_kernel=None,
                         offset_dw_bias=None, offset_norm_scale=None, offset_norm_bias=None,
                         rpb=None, stride=DAT_STRIDE, offset_range=DAT_OFFSET_RANGE,
                         kernel_size=None, offset_groups=None, clamp=False):
  """Deformable attention: DAT++: Spatially Dynamic Vision Transformer with Deformable
  Attention (Xia et al., 2023), the attention of DAT (Vision Transformer with Deformable
  Attention, 2022).

  Reference points p form a uniform grid on the `grid=(h, w)` image, one per `stride x stride`
  cell (at the cell's centre; every token for stride 1). An offset network θ (DAT's: a
  depthwise k x k convolution with stride r over the queries, LayerNorm, GELU, a pointwise map
  to 2 channels), shared by the `offset_groups` (each reads its own query heads' channels;
  its key/value heads are sampled at its points), moves them; keys and values are sampled bilinearly there (zero outside the image):

      Δp = s·(r/2)·tanh(θ(q)),   k̃ = φ(K; p + Δp),   ṽ = φ(V; p + Δp),
      out_i = Σ_m softmax_m(s_q·q_i·k̃_m + φ(B; r_i − (p_m + Δp_m))) ṽ_m,

  with φ bilinear interpolation (sampling the projected keys and values equals projecting the
  sampled features: both are linear) and B DAT's deformable relative position bias, a
  `[2h−1, 2w−1]` table per head read at the continuous offset between query i at r_i and the
  sampled point. `offset_range` None drops the tanh bound (Δp = θ(q)); `clamp` moves the
  points p + Δp into the image (DAT++'s unbounded offsets). Gradients reach the
  offsets through the bilinear weights. Cost O(seq·h'·w'); no causal form and no key mask
  (keys are sampled points, not tokens).

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, row-major tokens.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: must be None.
    is_causal: must be False.
    scale: logit scale s_q; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    offset_dw_kernel: `[k, k, G·head_dim]`, G = num_heads / offset_groups query heads per
      offset group, k odd.
    offset_pw_kernel: `[G·head_dim, 2]`, to (Δy, Δx) in tokens.
    offset_dw_bias, offset_norm_scale, offset_norm_bias: optional `[G·head_dim]`, the
      convolution's bias and the LayerNorm's affine parameters.
    rpb: optional B `[num_heads, 2h−1, 2w−1]`, offset (0, 0) at `(h−1, w−1)`.
    stride: r, the reference-point spacing (DAT++: 1, one point per token).
    offset_range: s, DAT's range factor (2), or None.
    kernel_size: optional check of k.
    offset_groups: groups of heads sharing one set of sampling points, dividing
      num_kv_heads (DAT's `n_groups`, with key/value heads per query head); None:
      num_kv_heads, one group per key/value head.
    clamp: clip the sampling points to `[0, h−1] x [0, w−1]` (DAT++).

  Returns:
    `[batch, h·w, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("deformable_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  if mask is not None:
    raise ValueError("deformable_attention samples its keys at points between tokens: mask "
                     "must be None")
  if dims.q_len != dims.kv_len:
    raise ValueError("deformable_attention samples keys on the queries' image: q_len must "
                     f"equal kv_len, got {dims.q_len} and {dims.kv_len}")
  h, w = grid = windowed.check_grid(grid, dims.q_len)
  stride = checks.positive_int("stride", stride)
  if offset_range is not None:
    offset_range = checks.positive_float("offset_range", offset_range)
  if not isinstance(clamp, bool):
    raise ValueError(f"clamp must be a bool, got {clamp!r}")
  if offset_groups is None:
    offset_groups = dims.num_kv_heads
  offset_groups = checks.positive_int("offset_groups", offset_groups)
  if dims.num_kv_heads % offset_groups:
    raise ValueError(f"offset_groups must divide num_kv_heads {dims.num_kv_heads}, got "
                     f"{offset_groups}")
  channels = dims.num_heads // offset_groups * dims.head_dim
  k = offset_dw_kernel.shape[0] if getattr(offset_dw_kernel, "ndim", 0) == 3 else kernel_size
  if not isinstance(k, int) or k % 2 == 0 or (kernel_size is not None and k != kernel_size):
    raise ValueError(f"offset_dw_kernel must be [k, k, G·head_dim] with k odd (and equal to "
                     f"kernel_size={kernel_size!r}), got "
                     f"{getattr(offset_dw_kernel, 'shape', offset_dw_kernel)!r}")
  common.check_weight("offset_dw_kernel", offset_dw_kernel, (k, k, channels),
                      "[k, k, G·head_dim]")
  common.check_weight("offset_pw_kernel", offset_pw_kernel, (channels, 2), "[G·head_dim, 2]")
  for name, x in (("offset_dw_bias", offset_dw_bias), ("offset_norm_scale", offset_norm_scale),
                  ("offset_norm_bias", offset_norm_bias)):
    if x is not None:
      common.check_weight(name, x, (channels,), "[G·head_dim]")
  if rpb is not None:
    common.check_weight("rpb", rpb, (dims.num_heads, 2 * h - 1, 2 * w - 1),
                        "[num_heads, 2h−1, 2w−1]")

  return _deformable(query, key, value, offset_dw_kernel, offset_pw_kernel, offset_dw_bias,
                     offset_norm_scale, offset_norm_bias, rpb, scale, grid=grid, stride=stride,
                     offset_range=offset_range, offset_groups=offset_groups, clamp=clamp)


@functools.partial(jax.jit, static_argnames=("grid", "stride", "offset_range", "offset_groups",
                                             "clamp"))
def _deformable(query, key, value, dw_kernel, pw_kernel, dw_bias, norm_scale, norm_bias, rpb,
                scale, *, grid, stride, offset_range, offset_groups, clamp):
  """The body of `deformable_attention` after its checks, compiled once per configuration."""
  dims = common.check_qkv(query, key, value)
  h, w = grid
  offsets = _offsets(query, grid, stride, offset_groups, dims, dw_kernel, dw_bias, norm_scale,
                     norm_bias, pw_kernel)
  if offset_range is not None:
    offsets = offset_range * (stride / 2) * jnp.tanh(offsets)
  rows, cols = -(-h // stride), -(-w // stride)
  ref_y = np.minimum(np.arange(rows) * stride + (stride - 1) / 2, h - 1)
  ref_x = np.minimum(np.arange(cols) * stride + (stride - 1) / 2, w - 1)
  ref = np.stack(np.broadcast_arrays(ref_y[:, None], ref_x[None, :]), -1).reshape(-1, 1, 2)
  points = jnp.asarray(ref, jnp.float32) + offsets  # [b, M, offset_groups, 2]
  points = jnp.repeat(points, dims.num_kv_heads // offset_groups, axis=2)  # [b, M, k, 2]
  if clamp:
    points = jnp.clip(points, 0.0, jnp.asarray([h - 1, w - 1], jnp.float32))
  py, px = points[..., 0], points[..., 1]
  sampled_key = _sample(key, grid, py, px).astype(key.dtype)
  sampled_value = _sample(value, grid, py, px).astype(value.dtype)
  bias = None
  if rpb is not None:
    pos = np.arange(h * w)
    qy = jnp.asarray(pos // w, jnp.float32)[None, None, :, None]
    qx = jnp.asarray(pos % w, jnp.float32)[None, None, :, None]
    to_heads = lambda p: jnp.repeat(jnp.moveaxis(p, 2, 1), dims.groups, axis=1)[:, :, None]  # pylint: disable=unnecessary-lambda-assignment
    rel_y = qy - to_heads(py) + (h - 1)  # [b, n, t, M]
    rel_x = qx - to_heads(px) + (w - 1)
    table = rpb.astype(jnp.float32).reshape(dims.num_heads, -1)
    heads = jnp.arange(dims.num_heads)[None, :, None, None]
    bias = sum(weight * table[heads, index]
               for index, weight in bilinear_corners(rel_y, rel_x, 2 * h - 1, 2 * w - 1))
  return dot_product_attention(query, sampled_key, sampled_value, bias=bias, scale=scale,
                               implementation="xla")


@register_params("deformable_attention")
class DeformableParams(OpParams):
  """DAT's offset network and deformable relative position bias.

  `op_args`: `kernel_size` k (5), `grid` (for the bias table), `offset_groups` (G =
  num_heads / offset_groups; num_kv_heads when absent). Owns `offset_dw_kernel [k, k,
  G·head_dim]` (fan-in scaled normal) and `offset_dw_bias` (zeros), `offset_norm_scale`
  (ones) and `offset_norm_bias` (zeros), `offset_pw_kernel [G·head_dim, 2]` (normal, std
  0.01: small offsets at first) and `rpb [num_heads, 2h−1, 2w−1]` (truncated normal, std
  0.01, as DAT's table).
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, value
    op_args = self.op_args or {}
    k = checks.positive_int("op_args['kernel_size']", op_args.get("kernel_size", DAT_KERNEL))
    h, w = windowed.patch_grid(op_args, key.shape[1])
    offset_groups = checks.positive_int("op_args['offset_groups']",
                                        op_args.get("offset_groups") or self.num_kv_heads)
    channels = self.num_heads // offset_groups * self.head_dim
    param = lambda name, init, shape, axes: self.param(  # pylint: disable=unnecessary-lambda-assignment
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    weights = {
        "offset_dw_kernel": param("offset_dw_kernel", nn.initializers.normal(stddev=1 / k),
                                  (k, k, channels), ("conv_height", "conv_width", None)),
        "offset_dw_bias": param("offset_dw_bias", nn.initializers.zeros_init(), (channels,),
                                (None,)),
        "offset_norm_scale": param("offset_norm_scale", nn.initializers.ones_init(),
                                   (channels,), (None,)),
        "offset_norm_bias": param("offset_norm_bias", nn.initializers.zeros_init(),
                                  (channels,), (None,)),
        "offset_pw_kernel": param("offset_pw_kernel", nn.initializers.normal(stddev=0.01),
                                  (channels, 2), (None, None)),
        "rpb": param("rpb", nn.initializers.truncated_normal(stddev=0.01),
                     (self.num_heads, 2 * h - 1, 2 * w - 1), ("heads", None, None)),
    }
    names = sorted(weights)
    return dict(zip(names, nn.dtypes.promote_dtype(*(weights[x] for x in names),
                                                    dtype=self.dtype)))
