"""Local attention over token neighbourhoods: (dilated) neighborhood attention, 1-D and 2-D.

Sequence-parallel, the op runs as softmax blocks that mask the pairs outside each query's
window and add the relative position bias, both read at the blocks' global positions
(`PairTerms`, `_window_terms`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, PairTerms, register


def _window_start(member, group_len, kernel_size: int, is_causal: bool, xp=np):
  """Index (within its dilation group) of the first neighbour of the group member `member`:
  the window of `kernel_size` members centred on it and shifted inside the group's
  `group_len` members, or its `kernel_size` most recent members when causal."""
  if is_causal:
    return member - (kernel_size - 1)
  return xp.clip(member - kernel_size // 2, 0, group_len - kernel_size)


def neighbourhood_indices(length: int, kernel_size: int, dilation: int, is_causal: bool
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Neighbours of every position along one axis, as NATTEN defines them.

  Position i belongs to the dilation group `i mod dilation` (positions r, r+δ, r+2δ, ...); its
  index there is j = i // δ. Non-causal: the window of `kernel_size` group members is centred on j
  and shifted (not truncated) at the borders. Causal: the `kernel_size` most recent members
  j-k+1 .. j, fewer at the start.

  Returns:
    `(keys, valid, rel)`, each `[length, kernel_size]`: key positions, which of them exist, and
    the relative-position-bias index `(kernel_size - 1) + (key - query) / δ`.
  """
  i = np.arange(length)
  group, j = i % dilation, i // dilation
  offsets = np.arange(kernel_size)
  group_len = (length - group + dilation - 1) // dilation
  members = _window_start(j, group_len, kernel_size, is_causal)[:, None] + offsets
  valid = members >= 0
  members = np.maximum(members, 0)
  keys = group[:, None] + dilation * members
  rel = members - j[:, None] + kernel_size - 1
  return keys, valid, rel


def _neighbours(shape, kernel, dilation, is_causal):
  """Flattened neighbours of a row-major 1-D or 2-D grid: keys, valid, rel (each `[t, K]`)."""
  if len(shape) == 1:
    keys, valid, rel = neighbourhood_indices(shape[0], kernel[0], dilation[0], is_causal)
    return keys, valid, (rel,)
  (h, w), (kh, kw), (dh, dw) = shape, kernel, dilation
  ky, _, ry = neighbourhood_indices(h, kh, dh, False)
  kx, _, rx = neighbourhood_indices(w, kw, dw, False)
  # token (y, x) -> neighbours (ky[y, a], kx[x, c]) for a < kh, c < kw, flattened to a*kw + c.
  keys = (ky[:, None, :, None] * w + kx[None, :, None, :]).reshape(h * w, kh * kw)
  rel_y = np.broadcast_to(ry[:, None, :, None], (h, w, kh, kw)).reshape(h * w, kh * kw)
  rel_x = np.broadcast_to(rx[None, :, None, :], (h, w, kh, kw)).reshape(h * w, kh * kw)
  return keys, np.ones(keys.shape, bool), (rel_y, rel_x)


def _circle_offsets(rank: int, radius: float) -> np.ndarray:
  """`[K, rank]` offsets of every grid point within Euclidean distance `radius` of the origin."""
  reach = int(np.floor(radius))
  axes = np.meshgrid(*[np.arange(-reach, reach + 1)] * rank, indexing="ij")
  offsets = np.stack([a.ravel() for a in axes], -1)
  return offsets[(offsets ** 2).sum(-1) <= radius ** 2]


def _circle_neighbours(shape, radius: float):
  """CLEAR's circular window on a row-major 1-D or 2-D grid: keys and valid (each `[t, K]`),
  the points within distance `radius` of each query, centred and cut at the borders."""
  offsets = _circle_offsets(len(shape), radius)
  coords = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), -1)  # [t, rank]
  points = coords[:, None, :] + offsets[None]  # [t, K, rank]
  valid = np.all((points >= 0) & (points < np.asarray(shape)), -1)
  keys = np.ravel_multi_index(tuple(np.clip(points, 0, np.asarray(shape) - 1).transpose(2, 0, 1)),
                              shape)
  return keys, valid


def _check_causal_grid(shape, is_causal: bool) -> None:
  if is_causal and len(shape) == 2:
    raise NotImplementedError(
        "op 'neighborhood' has no causal form on a 2-D grid (is_causal=True with grid)")


