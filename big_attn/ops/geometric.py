"""Geometry-aware attention: GTA, the group representation of each token's geometry applied to
queries, keys, values and outputs.

- `gta_attention`: GTA: A Geometry-Aware Attention Mechanism for Multi-View Transformers (Miyato et al.,
  2024), with 2-D image positions (or 1-D sequence positions) as the geometry and SO(2)
  blocks as the representation; with per-token `cameras`, the SE(3) camera extrinsics of
  multi-view inputs as 4x4 homogeneous blocks beside them.
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
  on the row-major `grid` (h, w) of each view (views of h·w tokens one after another), else
  `(t,)`."""
  positions = np.asarray(positions)
  if grid is None:
    return positions.astype(np.float64)[:, None]
  h, w = grid
  in_view = positions % (h * w)
  return np.stack([in_view // w, in_view % w], axis=-1).astype(np.float64)


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


def _transform_chunks(x: Array, matrices: Array) -> Array:
  """`x [b, t, heads, width]` with each chunk of 4 channels multiplied by its token's
  `matrices [b, t, 4, 4]`."""
  b, t, heads, width = x.shape
  chunks = x.astype(jnp.float32).reshape(b, t, heads, width // 4, 4)
  return jnp.einsum("btij,bthcj->bthci", matrices.astype(jnp.float32),
                    chunks).reshape(b, t, heads, width)


def _transform(x: Array, angles: np.ndarray, matrices: Array | None) -> Array:
  """`x [b, t, heads, width]` mapped by the block-diagonal representation: without camera
  `matrices`, SO(2) blocks turned by `angles` on all channels; with them, the 4x4
  `matrices [b, t, 4, 4]` on the first half (chunks of 4 channels) and the SO(2) blocks on
  the second."""
  if matrices is None:
    return _rotate(x, angles).astype(x.dtype)
  camera_part, position_part = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([_transform_chunks(camera_part, matrices),
                          _rotate(position_part, angles)], axis=-1).astype(x.dtype)


def _check_camera_width(width: int, name: str) -> None:
  """A `ValueError` naming `name` unless `width` splits into 4x4 camera and SO(2) halves."""
  if width % 8:
    raise ValueError("gta with cameras applies 4x4 camera blocks to half of the channels and "
                     f"SO(2) blocks to the other half: {name} ({width}) must be divisible by 8")


def _gta_form_at(query, key, scale, grid, base, cameras, q_pos, k_pos) -> BlockForm:
  """GTA as softmax blocks for tokens at the global positions `q_pos`, `k_pos`: queries
  mapped by ρ(g_i)ᵀ, keys and values by ρ(g_j)⁻¹, the output by ρ(g_i)."""
  q_at, k_at = _coordinates(q_pos, grid), _coordinates(k_pos, grid)
  share = 1 if cameras is None else 2

  def turn(at, x, name):
    return _angles(at, x.shape[-1] // share, base, name)

  if cameras is None:
    transposed = inverse = None
  else:
    transposed, inverse = jnp.swapaxes(cameras, -1, -2), jnp.linalg.inv(cameras)

  def value_map(value):
    if cameras is not None:
      _check_camera_width(value.shape[-1], "value_dim")
    return _transform(value, -turn(k_at, value, "value_dim"), inverse)

  def output_map(out, value):
    del value
    return _transform(out, turn(q_at, out, "value_dim"), cameras)

  return BlockForm("softmax", _transform(query, -turn(q_at, query, "head_dim"), transposed),
                   _transform(key, -turn(k_at, key, "head_dim"), inverse), scale,
                   value_map=value_map, output_map=output_map)


def _gta_block_form(query, key, scale, *, grid=None, base=GTA_BASE,
                    cameras=None) -> BlockForm:
  """GTA's `BlockForm` (natural token order) and, as `at_positions`, the form at any global
  positions (the rotations follow each token's own position in a striped order; the camera
  matrices are per token of the arrays)."""
  dims = common.check_qkv(query, key, key)
  base = checks.positive_float("base", base)
  if (grid is not None or cameras is not None) and dims.q_len != dims.kv_len:
    raise ValueError("gta with a grid or cameras needs queries and keys on the same tokens: "
                     f"q_len must equal kv_len, got {dims.q_len} and {dims.kv_len}")
  if cameras is None:
    if grid is not None:
      grid = windowed.check_grid(grid, dims.q_len)
  else:
    common.check_weight("cameras", cameras, (dims.batch, dims.q_len, 4, 4),
                        "[batch, seq, 4, 4]")
    _check_camera_width(dims.head_dim, "head_dim")
    if grid is not None:
      grid = checks.int_tuple("grid", grid)
      if dims.q_len % (grid[0] * grid[1]):
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} cells per view but the "
                         f"sequence has {dims.q_len} tokens, not a whole number of views")
  at = functools.partial(_gta_form_at, query, key, scale, grid, base, cameras)
  return at(np.arange(dims.q_len), np.arange(dims.kv_len))._replace(at_positions=at)


@register("gta_attention", segment_ids=True, grid=True, block_form=_gta_block_form)
def gta_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                  base=GTA_BASE, cameras=None, segment_ids=None):
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

  Multi-view inputs (the paper's novel view synthesis): with `cameras`, g_i also holds the
  world-to-camera extrinsic E_i ∈ SE(3) of token i's view, and ρ(g_i) = E_i ⊕ … ⊕ E_i ⊕
  ρ_SO(2)(position): the 4x4 homogeneous E_i on each chunk of 4 channels of the first half of
  the head, the SO(2) blocks above on the second half (the position within the token's view:
  views of h·w tokens one after another on a grid). ρ(E) is not orthogonal, so queries are
  mapped by ρ(g_i)ᵀ, keys and values by ρ(g_j)⁻¹ and the output by ρ(g_i); the scores
  q_iᵀ ρ(g_i g_j⁻¹) k_j depend only on the relative pose E_i E_j⁻¹, so a change of world frame
  (every E_i ↦ E_i T) leaves the output unchanged.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`; head_dim divisible by 4 with a grid, by 2
      without, by 8 with cameras.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (value_dim likewise).
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query i attends keys j <= i (raster order on a grid).
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: `(h, w)` of the image with `h·w == q_len == kv_len` (with cameras: of each view,
      q_len a multiple of h·w); None: 1-D positions.
    base: frequency base of the SO(2) blocks (100, for token positions).
    cameras: None, or `[batch, seq, 4, 4]` per-token world-to-camera extrinsics (invertible
      homogeneous matrices [[R, t], [0, 1]]) of self-attention (`q_len == kv_len == seq`).
    segment_ids: as in `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_qkv(query, key, value)
  form = _gta_block_form(query, key, scale, grid=grid, base=base, cameras=cameras)
  out = dot_product_attention(form.query, form.key, form.value_map(value), mask=mask,
                              is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                              implementation="xla")
  return form.output_map(out, value).astype(query.dtype)
