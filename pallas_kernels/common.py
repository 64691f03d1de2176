"""Input checks, masks and the masked softmax of `[batch, seq, heads, head_dim]` attention,
shared by the kernels, their plain-JAX references and `big_attn.ops` (which re-exports them).

This module depends on JAX and NumPy only: kernels never import `big_attn.ops`, the ops import
the kernels. Keys and values may have fewer heads than queries (grouped-query attention). Masks
are boolean, True = may attend, broadcastable to `[batch, heads, q_seq, kv_seq]`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

class Dims(NamedTuple):
  """Sizes read off validated query/key/value arrays."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_dim: int

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv_heads


def check_float(name: str, x: Any) -> None:
  """`TypeError` naming `name` unless `x` is an array of a floating dtype."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_qkv(query: Array, key: Array, value: Array, *,
              same_head_dim: bool = True) -> Dims:
  """Validates the `[batch, seq, heads, head_dim]` layout; returns the sizes.

  Raises `TypeError` for non-floating inputs and `ValueError` naming the argument for wrong
  ranks, batch/length/head-dim mismatches, or query heads not divisible by kv heads.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    check_float(name, x)
    if x.ndim != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {x.shape}")
  b, t, n, d = query.shape
  bk, s, k, dk = key.shape
  bv, sv, kv, dv = value.shape
  if bk != b or bv != b:
    raise ValueError(
        f"query, key and value must share the batch size, got {b}, {bk} and {bv}")
  if sv != s:
    raise ValueError(f"key and value must share the sequence length, got {s} and {sv}")
  if kv != k:
    raise ValueError(f"key and value must have the same number of heads, got {k} and {kv}")
  if same_head_dim and dk != d:
    raise ValueError(f"key head_dim must equal query head_dim {d}, got {dk}")
  if n % k:
    raise ValueError(
        f"query heads ({n}) must be divisible by key/value heads ({k}) "
        "for grouped-query attention")
  return Dims(b, t, s, n, k, d, dv)


def default_scale(head_dim: int, scale: float | None) -> float:
  return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_broadcastable(name: str, x: Array, dims: Dims) -> None:
  target = (dims.batch, dims.num_heads, dims.q_len, dims.kv_len)
  if x.ndim != 4:
    raise ValueError(
        f"{name} must have rank 4, broadcastable to [batch, heads, q_seq, kv_seq] = "
        f"{target}, got shape {x.shape}")
  for size, want in zip(x.shape, target):
    if size not in (1, want):
      raise ValueError(
          f"{name} of shape {x.shape} is not broadcastable to "
          f"[batch, heads, q_seq, kv_seq] = {target}")


def normalize_window(local_window_size: int | Sequence[int] | None
                     ) -> tuple[int, int] | None:
  """`int` or `(left, right)` -> `(left, right)`, as `jax.nn.dot_product_attention`."""
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)):
    left = right = int(local_window_size)
  else:
    try:
      left, right = (int(w) for w in local_window_size)
    except (TypeError, ValueError):
      raise ValueError(
          "local_window_size must be an int or a pair (left, right), got "
          f"{local_window_size!r}") from None
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must be non-negative, got {(left, right)}")
  return left, right