def _check_window(length: int, kv_len: int, num_heads: int, kernel_size, dilation, grid, rpb,
                  is_causal, radius=None):
  """`(shape, kernel, dilation)` per axis of the token layout after the checks of the op's
  arguments (`kernel` None for a circular window of `radius`)."""
  if radius is not None:
    checks.positive_float("radius", radius)
    given = [name for name, taken in (
        ("kernel_size", kernel_size is not None),
        ("dilation", any(d != 1 for d in np.atleast_1d(dilation))),
        ("rpb", rpb is not None), ("is_causal", bool(is_causal))) if taken]
    if given:
      raise ValueError(f"radius gives a circular window (CLEAR): it takes no "
                       f"{', '.join(given)}")
  kernel_size = 7 if kernel_size is None else kernel_size
  if length != kv_len:
    raise ValueError("neighborhood attention is self-attention: q_len must equal kv_len, got "
                     f"{length} and {kv_len}")
  if grid is None:
    shape = (length,)
  else:
    shape = checks.int_tuple("grid", grid, 2)
    if shape[0] * shape[1] != length:
      raise ValueError(f"grid {shape} must have seq = {length} cells")
  _check_causal_grid(shape, is_causal)
  if radius is not None:
    return shape, None, (1,) * len(shape)
  rank = len(shape)
  kernel = checks.int_tuple("kernel_size", kernel_size, rank)
  dil = checks.int_tuple("dilation", dilation, rank)
  for size, k, d in zip(shape, kernel, dil):
    if k % 2 == 0:
      raise ValueError(f"kernel_size must be odd (as in NAT), got {kernel_size!r}")
    if k * d > size:
      raise ValueError(
          f"kernel_size * dilation = {k} * {d} exceeds the length {size} along an axis "
          f"of shape {shape}")
  if rpb is not None:
    common.check_float("rpb", rpb)
    want = (num_heads,) + tuple(2 * k - 1 for k in kernel)
    if rpb.shape != want:
      layout = "[num_heads, 2k-1]" if rank == 1 else "[num_heads, 2kh-1, 2kw-1]"
      raise ValueError(f"rpb must have shape {layout} = {want}, got {rpb.shape}")
  return shape, kernel, dil


def _axis_window(q_pos, k_pos, length: int, kernel_size: int, dilation: int, is_causal: bool):
  """`(visible, rel)` `[t, s]` along one axis of `length` positions: whether key position
  `k_pos[j]` is a neighbour of query position `q_pos[i]`, and its bias index
  `(kernel_size − 1) + (k_member − q_member)` (as `neighbourhood_indices`)."""
  q_pos, k_pos = q_pos[:, None], k_pos[None, :]
  group, member, k_member = q_pos % dilation, q_pos // dilation, k_pos // dilation
  start = _window_start(member, (length - group + dilation - 1) // dilation, kernel_size,
                        is_causal, xp=jnp)
  visible = (k_pos % dilation == group) & (k_member >= start) & (k_member < start + kernel_size)
  return visible, k_member - member + kernel_size - 1


