"""QuadTree attention: coarse-to-fine attention over a token pyramid of an image.

QuadTree Attention for Vision Transformers (Tang et al., ICLR 2022), the QuadTree-B variant:
full attention between the coarsest patches, then, level by level, each query patch attends only
to the children of the top-K key patches its parent selected, with weights chained through the
parents'; the messages of the levels are summed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import register


# QuadTree Attention's defaults: K = 8 patches kept per level, pyramids of up to 3 levels.
QUADTREE_TOPK = 8
QUADTREE_LEVELS = 3


def _pool(x, grid: tuple[int, int], factor: int):
  """`[b, h·w, ...]` -> `[b, (h/f)·(w/f), ...]`: means over non-overlapping f×f patches."""
  h, w = grid
  x = x.reshape(x.shape[0], h // factor, factor, w // factor, factor, *x.shape[2:])
  return jnp.mean(x, axis=(2, 4)).reshape(x.shape[0], (h // factor) * (w // factor),
                                           *x.shape[5:])


def _gather(x, index):
  """`x [b, k, N, c]` at `index [b, k, g, M]` -> `[b, k, g, M, c]`."""
  return jnp.take_along_axis(x[:, :, None], index[..., None], axis=3)


@register("quadtree", causal=False, grid=True)
def quadtree_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                       grid=None, levels=None, topk=None):
  """QuadTree-B attention (QuadTree Attention for Vision Transformers, Tang et al. 2022).

  Q, K, V are average-pooled into pyramids of `levels` levels: level l (0 = coarsest) has
  patches of 2^(levels−1−l) × 2^(levels−1−l) tokens. With s the logit scale:

      level 0:  w⁰_ij = softmax_j(s·q⁰_i·k⁰_j) over all coarse key patches j
      level l:  w^l_ij = w^(l−1)_{P(i) P(j)} · softmax_{j ∈ C(P(j))}(s·q^l_i·k^l_j)
                for j a child of one of the top-K key patches T^(l−1)_{P(i)} (largest
                weights) of the query's parent P(i); C(p) are p's 4 children, so the
                softmax runs over j's siblings
      m^l_i = Σ_{j ∉ T^l_i} w^l_ij v^l_j   (at the finest level every candidate j),
      out_i = Σ_l m^l_{a_l(i)},  a_l(i) the level-l patch holding token i.

  Each level's weights redistribute the parents' weights over their children (QuadTree-B),
  so the weights over the partition of the image into unrefined patches sum to one. Cost
  O(N₀² + Σ_l N_l·4K), N_l patches at level l. The top-K selection is discrete: gradients
  flow through the weights and values of the selected patches, not through the choice.
  No causal form, no mask (pooled keys mix tokens).

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, row-major image tokens.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]` (GQA allowed).
    mask: must be None.
    is_causal: must be False.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)` with h·w == seq; h and w divisible by 2^(levels−1).
    levels: number of pyramid levels ≥ 1 (1 is full softmax attention); default 3 (the
      paper's pyramids), fewer when the grid's sides are not divisible by 4.
    topk: patches kept per query patch and level, in `[1, N₀]` (N₀ coarsest
      patches); unused when levels == 1; default the paper's K = 8, at most N₀.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("quadtree", is_causal)
  if mask is not None:
    raise ValueError("quadtree takes no mask (its pooled keys mix tokens); got a mask")
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len:
    raise ValueError("quadtree is self-attention over one image: q_len must equal kv_len, "
                     f"got {dims.q_len} and {dims.kv_len}")
  h, w = windowed.check_grid(grid, dims.q_len)
  if levels is None:
    levels = max(l for l in range(1, QUADTREE_LEVELS + 1)
                 if h % 2 ** (l - 1) == 0 and w % 2 ** (l - 1) == 0)
  levels = checks.int_in_range("levels", levels, 1)
  coarsest = 2 ** (levels - 1)
  if h % coarsest or w % coarsest:
    raise ValueError(f"grid {(h, w)} must be divisible by 2^(levels-1) = {coarsest} along both "
                     f"sides for {levels} levels")
  num_coarse = (h // coarsest) * (w // coarsest)
  if levels > 1:
    topk = checks.int_in_range("topk", min(QUADTREE_TOPK, num_coarse) if topk is None else topk,
                               1, num_coarse)
  scale = common.default_scale(dims.head_dim, scale)
  b, kh, g = dims.batch, dims.num_kv_heads, dims.groups

  def pyramid(l):
    """Level l: q `[b, k, g, N, d]`, k `[b, k, N, d]`, v `[b, k, N, dv]` in float32."""
    f = 2 ** (levels - 1 - l)
    q = _pool(query.astype(jnp.float32), (h, w), f)
    q = jnp.moveaxis(common.group_query(q, kh), 1, 3)
    k = jnp.moveaxis(_pool(key.astype(jnp.float32), (h, w), f), 1, 2)
    v = jnp.moveaxis(_pool(value.astype(jnp.float32), (h, w), f), 1, 2)
    return q, k, v

  def ancestors(l):
    """Level-l patch of every token, `[h·w]` (NumPy)."""
    f = 2 ** (levels - 1 - l)
    y, x = np.divmod(np.arange(h * w), w)
    return (y // f) * (w // f) + x // f

  out = jnp.zeros((b, kh, g, h * w, dims.value_dim), jnp.float32)
  q, k, v = pyramid(0)
  weights = jax.nn.softmax(jnp.einsum("bkgid,bkjd->bkgij", q, k) * scale, axis=-1)
  candidates = jnp.broadcast_to(jnp.arange(num_coarse), weights.shape)  # key patch ids
  kept_ids = kept_w = None  # the top-K key patches of every query patch, and their weights
  values = v[:, :, None, None]  # [b, k, 1, 1, N₀, dv]: every query patch sees every key patch
  for l in range(levels):
    if l > 0:
      q, k, v = pyramid(l)
      side, prev_side = w // 2 ** (levels - 1 - l), w // 2 ** (levels - l)
      patch = np.arange(q.shape[3])
      parent = (patch // side // 2) * prev_side + (patch % side) // 2  # [N_l]
      sel_ids, sel_w = kept_ids[:, :, :, parent], kept_w[:, :, :, parent]  # [b, k, g, N_l, K]
      py, px = jnp.divmod(sel_ids, prev_side)
      dy, dx = np.divmod(np.arange(4), 2)
      candidates = ((2 * py[..., None] + dy) * side + 2 * px[..., None] + dx)  # [.., K, 4]
      candidates = candidates.reshape(*candidates.shape[:4], 4 * topk)
      keys = _gather(k, candidates.reshape(b, kh, g, -1)).reshape(*candidates.shape, -1)
      logits = jnp.einsum("bkgid,bkgicd->bkgic", q, keys) * scale
      sibling = jax.nn.softmax(logits.reshape(*logits.shape[:4], topk, 4), axis=-1)
      weights = (sel_w[..., None] * sibling).reshape(logits.shape)
      values = _gather(v, candidates.reshape(b, kh, g, -1)).reshape(*candidates.shape, -1)
    keep = weights
    if l < levels - 1:
      _, chosen = jax.lax.top_k(jax.lax.stop_gradient(weights), topk)
      kept_ids = jnp.take_along_axis(candidates, chosen, axis=-1)
      kept_w = jnp.take_along_axis(weights, chosen, axis=-1)
      refined = jnp.any(jax.nn.one_hot(chosen, weights.shape[-1], dtype=jnp.bool_), axis=-2)
      keep = jnp.where(refined, 0.0, weights)
    message = jnp.einsum("bkgic,bkgicd->bkgid", keep,
                         jnp.broadcast_to(values, keep.shape + (dims.value_dim,)))
    out = out + message[:, :, :, ancestors(l)]
  out = jnp.moveaxis(out, 3, 1).reshape(b, h * w, dims.num_heads, dims.value_dim)
  return out.astype(query.dtype)
