"""Sparse Distributed Memory read as attention: weights from the intersections of Hamming
balls, and the softmax inverse temperature β that approximates them."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.ngpt import l2_normalize
from big_attn.ops.registry import register


@functools.lru_cache(maxsize=None)
def log_circle_intersections(dim: int, radius: int) -> np.ndarray:
  """`[2·radius + 1]` float64: log |O(ξ, d) ∩ O(p, d)| for Hamming distances
  d_v = |ξ − p| = 0..2d between two vectors of {0, 1}^n (n = `dim`, d = `radius`), the number of
  vectors within d of both (zero beyond 2d):

      Σ_{a, b} C(n − d_v, a)·C(d_v, b)  over a + b ≤ d and a + d_v − b ≤ d,

  a vector differing from ξ in a of the n − d_v positions where ξ and p agree and in b of the
  d_v where they differ."""
  def log_comb(n, k):
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

  out = np.empty(2 * radius + 1)
  for dv in range(2 * radius + 1):
    terms = [log_comb(dim - dv, a) + log_comb(dv, b)
             for a in range(min(dim - dv, radius) + 1) for b in range(dv + 1)
             if a + b <= radius and a + dv - b <= radius]
    top = max(terms)
    out[dv] = top + math.log(sum(math.exp(t - top) for t in terms))
  return out


def sdm_softmax_beta(dim: int, radius: int) -> float:
  """β of Attention Approximates Sparse Distributed Memory's correspondence: the slope of the
  least-squares line through log |O ∩ O|(d_v) over d_v = 0..radius (the distances within the
  read radius, where the weight is), so that |O ∩ O|(d_v) ≈ c·e^(−β·d_v) and the SDM read is
  ≈ softmax attention with the logit scale β·n/2 on L2-normalised queries and keys
  (d_v = n·(1 − cos)/2)."""
  dim, radius = _check_sizes(dim, radius)
  logs = log_circle_intersections(dim, radius)[:radius + 1]
  slope = np.polyfit(np.arange(radius + 1), logs, 1)[0] if radius else logs[0] - logs[1]
  return float(-slope)


def _check_sizes(dim, radius):
  dim = checks.positive_int("head_dim", dim)
  radius = checks.int_in_range("radius", radius, 0, dim)
  return dim, radius


@register("sdm", segment_ids=True, head_args={})
def sdm_attention(query, key, value, *, mask=None, is_causal=False, scale=None, radius=None,
                  segment_ids=None):
  """The read of Kanerva's Sparse Distributed Memory (Attention Approximates Sparse Distributed
  Memory, Bricken & Pehlevan 2021): key j (a pattern's address) was written to every neuron
  within Hamming distance d of it and query i reads every neuron within d of itself, so value j
  enters the read with the number of neurons in both balls, the circle intersection
  c(d_v) = |O(q_i, d) ∩ O(k_j, d)| (`log_circle_intersections`; the neurons' density r/2^n
  cancels), normalised:

      out_i = Σ_j c(d_v(q_i, k_j))·v_j / Σ_j c(d_v(q_i, k_j)),

  with the Hamming distance of n = head_dim bits taken from the cosine of the L2-normalised
  vectors, d_v = n·(1 − cos)/2 (exact for ±1 vectors; between integers log c is interpolated
  linearly, so the op is differentiable in the queries and keys). Keys at d_v > 2d share no
  neuron with the query and get weight 0. As log c is close to linear in d_v, the read is close
  to softmax attention with the scale β·n/2 on normalised queries and keys
  (`sdm_softmax_beta`), the paper's correspondence.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, segment_ids: as `dot_product_attention`.
    scale: must be None (the intersections set the weights).
    radius: the Hamming radius d of reads and writes, 0..head_dim; None: head_dim // 4 (our
      choice, not the paper's).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; rows with no key within 2d
    give zeros.
  """
  if scale is not None:
    raise ValueError(f"scale must be None for op 'sdm' (the circle intersections set the "
                     f"weights), got {scale!r}")
  dims = common.check_qkv(query, key, value)
  n = dims.head_dim
  _, radius = _check_sizes(n, n // 4 if radius is None else radius)
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids)
  unit = lambda x: l2_normalize(x.astype(jnp.float32))  # noqa: E731
  cosine = common.attention_logits(unit(query), unit(key), dims, 1.0)  # [b, k, g, t, s]
  distance = 0.5 * n * (1.0 - cosine)
  reached = distance <= 2 * radius
  allowed = reached if full_mask is None else reached & common.grouped(full_mask, dims)
  table = jnp.asarray(log_circle_intersections(n, radius), jnp.float32)
  inside = jnp.clip(distance, 0.0, 2 * radius)
  lower = jnp.clip(jnp.floor(inside), 0, max(2 * radius - 1, 0)).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, 2 * radius)
  frac = inside - lower
  log_weights = table[lower] * (1.0 - frac) + table[upper] * frac
  log_weights = jnp.where(jnp.isnan(distance), jnp.nan, log_weights)
  weights = common.masked_softmax(log_weights, allowed | jnp.isnan(distance))
  return common.weighted_values(weights, value.astype(jnp.float32), dims).astype(query.dtype)