def normalize_segment_ids(segment_ids, dims: Dims) -> tuple[Array, Array] | None:
  """`[batch, seq]` or a pair `(q_segment_ids, kv_segment_ids)` -> the pair, checked."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be an array or a pair (q_segment_ids, kv_segment_ids)")
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  for name, seg, length in (("q_segment_ids", q_seg, dims.q_len),
                            ("kv_segment_ids", kv_seg, dims.kv_len)):
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {seg.dtype}")
    if seg.shape != (dims.batch, length):
      raise ValueError(
          f"{name} must have shape [batch, seq] = {(dims.batch, length)}, got {seg.shape}")
  return q_seg, kv_seg


def make_mask(dims: Dims, *, mask: Array | None = None, is_causal: bool = False,
              segment_ids=None, local_window_size=None) -> Array | None:
  """Combines every masking argument into one boolean `[b|1, h|1, q, kv]` mask, or None.

  Causal and window masks follow `jax.nn.dot_product_attention`: query i and key j are
  compared by their positions from the start of each sequence (query i sees keys j <= i).
  """
  if mask is not None:
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
    check_broadcastable("mask", mask, dims)
  window = normalize_window(local_window_size)
  segments = normalize_segment_ids(segment_ids, dims)

  combined = mask
  def both(m):
    return m if combined is None else jnp.logical_and(combined, m)

  q_pos = jnp.arange(dims.q_len)[:, None]
  k_pos = jnp.arange(dims.kv_len)[None, :]
  if is_causal:
    combined = both((k_pos <= q_pos)[None, None])
  if window is not None:
    left, right = window
    combined = both(((q_pos - k_pos <= left) & (k_pos - q_pos <= right))[None, None])
  if segments is not None:
    q_seg, kv_seg = segments
    combined = both((q_seg[:, :, None] == kv_seg[:, None, :])[:, None])
  return combined


# Stands for -inf at masked logits: finite (as `jax.nn.dot_product_attention`'s), so masked
# calls raise nothing under `jax.debug_infs(True)`; exp(MASKED_LOGIT - max) is exactly 0.
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def masked_softmax(logits: Array, mask: Array | None, *, as_rows: bool = True) -> Array:
  """Softmax over the last axis in float32; rows with nothing to attend to give zeros.

  A row is empty when its largest logit after masking is at most `EMPTY_ROW_LOGIT`: no key is
  visible, or every visible logit is below -1e38 (a `-inf` bias included). `as_rows=False`
  computes it in the logits' own shape instead of `[rows, kv]` (see below).
  """
  logits = logits.astype(jnp.float32)
  if not as_rows:
    return _masked_softmax(logits, mask)
  shape = logits.shape if mask is None else jnp.broadcast_shapes(logits.shape, mask.shape)
  # Computed on `[rows, last]`: XLA's CPU layout assignment gives a size-1 axis between longer
  # leading axes (the group axis of `[b, k, 1, t, s]` logits without GQA) a layout that costs
  # a copy of the logits and keeps their matmul from fusing with the max; rows have none.
  def rows(x):
    return jnp.broadcast_to(x, shape).reshape(math.prod(shape[:-1]), shape[-1])
  probs = _masked_softmax(rows(logits), None if mask is None else rows(mask))
  return probs.reshape(shape)


# Half of MASKED_LOGIT: a row whose largest masked logit is not above it has no visible key.
EMPTY_ROW_LOGIT = 0.5 * MASKED_LOGIT


@jax.custom_jvp
def _masked_softmax(logits: Array, mask: Array | None) -> Array:
  # The max/exp/sum/divide chain of `jax.nn.softmax`, which XLA fuses into one pass over the
  # logits. The max starts at EMPTY_ROW_LOGIT, so an empty row (all MASKED_LOGIT) has
  # exp(MASKED_LOGIT - EMPTY_ROW_LOGIT) = 0 everywhere and its zero sum divides as 1: zeros,
  # with no flag computed beside the pass. Any other row's sum is >= 1, unchanged; NaN stays NaN.
  if mask is None:
    unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
  logits = jnp.where(mask, logits, MASKED_LOGIT)
  # The max reduction starts at EMPTY_ROW_LOGIT (max is idempotent, so XLA may start each
  # partial reduction there): no clamp between the max and the exp, which XLA fuses.
  top = jax.lax.reduce(logits, np.float32(EMPTY_ROW_LOGIT), jax.lax.max, (logits.ndim - 1,))
  unnormalized = jnp.exp(logits - top[..., None])
  return unnormalized / jnp.maximum(jnp.sum(unnormalized, axis=-1, keepdims=True), 1.0)


@_masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
  # Keeps only the probabilities for the backward pass (zero where masked, so masked logits
  # get zero gradient): one [.., q, kv] residual where autodiff of the chain above keeps three.
  logits_dot = tangents[0]
  probs = _masked_softmax(*primals)
  return probs, probs * (logits_dot - jnp.sum(probs * logits_dot, axis=-1, keepdims=True))


def group_query(query: Array, num_kv_heads: int) -> Array:
  """`[b, t, n, d]` -> `[b, t, k, g, d]`: query heads grouped by the kv head they share."""
  b, t, n, d = query.shape
  return query.reshape(b, t, num_kv_heads, n // num_kv_heads, d)


def _to_grouped_mask(m: Array, dims: Dims) -> Array:
  """`[b|1, n|1, t, s]` -> `[b|1, k|1, g|1, t, s]` to match grouped logits."""
  if m.shape[1] == 1:
    return m[:, :, None]
  return m.reshape(m.shape[0], dims.num_kv_heads, dims.groups, *m.shape[2:])


def attention_logits(query: Array, key: Array, dims: Dims, scale: float,
                     precision: jax.lax.PrecisionLike = None) -> Array:
  """Scaled `q·k` in float32, grouped: `[b, k, g, t, s]` (no copy of K per query head).

  `precision` is the matmul's (None: the backend's default, TF32 for float32 on recent GPUs).
  """
  # Query in the logits' order [b, k, g, t, d] first (a transpose of the small array), so the
  # matmul writes [b, k, g, t, s] directly, and the scale fuses into it.
  q = jnp.transpose(group_query(query, dims.num_kv_heads), (0, 2, 3, 1, 4))
  logits = jnp.einsum("bkgtd,bskd->bkgts", q, key, preferred_element_type=jnp.float32,
                      precision=precision)
  return logits * jnp.float32(scale)


def grouped(x: Array | None, dims: Dims) -> Array | None:
  """A `[b|1, n|1, t, s]` bias or mask laid out like the grouped logits."""
  return None if x is None else _to_grouped_mask(x, dims)


def weighted_values(weights: Array, value: Array, dims: Dims,
                    precision: jax.lax.PrecisionLike = None) -> Array:
  """`[b, k, g, t, s]` weights times `[b, s, k, d]` values -> `[b, t, n, d]`, float32
  accumulation (`precision` as in `attention_logits`)."""
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(value.dtype), value,
                   preferred_element_type=jnp.float32, precision=precision)
  return out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.value_dim)
