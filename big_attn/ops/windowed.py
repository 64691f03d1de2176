"""Dense attention inside groups of image tokens: window (block) attention and grid attention.

- `window`: Swin window attention (optionally shifted), MaxViT block attention, Twins LSA.
- `grid`: MaxViT grid attention (a dilated, global partition).

Tokens are a row-major `grid=(height, width)` image. Both ops partition the image into groups
of tokens that attend densely among themselves; the arrays are reshaped to `[batch, groups,
group_size, heads, dim]` and no `[seq, seq]` matrix is formed: cost O(seq·group_size). The
helpers `check_grid`, `to_groups`, `from_groups` and `pick_mask` are shared with the routing and
spatial-reduction ops.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params

Array = jax.Array


def check_grid(grid, length: int, name: str = "grid") -> tuple[int, int]:
  """`(height, width)` positive ints with `height·width == length`."""
  if grid is None:
    raise ValueError(f"{name}=(height, width) is required: tokens are a row-major image")
  h, w = checks.int_tuple(name, grid)
  if h * w != length:
    raise ValueError(f"{name} {(h, w)} has {h * w} cells but the sequence has {length} tokens")
  return h, w


def patch_grid(op_args, length: int) -> tuple[int, int]:
  """`op_args["grid"]` checked against the `length` tokens a parameter module sees, less the
  `op_args["extra_tokens"]` before the patches (`big_attn.ops.spatial.attend`)."""
  op_args = op_args or {}
  return check_grid(op_args.get("grid"), length - op_args.get("extra_tokens", 0))


def check_partition(name: str, size, grid: tuple[int, int], default: int) -> tuple[int, int]:
  """`size` (an int or a pair) as a pair of positive ints dividing the grid's sides; None:
  the paper's `default` per side, clipped to the side's largest divisor <= `default`."""
  if size is None:
    return tuple(common.largest_divisor(side, default) for side in grid)
  a, c = checks.int_tuple(name, size)
  if grid[0] % a or grid[1] % c:
    raise ValueError(f"{name} {(a, c)} must divide the grid {grid} along both sides")
  return a, c


# Swin's window and MaxViT's block and grid partitions: 7 x 7 tokens per group.
PAPER_PARTITION = 7


def to_groups(x, grid: tuple[int, int], size: tuple[int, int], dilated: bool):
  """`[b, h·w, ...]` -> `[b, groups, size_h·size_w, ...]` (NumPy or JAX arrays).

  Not dilated: groups are the non-overlapping `size` windows, row-major, members row-major.
  Dilated (MaxViT grid): the image is a `size` grid of cells of `(h/size_h, w/size_w)` tokens;
  a group is the set of tokens at one offset inside their cells, its members ordered by cell.
  """
  b, rest = x.shape[0], x.shape[2:]
  (h, w), (a, c) = grid, size
  if dilated:
    x = x.reshape(b, a, h // a, c, w // c, *rest)
    axes = (0, 2, 4, 1, 3)
  else:
    x = x.reshape(b, h // a, a, w // c, c, *rest)
    axes = (0, 1, 3, 2, 4)
  x = x.transpose(axes + tuple(range(5, x.ndim)))
  return x.reshape(b, (h // a) * (w // c), a * c, *rest)


def from_groups(x, grid: tuple[int, int], size: tuple[int, int], dilated: bool):
  """The inverse of `to_groups`: `[b, groups, group_size, ...]` -> `[b, h·w, ...]`."""
  b, rest = x.shape[0], x.shape[3:]
  (h, w), (a, c) = grid, size
  x = x.reshape(b, h // a, w // c, a, c, *rest)
  axes = (0, 3, 1, 4, 2) if dilated else (0, 1, 3, 2, 4)
  x = x.transpose(axes + tuple(range(5, x.ndim)))
  return x.reshape(b, h * w, *rest)


def pick_mask(full: Array, q_idx: np.ndarray, k_idx: np.ndarray) -> Array:
  """`full[:, :, q_idx, k_idx]` for a `[b|1, n|1, t|1, s|1]` mask; broadcast axes read at 0."""
  qi = q_idx if full.shape[2] != 1 else np.zeros_like(q_idx)
  ki = k_idx if full.shape[3] != 1 else np.zeros_like(k_idx)
  return full[:, :, qi, ki]


def grouped_group_mask(picked: Array, dims: common.Dims) -> Array:
  """`[b|1, n|1, G, x, y]` -> `[b|1, G, k|1, g|1, x, y]`, the layout of the group logits."""
  heads = (dims.num_kv_heads, dims.groups) if picked.shape[1] != 1 else (1, 1)
  out = picked.reshape(picked.shape[0], *heads, *picked.shape[2:])
  return jnp.moveaxis(out, 3, 1)


def check_rpb(rpb: Array | None, dims: common.Dims, size: tuple[int, int]) -> None:
  if rpb is None:
    return
  common.check_float("rpb", rpb)
  want = (dims.num_heads, 2 * size[0] - 1, 2 * size[1] - 1)
  if rpb.shape != want:
    raise ValueError(f"rpb must have shape [num_heads, 2*rows-1, 2*cols-1] = {want}, "
                     f"got {rpb.shape}")


def _rpb_bias(rpb: Array, dims: common.Dims, size: tuple[int, int]) -> Array:
  """`[k, g, W, W]` float32 bias, `B[i, j] = rpb[y_i − y_j + a − 1, x_i − x_j + c − 1]`
  over the members' positions in their `a × c` group (Swin's indexing)."""
  a, c = size
  members = np.arange(a * c)
  ys, xs = members // c, members % c
  rel_y = ys[:, None] - ys[None, :] + a - 1
  rel_x = xs[:, None] - xs[None, :] + c - 1
  bias = rpb.astype(jnp.float32)[:, rel_y, rel_x]
  return bias.reshape(dims.num_kv_heads, dims.groups, a * c, a * c)


def group_attention(query: Array, key: Array, value: Array, dims: common.Dims, scale: float,
                    bias: Array | None, mask: Array | None) -> Array:
  """Softmax attention within groups.

  query `[b, G, W, n, d]`, key/value `[b, G, M, k, d]`; bias broadcastable to the grouped logits
  `[b, G, k, g, W, M]`, mask likewise (rows with nothing to attend to give zeros). Returns
  `[b, G, W, n, value_dim]` in float32.
  """
  b, num_groups, width = query.shape[:3]
  q = query.reshape(b, num_groups, width, dims.num_kv_heads, dims.groups, dims.head_dim)
  logits = jnp.einsum("bGtkgd,bGskd->bGkgts", q, key,
                      preferred_element_type=jnp.float32) * jnp.float32(scale)
  if bias is not None:
    logits = logits + bias
  probs = common.masked_softmax(logits, mask)
  out = jnp.einsum("bGkgts,bGskd->bGtkgd", probs.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, num_groups, width, dims.num_heads, dims.value_dim)


def _swin_labels(length: int, window: int, shift: int) -> np.ndarray:
  """Swin's region labels along one axis of the shifted image: slices `[0, L−w)`,
  `[L−w, L−s)`, `[L−s, L)` (the last holds the tokens wrapped around by the cyclic shift)."""
  pos = np.arange(length)
  return np.where(pos < length - window, 0, np.where(pos < length - shift, 1, 2))


def _partitioned(query, key, value, dims, *, mask, scale, grid, size, dilated, rpb,
                 shift=(0, 0)):
  """Shared body of `window` and `grid`: checks, (shift,) partition, attend, un-partition."""
  if dims.q_len != dims.kv_len:
    raise ValueError("window and grid attention are self-attention over one image: q_len must "
                     f"equal kv_len, got {dims.q_len} and {dims.kv_len}")
  scale = common.default_scale(dims.head_dim, scale)
  full = common.make_mask(dims, mask=mask)
  check_rpb(rpb, dims, size)
  h, w = grid
  shifted = any(shift)

  def partition(x):
    if shifted:
      x = jnp.roll(x.reshape(x.shape[0], h, w, *x.shape[2:]), (-shift[0], -shift[1]), (1, 2))
      x = x.reshape(x.shape[0], h * w, *x.shape[3:])
    return to_groups(x, grid, size, dilated)

  tokens = np.roll(np.arange(h * w).reshape(h, w), (-shift[0], -shift[1]), (0, 1))
  tokens = to_groups(tokens.reshape(1, h * w), grid, size, dilated)[0]  # [G, W]
  group_mask = None
  if full is not None:
    group_mask = grouped_group_mask(
        pick_mask(full, tokens[:, :, None], tokens[:, None, :]), dims)
  if shifted:
    labels = (_swin_labels(h, size[0], shift[0])[:, None] * 3
              + _swin_labels(w, size[1], shift[1])[None, :])
    labels = to_groups(labels.reshape(1, h * w), grid, size, dilated)[0]
    same = jnp.asarray(labels[:, :, None] == labels[:, None, :])[None, :, None, None]
    group_mask = same if group_mask is None else jnp.logical_and(group_mask, same)
  bias = None if rpb is None else _rpb_bias(rpb, dims, size)
  out = group_attention(partition(query), partition(key), partition(value), dims, scale, bias,
                        group_mask)
  out = from_groups(out, grid, size, dilated)
  if shifted:
    out = jnp.roll(out.reshape(out.shape[0], h, w, *out.shape[2:]), shift, (1, 2))
    out = out.reshape(out.shape[0], h * w, *out.shape[3:])
  return out.astype(query.dtype)


@register("window", causal=False, grid=True)
def window_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                     window_size=None, shift=0, rpb=None):
  """Window attention: Swin Transformer (Liu et al., 2021), MaxViT block attention (Tu et al.,
  2022), Twins-SVT locally-grouped self-attention (Chu et al., 2021).

  The `grid=(h, w)` image is cut into non-overlapping `window_size=(a, c)` windows ω(i); each
  token attends to the tokens of its own window:

      out_i = Σ_{j∈ω(i)} softmax_j(s·q_i·k_j + B[y_i − y_j, x_i − x_j] + M_ij) v_j

  with B the optional relative position bias. With `shift=(sy, sx)` (Swin's shifted windows)
  the image is cyclically rolled by (−sy, −sx) before partitioning and rolled back after, and
  M = −∞ between tokens of a window that come from different regions of the rolled image
  (Swin's three slices per axis), so wrapped-around tokens never mix with their new
  neighbours. Computed on reshaped windows, O(seq·a·c); no causal form.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, tokens in row-major order.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: optional boolean mask broadcastable to `[batch, num_heads, seq, seq]` (e.g. key
      padding), read inside each window; a token with nothing left returns zeros.
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    window_size: `(a, c)` (or an int for square windows) dividing `(h, w)`; default Swin's
      and MaxViT's 7 x 7, per side the largest divisor of the grid's side up to 7.
    shift: Swin's cyclic shift, an int or `(sy, sx)` with `0 <= shift < window` per axis
      (Swin uses `window // 2` in every other block).
    rpb: relative position bias `[num_heads, 2a−1, 2c−1]`, indexed by query minus key
      position plus `(a−1, c−1)` as in Swin.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("window", is_causal)
  dims = common.check_qkv(query, key, value)
  grid = check_grid(grid, dims.q_len)
  size = check_partition("window_size", window_size, grid, PAPER_PARTITION)
  pair = (shift, shift) if isinstance(shift, (int, np.integer)) else shift
  try:
    sy, sx = (checks.int_in_range("shift", v, 0, n - 1) for v, n in zip(pair, size, strict=True))
  except (TypeError, ValueError):
    raise ValueError(f"shift must be an int or a pair (sy, sx) with 0 <= shift < window_size "
                     f"{size}, got {shift!r}") from None
  return _partitioned(query, key, value, dims, mask=mask, scale=scale, grid=grid, size=size,
                      dilated=False, rpb=rpb, shift=(sy, sx))


@register("grid", causal=False, grid=True)
def grid_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                   grid_size=None, rpb=None):
  """Grid attention: MaxViT, Multi-Axis Vision Transformer (Tu et al., 2022).

  The `grid=(h, w)` image is seen as a `grid_size=(a, c)` grid of cells of `(h/a, w/c)` tokens;
  the tokens at the same offset inside their cells form one group γ(i) of a·c tokens spread
  over the whole image (a dilated, global, sparse pattern), and attend to each other:

      out_i = Σ_{j∈γ(i)} softmax_j(s·q_i·k_j + B[u_i − u_j, v_i − v_j]) v_j

  with (u, v) the cell index of a token and B the optional relative position bias. MaxViT
  follows block attention (`window`) with grid attention of the same size. O(seq·a·c); no
  causal form.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, tokens in row-major order.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: optional boolean mask broadcastable to `[batch, num_heads, seq, seq]`, read inside
      each group; a token with nothing left returns zeros.
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    grid_size: `(a, c)` (or an int) dividing `(h, w)`: tokens per group along each axis;
      default MaxViT's G = 7 x 7, per side the largest divisor of the grid's side up to 7.
    rpb: relative position bias `[num_heads, 2a−1, 2c−1]` over cell offsets (query minus key).

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("grid", is_causal)
  dims = common.check_qkv(query, key, value)
  grid = check_grid(grid, dims.q_len)
  size = check_partition("grid_size", grid_size, grid, PAPER_PARTITION)
  return _partitioned(query, key, value, dims, mask=mask, scale=scale, grid=grid, size=size,
                      dilated=True, rpb=rpb)


class _RelativePositionBiasParams(OpParams):
  """A relative position bias table `rpb`, `[num_heads, 2a−1, 2c−1]` for groups of `a × c`
  tokens (`op_args[size_arg]`, default as the op's), truncated-normal initialised with std 0.02
  as in Swin. `op_args["rpb"] = None` asks for no bias (Twins LSA, DaViT): no table, `{}` returned."""
  size_arg = ""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, key, value
    op_args = self.op_args or {}
    if "rpb" in op_args and op_args["rpb"] is None:
      return {}
    size = op_args.get(self.size_arg)
    if size is None:  # The op's default, which depends on the grid.
      a, c = check_partition(self.size_arg, size, patch_grid(op_args, query.shape[1]),
                             PAPER_PARTITION)
    else:
      a, c = checks.int_tuple(f"op_args[{self.size_arg!r}]", size)
    rpb = self.param(
        "rpb", nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02),
                                            ("heads", None, None)),
        (self.num_heads, 2 * a - 1, 2 * c - 1), self.param_dtype)
    (rpb,) = nn.dtypes.promote_dtype(rpb, dtype=self.dtype)
    return {"rpb": rpb}


@register_params("window")
class WindowParams(_RelativePositionBiasParams):
  """Relative position bias of window attention (Swin; MaxViT block attention), sized by
  `op_args["window_size"]`. Returns `{"rpb": [num_heads, 2a−1, 2c−1]}`."""
  size_arg = "window_size"


@register_params("grid")
class GridParams(_RelativePositionBiasParams):
  """Relative position bias of MaxViT grid attention, sized by `op_args["grid_size"]`.
  Returns `{"rpb": [num_heads, 2a−1, 2c−1]}`."""
  size_arg = "grid_size"