def _window_terms(arrays, q_pos, k_pos, *, is_causal, shape, kernel, dilation, radius=None):
  """Neighborhood attention's `PairTerms`: the visible pairs (each query's window, or the
  circle of `radius`) and the relative position bias `rpb` (if given) at these positions of
  the row-major `shape`."""
  _check_causal_grid(shape, is_causal)
  if len(shape) == 1:
    axes = [(q_pos, k_pos)]
  else:
    axes = [(q_pos // shape[1], k_pos // shape[1]), (q_pos % shape[1], k_pos % shape[1])]
  if radius is not None:
    if is_causal:
      raise ValueError("radius gives a circular window (CLEAR): it takes no is_causal")
    distance2 = sum((k_axis[None, :] - q_axis[:, None]) ** 2 for q_axis, k_axis in axes)
    return None, None, distance2 <= radius ** 2
  visible, rels = None, []
  for (q_axis, k_axis), length, k, d in zip(axes, shape, kernel, dilation):
    seen, rel = _axis_window(q_axis, k_axis, length, k, d, is_causal)
    visible = seen if visible is None else visible & seen
    rels.append(jnp.clip(rel, 0, 2 * k - 2))
  rpb = arrays.get("rpb")
  return None if rpb is None else rpb[(slice(None),) + tuple(rels)], None, visible


def _neighborhood_block_form(query, key, scale, *, kernel_size=None, dilation=1, grid=None,
                             rpb=None, radius=None) -> BlockForm:
  """Softmax blocks masked to each query's window, with its bias, at global positions; a
  causal 2-D grid is refused when the blocks are computed."""
  shape, kernel, dil = _check_window(query.shape[1], key.shape[1], query.shape[2], kernel_size,
                                     dilation, grid, rpb, False, radius)
  terms = PairTerms(_window_terms, (("shape", shape), ("kernel", kernel), ("dilation", dil),
                                    ("radius", radius)))
  return BlockForm("softmax", query, key, scale, pair_terms=terms,
                   pair_arrays={} if rpb is None else {"rpb": rpb})


@register("neighborhood", grid=True, block_form=_neighborhood_block_form)
def neighborhood_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                           kernel_size=None, dilation=1, grid=None, rpb=None, radius=None):
  """(Dilated) Neighborhood Attention: Neighborhood Attention Transformer (Hassani et al.,
  2023) and Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022).

  Each query i attends to its `kernel_size` nearest neighbours ρ(i) among the tokens of its
  dilation group (same index mod δ); the window is shifted, not truncated, at the borders, so
  every query sees exactly `kernel_size` keys (per axis in 2-D):

      out_i = Σ_{j∈ρ(i)} softmax_j(s·q_i·k_j + B[(j − i)/δ]) v_j

  with B the optional relative position bias. Computed on gathered neighbour keys and values,
  `[batch, seq, kernel_size, heads, head_dim]`: O(seq·kernel_size), no score matrix. Causal
  (1-D only): the `kernel_size` most recent tokens at dilation δ (i, i−δ, ..., fewer at the
  start).

  With `radius` r the window is circular, as in CLEAR: Conv-Like Linearization Revs
  Pre-Trained Diffusion Transformers Up (Liu et al., 2024): query i attends to the tokens j
  with ‖p_j − p_i‖₂ <= r (grid positions p), centred on i and cut at the borders (fewer keys
  there), O(seq·πr²).

  Args:
    query: `[batch, seq, num_heads, head_dim]`.
    key: `[batch, seq, num_kv_heads, head_dim]` (self-attention: the same seq).
    value: `[batch, seq, num_kv_heads, value_dim]`.
    mask: optional boolean mask broadcastable to `[batch, num_heads, seq, seq]`, read at each
      query's neighbours; a query with no neighbour left returns zeros.
    is_causal: 1-D only; see above.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    kernel_size: odd neighbourhood size (int, or an int or `(kh, kw)` pair with `grid`); 7
      when None.
    dilation: δ (int, or an int or pair with `grid`); `kernel_size·δ <= length` per axis.
    grid: `(height, width)`: tokens are a row-major image, neighbourhoods are kh×kw.
    rpb: relative position bias, `[num_heads, 2k−1]` (1-D) or `[num_heads, 2kh−1, 2kw−1]`.
    radius: a circular window of this Euclidean radius (CLEAR) instead of the kernel; takes
      no kernel_size, dilation, rpb or is_causal.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  shape, kernel, dil = _check_window(dims.q_len, dims.kv_len, dims.num_heads, kernel_size,
                                     dilation, grid, rpb, is_causal, radius)
  if radius is None:
    keys, valid, rel = _neighbours(shape, kernel, dil, is_causal)
  else:
    keys, valid = _circle_neighbours(shape, radius)

  k_heads, g = dims.num_kv_heads, dims.groups
  key_n = key[:, keys]  # [b, t, K, k, d]
  value_n = value[:, keys]
  logits = jnp.einsum("btkgd,btjkd->btkgj", common.group_query(query, k_heads), key_n,
                      preferred_element_type=jnp.float32) * jnp.float32(scale)
  if rpb is not None:
    bias = rpb.astype(jnp.float32)[(slice(None),) + rel]  # [n, t, K]
    logits = logits + jnp.moveaxis(bias.reshape(k_heads, g, *bias.shape[1:]), 2, 0)

  full = common.make_mask(dims, mask=mask)
  neighbour_mask = jnp.asarray(valid)[:, None, None, :]  # [t, 1, 1, K]
  if full is not None:
    picked = full[:, :, np.arange(dims.q_len)[:, None], keys]  # [b|1, n|1, t, K]
    picked = picked.reshape(picked.shape[0], *(
        (k_heads, g) if picked.shape[1] != 1 else (1, 1)), dims.q_len, keys.shape[1])
    neighbour_mask = jnp.logical_and(neighbour_mask, jnp.moveaxis(picked, 3, 1))
  probs = common.masked_softmax(logits, None if (full is None and valid.all())
                                else neighbour_mask)  # rows with no neighbour left: zeros
  out = jnp.einsum("btkgj,btjkd->btkgd", probs.astype(value.dtype), value_n,
                   preferred_element_type=jnp.float32)
  return out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.value_dim).astype(query.dtype)
