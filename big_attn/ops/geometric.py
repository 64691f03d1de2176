"""Geometry-aware attention: GTA, the group representation of each token's geometry applied to
queries, keys, values and outputs.

- `gta_attention`: GTA: A Geometry-Aware Attention Mechanism for Multi-View Transformers (Miyato et al.,
  2024), with 2-D image positions (or 1-D sequence positions) as the geometry and SO(2)
  blocks as the representation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import BlockForm, register
from big_attn.ops.softmax import dot_product_attention

Array = jax.Array

# The frequency base of the SO(2) blocks over token positions (as 2-D RoPE for ViTs: positions
# span tens of tokens, not thousands).
GTA_BASE = 100.0


def _coordinates(positions: np.ndarray, grid) -> np.ndarray:
  """`[length, axes]` coordinates of the tokens at the global `positions [length]`: `(y, x)`
  on the row-major `grid`, else `(t,)`."""
  positions = np.asarray(positions)
  if grid is None:
    return positions.astype(np.float64)[:, None]
  _, w = windowed.check_grid(grid, positions.shape[0])
  return np.stack([positions // w, positions % w], axis=-1).astype(np.float64)


def _angles(positions: np.ndarray, width: int, base: float, name: str) -> np.ndarray:
  """`[length, width / 2]` rotation angles: each coordinate axis owns an equal share of the
  `width / 2` channel pairs, pair f of an axis turning by `p · base^(−f/F)` (F pairs per
  axis)."""
  axes = positions.shape[-1]
  if width % (2 * axes):
    raise ValueError(f"gta rotates channel pairs, {axes} position axes each an equal share: "
                     f"{name} ({width}) must be divisible by {2 * axes}")
  per_axis = width // (2 * axes)
  freqs = base ** (-np.arange(per_axis) / max(per_axis, 1))
  return (positions[:, :, None] * freqs).reshape(positions.shape[0], width // 2)


def _rotate(x: Array, angles: np.ndarray) -> Array:
  """`x [b, t, heads, width]` with channel pairs (c, c + width/2) rotated by `angles
  [t, width/2]`: ρ(g_t) x_t (a negated `angles` applies ρ(g_t)⁻¹ = ρ(g_t)ᵀ)."""
  cos = jnp.asarray(np.cos(angles), jnp.float32)[None, :, None]
  sin = jnp.asarray(np.sin(angles), jnp.float32)[None, :, None]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def _gta_form_at(query, key, scale, grid, base, q_pos, k_pos) -> BlockForm:
  """GTA as softmax blocks for tokens at the global positions `q_pos`, `k_pos`: queries and
  keys turned by ρ(g)⁻¹, the value map ρ(g_j)⁻¹ v_j, the output map ρ(g_i) out_i."""
  q_at, k_at = _coordinates(q_pos, grid), _coordinates(k_pos, grid)
  turn = lambda at, x, name: _angles(at, x.shape[-1], base, name)

  def value_map(value):
    return _rotate(value, -turn(k_at, value, "value_dim")).astype(value.dtype)

  def output_map(out, value):
    del value
    return _rotate(out, turn(q_at, out, "value_dim")).astype(out.dtype)

  return BlockForm("softmax", _rotate(query, -turn(q_at, query, "head_dim")).astype(query.dtype),
                   _rotate(key, -turn(k_at, key, "head_dim")).astype(key.dtype), scale,
                   value_map=value_map, output_map=output_map)


def _gta_block_form(query, key, scale, *, grid=None, base=GTA_BASE) -> BlockForm:
  """GTA's `BlockForm` (natural token order) and, as `at_positions`, the form at any global
  positions (the rotations follow each token's own position in a striped order)."""
  dims = common.check_qkv(query, key, key)
  base = checks.positive_float("base", base)
  if grid is not None and dims.q_len != dims.kv_len:
    raise ValueError("gta on a grid needs queries and keys on one image: q_len must equal "
                     f"kv_len, got {dims.q_len} and {dims.kv_len}")
  at = functools.partial(_gta_form_at, query, key, scale, grid, base)
  return at(np.arange(dims.q_len), np.arange(dims.kv_len))._replace(at_positions=at)


@register("gta_attention", segment_ids=True, grid=True, block_form=_gta_block_form)
def gta_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                  base=GTA_BASE, segment_ids=None):
  """GTA: A Geometry-Aware Attention Mechanism for Multi-View Transformers (Miyato et al.,
  2024), its image form: the geometry g_i of token i is its 2-D position.

  With ρ(g) the orthogonal representation of the token's geometry, GTA transforms queries,
  keys and values by the relative geometry g_i g_j⁻¹:

      out_i = Σ_j softmax_j(s·q_iᵀ ρ(g_i g_j⁻¹) k_j) ρ(g_i g_j⁻¹) v_j
            = ρ(g_i) Σ_j softmax_j(s·(ρ(g_i)⁻¹ q_i)ᵀ (ρ(g_j)⁻¹ k_j)) ρ(g_j)⁻¹ v_j,

  computed in the second form (transform q, k, v, attend, transform the output). ρ(g) is
  block-diagonal in SO(2): on the row-major `grid=(h, w)` image half of the channel pairs turn
  by y·ω_f and half by x·ω_f, ω_f = base^(−f/F) for the F pairs of an axis (RoPE-like, the
  paper's choice for 2-D positions); without a grid, every pair turns by the 1-D position t.
  Unlike RoPE, the values and the output are transformed too, so the output carries the
  relative geometry. Masks, causal attention and segments are those of the softmax.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`; head_dim divisible by 4 with a grid, by 2
      without.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (value_dim likewise).
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends keys j <= i (raster order on a grid).
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: `(h, w)` of the image with `h·w == q_len == kv_len`; None: 1-D positions.
    base: frequency base of the SO(2) blocks (100, for token positions).
    segment_ids: as in `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_qkv(query, key, value)
  form = _gta_block_form(query, key, scale, grid=grid, base=base)
  out = dot_product_attention(form.query, form.key, form.value_map(value), mask=mask,
                              is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                              implementation="xla")
  return form.output_map(out, value).astype(query.dtype)
