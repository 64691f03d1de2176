"""Hyena: data-controlled gating of implicit long convolutions, evaluated by FFT.

Hyena Hierarchy: Towards Larger Convolutional Language Models (Poli et al., 2023), and its 2-D
form over image tokens (HyenaPixel: Global Image Context with Convolutions, Spravil et al.,
2024). The op takes the projections and the filters; `big_attn.layers.hyena` owns the implicit
filter network, the short convolutions and the extra gate projections of orders above 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import register

Array = jax.Array


def _spatial(grid, length: int) -> tuple[int, ...]:
  """The token layout: `(length,)` for a sequence, `(h, w)` for a row-major `grid`."""
  return (length,) if grid is None else windowed.check_grid(grid, length)


def _filter_layout(filters: Array, order: int, spatial: tuple[int, ...], heads: int,
                   head_dim: int, is_causal: bool) -> bool:
  """Checks `filters`; True when they hold only the causal taps (offsets 0..n−1 per axis)."""
  common.check_float("filters", filters)
  centred = (order, *(2 * n - 1 for n in spatial), heads, head_dim)
  causal = (order, *spatial, heads, head_dim)
  shape = tuple(filters.shape)
  if shape == centred:
    return False
  if shape == causal and is_causal:
    return True
  layout = "[order, " + ", ".join(f"2·{n}−1" for n in spatial) + ", heads, head_dim]"
  raise ValueError(
      f"filters must have shape {layout} = {centred} (taps at offsets −(n−1)..n−1) or, with "
      f"is_causal=True, {causal} (offsets 0..n−1), got {shape}")


def _long_conv(z: Array, filt: Array, spatial: tuple[int, ...], causal_taps: bool,
               is_causal: bool) -> Array:
  """`(h * z)_t = Σ_s h_{t−s} z_s` over the token axes by FFT of size 2n per axis.

  z `[b, *spatial, heads, head_dim]`; filt `[*f, heads, head_dim]` with f = n (causal taps,
  offset r at index r) or 2n − 1 (centred, offset r at index n − 1 + r). With `is_causal` only
  offsets r ≥ 0 contribute (a centred filter's negative half is dropped).
  """
  rank = len(spatial)
  if is_causal and not causal_taps:
    filt = filt[tuple(slice(n - 1, None) for n in spatial)]
    causal_taps = True
  sizes = tuple(2 * n for n in spatial)
  z_f = jnp.fft.rfftn(z, s=sizes, axes=tuple(range(1, rank + 1)))
  f_f = jnp.fft.rfftn(filt, s=sizes, axes=tuple(range(rank)))
  y = jnp.fft.irfftn(z_f * f_f, s=sizes, axes=tuple(range(1, rank + 1)))
  # Linear convolution of length ≤ 3n − 2 fits in 2n for the entries kept: t (causal taps) or
  # t + n − 1 (centred taps), t < n.
  start = [0 if causal_taps else n - 1 for n in spatial]
  return y[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, spatial))]


def _long_conv_segments(z: Array, filt: Array, causal_taps: bool, is_causal: bool,
                        same: Array) -> Array:
  """`_long_conv` over a 1-D sequence of packed segments: `(h * z)_t = Σ_s h_{t−s} z_s` over
  the tokens s of t's segment (`same [b, t, s]`), as a dense Toeplitz product, O(n²) per
  channel."""
  n = z.shape[1]
  if is_causal and not causal_taps:
    filt = filt[n - 1:]
    causal_taps = True
  offset = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]  # r = t − s
  index = offset if causal_taps else offset + n - 1
  reach = (offset >= 0) if causal_taps else jnp.ones((n, n), bool)
  taps = filt[jnp.clip(index, 0, filt.shape[0] - 1)]  # [t, s, heads, head_dim]
  weights = jnp.where((reach & same)[..., None, None], taps, 0.0)  # [b, t, s, heads, head_dim]
  return jnp.einsum("btsnd,bsnd->btnd", weights, z)


def _short_conv_segments(x: Array, kernel: Array, is_causal: bool, seg: Array) -> Array:
  """`short_conv` over a 1-D sequence of packed segments: taps reaching into another segment
  (`seg [b, seq]`) read zeros, as at the ends of a sequence."""
  size, n = kernel.shape[0], x.shape[1]
  left = size - 1 if is_causal else (size - 1) // 2
  pad = [(0, 0), (left, size - 1 - left)]
  x_pad = jnp.pad(x, pad + [(0, 0)] * 2)
  seg_pad = jnp.pad(seg, pad)
  inside = jnp.pad(jnp.ones(seg.shape, bool), pad)
  out = jnp.zeros_like(x)
  for j in range(size):  # tap j reads token t + j − left
    keep = inside[:, j:j + n] & (seg_pad[:, j:j + n] == seg)
    out = out + kernel[j].astype(x.dtype) * jnp.where(keep[..., None, None],
                                                      x_pad[:, j:j + n], 0.0)
  return out


def short_conv(x: Array, kernel: Array, is_causal: bool) -> Array:
  """Depthwise `y_t = Σ_j w_j x_{t+j−p}` per channel, p = k − 1 (causal) or ⌊(k − 1)/2⌋.

  x `[b, *spatial, heads, head_dim]`; kernel `[*k, heads, head_dim]`.
  """
  b, *spatial, heads, head_dim = x.shape
  channels = heads * head_dim
  k = kernel.shape[:-2]
  padding = [(n - 1, 0) if is_causal else ((n - 1) // 2, n - 1 - (n - 1) // 2) for n in k]
  spec = ("NHWC", "HWIO", "NHWC") if len(k) == 2 else ("NWC", "WIO", "NWC")
  y = jax.lax.conv_general_dilated(
      x.reshape(b, *spatial, channels), kernel.reshape(*k, 1, channels).astype(x.dtype),
      window_strides=(1,) * len(k), padding=padding, dimension_numbers=spec,
      feature_group_count=channels)
  return y.reshape(x.shape)


def _key_padding(mask, dims: common.Dims) -> Array | None:
  """A key-padding mask `[b|1, n|1, 1, seq]` as token validity `[b|1, seq, n|1, 1]`."""
  if mask is None:
    return None
  mask = common.make_mask(dims, mask=mask)
  if mask.shape[2] != 1:
    raise ValueError(
        "hyena is a convolution, not a weighting of keys per query: mask must be a key-padding "
        f"mask [batch|1, heads|1, 1, seq], got shape {mask.shape}")
  return jnp.transpose(mask, (0, 3, 1, 2))


@register("hyena", grid=True, segment_ids=True)
def hyena(query, key, value, *, mask=None, is_causal=False, scale=None, segment_ids=None,
          filters=None,
          filter_bias=None, short_filters=None, gates=None, grid=None, order=None,
          short_kernel=None, max_len=None):
  """The order-N Hyena operator (Hyena Hierarchy, Poli et al. 2023, Def. 3.1; HyenaPixel).

  With the projections x_1 = key, x_2..x_{N−1} = gates, x_N = query and the long filters
  h_1..h_N (per channel):

      z_1 = v,   z_{n+1} = x_n ⊙ (h_n * z_n + D_n ⊙ z_n),   y = z_{N+1};

  order 2 is the paper's y = q ⊙ (h_2 * (k ⊙ (h_1 * v))) (D_n = 0 without `filter_bias`). The
  convolution (h * z)_t = Σ_s h_{t−s} z_s runs over the sequence, or over the rows and columns
  of the row-major `grid=(h, w)` image (HyenaPixel), by FFT in O(L log L). Non-causal filters
  are centred (every token sees every other); causal ones keep offsets t − s ≥ 0 (on a grid:
  both offsets ≥ 0, the upper-left quadrant, which lies in the raster-order past). Before the
  gating, each of v, x_1..x_N is optionally filtered by a short depthwise convolution
  (`short_filters`, the paper's short filters on the projections).

  Args:
    query, key, value: `[batch, seq, heads, head_dim]` of one length and width; key and value
      may have fewer heads (GQA: each gates the query heads of its group).
    mask: key-padding mask `[batch|1, heads|1, 1, seq]` (True = token present): padded tokens
      are zeroed on input, before every long convolution and in the output.
    is_causal: causal convolutions (decoder LMs).
    scale: unused by Hyena; must be None.
    segment_ids: `[batch, seq]` ints of packed 1-D sequences: every convolution (long and
      short) stays within a segment, each segment computing as if run alone (the long
      convolutions then run as dense Toeplitz products, O(seq²) per channel).
    filters: `[N, *f, heads, head_dim]`, the filters h_1..h_N with f = 2n − 1 per token axis
      of size n (offset r at index n − 1 + r); with `is_causal`, also f = n (offset r at r).
    filter_bias: optional `[N, heads, head_dim]`, the skip terms D_n.
    short_filters: optional `[N + 1, *k, heads, head_dim]`, depthwise kernels for (v, x_1, ...,
      x_N), padded to keep the length (causal: on the left).
    gates: `[N − 2, batch, seq, heads, head_dim]`, the projections x_2..x_{N−1} (order > 2).
    grid: `(h, w)` with `h·w == seq` for image tokens (2-D convolutions); None: 1-D.
    order, short_kernel, max_len: optional checks that N and the short kernel size k are as
      expected and that no token axis is longer than `max_len` (an int, or a pair with `grid`),
      the reach the implicit filters were scaled to (`big_attn.layers.hyena`'s `op_args`).

  Returns:
    `[batch, seq, heads, head_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len or dims.value_dim != dims.head_dim:
    raise ValueError(
        "hyena gates channel by channel: query, key and value must have the same length and "
        f"head_dim, got {query.shape}, {key.shape} and {value.shape}")
  # Grouped-query heads: a key/value head gates every query head of its group.
  key, value = (jnp.repeat(x, dims.groups, axis=2) for x in (key, value))
  if scale is not None:
    raise ValueError(f"hyena has no scale, got scale={scale!r}")
  if filters is None:
    raise ValueError("filters [order, *filter_size, heads, head_dim] are required")
  common.check_float("filters", filters)
  n_order = filters.shape[0] if filters.ndim else 0
  if order is not None and order != n_order:
    raise ValueError(f"order={order!r} but filters hold {n_order} filters")
  if n_order < 2:
    raise ValueError(f"hyena needs order >= 2 (filters.shape[0]), got {n_order}")
  spatial = _spatial(grid, dims.q_len)
  if segment_ids is not None:
    if grid is not None:
      raise ValueError(f"hyena: segment_ids are packed 1-D sequences; got grid={grid!r}")
    same, _ = common.segment_layout(segment_ids, dims)
    seg = common.normalize_segment_ids(segment_ids, dims)[1]
  shape = (dims.num_heads, dims.head_dim)
  causal_taps = _filter_layout(filters, n_order, spatial, *shape, is_causal)
  if filter_bias is not None:
    common.check_weight("filter_bias", filter_bias, (n_order, *shape), "[order, heads, head_dim]")
  if n_order > 2 or gates is not None:
    common.check_weight("gates", gates, (n_order - 2, *query.shape),
                        "[order − 2, batch, seq, heads, head_dim]")
  if short_filters is not None:
    common.check_float("short_filters", short_filters)
    k = short_filters.shape[1:-2]
    if (short_filters.ndim != len(spatial) + 3 or short_filters.shape[0] != n_order + 1
        or tuple(short_filters.shape[-2:]) != shape or min(k, default=0) < 1):
      raise ValueError(
          f"short_filters must have shape [order + 1, {', '.join(['k'] * len(spatial))}, heads, "
          f"head_dim] with order + 1 = {n_order + 1}, heads, head_dim = {shape}, got "
          f"{short_filters.shape}")
    if short_kernel is not None and any(n != short_kernel for n in k):
      raise ValueError(f"short_kernel={short_kernel!r} disagrees with short_filters of shape "
                       f"{short_filters.shape}")
  elif short_kernel:
    raise ValueError(f"short_kernel={short_kernel!r} needs short_filters")

  if max_len is not None:
    reach = (max_len,) * len(spatial) if isinstance(max_len, int) else tuple(max_len)
    if len(reach) != len(spatial) or any(n > m for n, m in zip(spatial, reach)):
      raise ValueError(f"the token layout {spatial} exceeds max_len={max_len!r}")

  dtype = jnp.promote_types(query.dtype, jnp.float32)
  valid = _key_padding(mask, dims)
  b = dims.batch

  def prepare(x):  # [b, L, n, d] -> [b, *spatial, n, d], padded tokens zeroed
    x = x.astype(dtype)
    if valid is not None:
      x = jnp.where(valid, x, 0.0)
    return x.reshape(b, *spatial, *shape)

  inputs = [value, key] + ([] if gates is None else list(gates)) + [query]
  inputs = [prepare(x) for x in inputs]
  if short_filters is not None:
    inputs = [short_conv(x, w.astype(dtype), is_causal) if segment_ids is None else
              _short_conv_segments(x, w.astype(dtype), is_causal, seg)
              for x, w in zip(inputs, short_filters)]
  if valid is not None:
    token_valid = valid.reshape(valid.shape[0], *spatial, *valid.shape[2:])
    inputs = [jnp.where(token_valid, x, 0.0) for x in inputs]
  if segment_ids is None:
    conv = lambda z, filt: _long_conv(z, filt, spatial, causal_taps, is_causal)  # noqa: E731
  else:
    conv = lambda z, filt: _long_conv_segments(z, filt, causal_taps, is_causal, same)  # noqa: E731
  z = gated_recurrence(inputs, filters.astype(dtype),
                       None if filter_bias is None else filter_bias.astype(dtype), conv)
  return z.reshape(query.shape).astype(query.dtype)


def gated_recurrence(inputs: list[Array], filters, filter_bias: Array | None,
                     conv) -> Array:
  """Hyena's recurrence z_1 = v, z_{n+1} = x_n ⊙ (h_n * z_n + D_n ⊙ z_n), y = z_{N+1}.

  inputs: `[v, x_1, ..., x_N]` (after the short filters); filters: the N long filters h_n in
  whatever layout `conv(z, h_n)` takes; filter_bias: `[N, heads, head_dim]` (D_n) or None.
  A padded token's x_n is zero, so its z is too.
  """
  z = inputs[0]
  for n, x_n in enumerate(inputs[1:]):
    mixed = conv(z, filters[n])
    if filter_bias is not None:
      mixed = mixed + filter_bias[n] * z
    z = x_n * mixed
  return z
