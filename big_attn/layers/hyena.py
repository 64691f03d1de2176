"""Linen modules of Hyena (Hyena Hierarchy, Poli et al. 2023; HyenaPixel: Global Image Context
with Convolutions, Spravil et al. 2024).

- `ImplicitFilter`: the long filters h_n(r) = FFN(PE(r)) · exp(−α_c‖r‖), one per order and
  channel, evaluated at every offset of the sequence or image (so the weights do not depend on
  the length).
- `HyenaParams`: the weights of the `hyena` op, registered for `big_attn.layers.Attention(
  op="hyena")`: the implicit filters, the skip terms D, the short depthwise filters of the
  projections and, for orders above 2, the extra gate projections. It lives here, not in
  `big_attn.ops.hyena`, because its gates are `Projection` layers (registered on importing
  `big_attn.layers`).
- `HyenaOperator`: the stand-alone token mixer (in-projections, Hyena, out-projection) for a
  sequence `[batch, seq, features]` or an image `[batch, height, width, features]`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_attn.layers.attention import Attention, Projection
from big_attn.ops import checks
from big_attn.ops.registry import OpParams, register_params

_FILTER_TARGET = 1e-2  # the window decays to 1 % at the fastest/slowest channel's reach


def _offsets(spatial: tuple[int, ...], max_len) -> np.ndarray:
  """`[*(2n − 1), rank]`: every offset r ∈ [−(n − 1), n − 1] per axis over (max_len − 1) (the
  current n − 1 when `max_len` is None), so r spans [−1, 1] at the longest size."""
  reach = spatial if max_len is None else (
      (max_len,) * len(spatial) if isinstance(max_len, int) else tuple(max_len))
  if len(reach) != len(spatial) or any(m < n for m, n in zip(reach, spatial)):
    raise ValueError(f"max_len={max_len!r} must cover the token layout {spatial}")
  axes = [np.arange(-(n - 1), n) / max(m - 1, 1) for n, m in zip(spatial, reach)]
  return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)


class ImplicitFilter(nn.Module):
  """Hyena's implicit filter: positional encoding -> FFN with sine activations -> decay window.

  At each offset r (over `max_len` − 1 per axis, or the current size − 1 when `max_len` is
  None: a causal model then gives the same outputs on every prefix, as the authors' filters
  defined up to `l_max`) the encoding is (r, sin(πfr), cos(πfr)) for
  f = 1..`bands` per axis; `depth` layers Dense(`hidden`) -> sin(ω ⊙ ·) (ω learned, shared by
  the layers, initialised to 1, as the authors' `Sin`) feed a Dense(order·heads·head_dim)
  without bias, and the result is windowed per channel by exp(−α_c‖r‖), α_c spaced linearly
  from ln(100)/1.5 (slow) to ln(100)/0.3 (fast) over the channels (the paper's exponential
  modulation, fixed). Returns `[order, *(2n − 1), heads, head_dim]` (centred taps).
  """
  order: int
  num_heads: int
  head_dim: int
  hidden: int = 64
  depth: int = 2
  bands: int = 8
  max_len: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, spatial: tuple[int, ...]):
    for name in ("order", "hidden", "depth", "bands"):
      checks.positive_int(f"ImplicitFilter.{name}", getattr(self, name))
    r = _offsets(spatial, self.max_len)
    angles = np.pi * r[..., None] * np.arange(1, self.bands + 1)  # [..., rank, bands]
    features = np.concatenate([r[..., None], np.sin(angles), np.cos(angles)], axis=-1)
    x = jnp.asarray(features.reshape(*r.shape[:-1], -1), self.dtype or jnp.float32)
    torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    freq = self.param("freq", nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                      (self.hidden,), self.param_dtype)
    for i in range(self.depth):
      x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=f"Dense_{i}",
                   kernel_init=nn.with_logical_partitioning(torch_init, (None, None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          (None,)))(x)
      x = jnp.sin(jnp.asarray(freq, x.dtype) * x)
    channels = self.num_heads * self.head_dim
    h = nn.Dense(self.order * channels, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="out",
                 kernel_init=nn.with_logical_partitioning(torch_init, (None, None)))(x)
    decay = np.abs(np.log(_FILTER_TARGET)) / np.linspace(1.5, 0.3, channels)
    window = np.exp(-np.linalg.norm(r, axis=-1)[..., None] * decay)  # [..., channels]
    h = h.reshape(*r.shape[:-1], self.order, channels) * window[..., None, :].astype(h.dtype)
    h = jnp.moveaxis(h, -2, 0)
    return h.reshape(*h.shape[:-1], self.num_heads, self.head_dim)


@register_params("hyena")
class HyenaParams(OpParams):
  """The weights of the `hyena` op, from `op_args`: `order` N (2), `short_kernel` k (3; 0: no
  short filters), `grid` ((h, w) for image tokens), `max_len` (the longest sequence, or
  image side(s), the filters are scaled to; None: the current one).

  Returns `filters [N, *(2n − 1), heads, head_dim]` (an `ImplicitFilter` of `filter_hidden`
  units, `filter_depth` sine layers, `filter_bands` frequencies), `filter_bias [N, heads,
  head_dim]` (D, N(0, 1) as the authors' code), `short_filters [N + 1, *k, heads, head_dim]`
  (PyTorch's default depthwise-conv init U(±1/√k^rank), no bias) and, for N > 2, `gates
  [N − 2, batch, seq, heads, head_dim]`, linear maps of `inputs_q` (self-attention).
  """
  filter_hidden: int = 64
  filter_depth: int = 2
  filter_bands: int = 8

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del key, value
    op_args = dict(self.op_args or {})
    order = checks.int_in_range("op_args['order']", op_args.get("order", 2), 2)
    short = checks.int_in_range("op_args['short_kernel']", op_args.get("short_kernel", 3), 0)
    grid = op_args.get("grid")
    spatial = (query.shape[1],) if grid is None else tuple(grid)
    shape = (self.num_heads, self.head_dim)
    out = {"filters": ImplicitFilter(
        order=order, num_heads=self.num_heads, head_dim=self.head_dim, hidden=self.filter_hidden,
        depth=self.filter_depth, bands=self.filter_bands, max_len=op_args.get("max_len"),
        dtype=self.dtype,
        param_dtype=self.param_dtype, name="implicit_filter")(spatial)}
    out["filter_bias"] = self.param(
        "filter_bias", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    (None, "heads", "head_dim")),
        (order, *shape), self.param_dtype)
    if short:
      kernel = (short,) * len(spatial)
      bound = 1.0 / math.sqrt(math.prod(kernel))
      out["short_filters"] = self.param(
          "short_filters",
          nn.with_logical_partitioning(
              lambda key_, shape_, dtype: nn.initializers.uniform(2 * bound)(
                  key_, shape_, dtype) - bound,
              (None, *("conv_height", "conv_width")[-len(spatial):], "heads", "head_dim")),
          (order + 1, *kernel, *shape), self.param_dtype)
    if order > 2:
      if inputs_q.shape[1] != query.shape[1]:
        raise ValueError("hyena's extra gates are projections of inputs_q: self-attention only")
      gates = Projection((inputs_q.shape[-1], order - 2, *shape),
                         ("embed", None, "heads", "head_dim"), dtype=self.dtype,
                         param_dtype=self.param_dtype, name="gates")(inputs_q)
      out["gates"] = jnp.moveaxis(gates, 2, 0)
    (out["filter_bias"],) = nn.dtypes.promote_dtype(out["filter_bias"], dtype=self.dtype)
    return out


class HyenaOperator(nn.Module):
  """Hyena as a token mixer: `Attention(op="hyena")` (projections q, k, v with biases, the
  op's weights from `HyenaParams`, output projection) over a sequence or an image.

  Call with `[batch, seq, features]` (optionally `grid=(h, w)` for row-major image tokens,
  `is_causal`, a key-padding `mask [batch, 1, 1, seq]`) or with `[batch, h, w, features]`
  (the HyenaPixel mixer: 2-D, non-causal). Channels are independent in Hyena, so `num_heads`
  only shapes the parameters. `max_len`: the longest sequence (a decoder LM: every prefix then
  gives the same outputs) or image side; None scales the filters to each input.
  """
  num_heads: int = 1
  order: int = 2
  short_kernel: int = 3
  max_len: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, is_causal=False, mask=None):
    image = x.ndim == 4
    if image:
      if grid is not None:
        raise ValueError(f"grid is read off [batch, h, w, features] images, got grid={grid!r}")
      b, h, w, c = x.shape
      grid, x = (h, w), x.reshape(b, h * w, c)
    elif x.ndim != 3:
      raise ValueError(f"HyenaOperator takes [batch, seq, features] or [batch, h, w, features], "
                       f"got shape {x.shape}")
    op_args = dict(order=self.order, short_kernel=self.short_kernel, max_len=self.max_len)
    if grid is not None:
      op_args["grid"] = tuple(grid)
    y = Attention(num_heads=self.num_heads, op="hyena", op_args=op_args, use_bias=True,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="hyena")(
                      x, mask=mask, is_causal=is_causal)
    return y.reshape(b, h, w, c) if image else y
