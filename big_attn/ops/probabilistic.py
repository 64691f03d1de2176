"""Probabilistic attention: the weights are the posterior of a Gaussian mixture over the keys.

`probabilistic_attention` takes its priors and widths as arguments; `ProbabilisticParams` owns
learned ones for the `Attention` layer.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, OpParams, register, register_params


def _posterior(q, keys, log_prior, precision, full_mask):
  """`[b, k, g, t, s]` w_ij ∝ π_j exp(−‖q_i − k_j‖²·precision/2), masked; ‖q_i‖² is the same
  for every key of a row and cancels."""
  dot = jnp.einsum("btkgd,bskd->bkgts", q, keys)
  sq = jnp.sum(keys * keys, axis=-1)  # [b, s, k]
  logits = precision * (dot - 0.5 * jnp.transpose(sq, (0, 2, 1))[:, :, None, None, :])
  if log_prior is not None:
    logits = logits + jnp.transpose(log_prior, (0, 2, 1))[:, :, None, None, :]
  return common.masked_softmax(logits, full_mask)


def _precision(sigma, scale, num_heads: int, head_dim: int):
  """1/σ² `[num_heads]` (float32), or the logit scale (default 1/sqrt(head_dim)) when `sigma`
  is None."""
  if sigma is None:
    return jnp.full((num_heads,), common.default_scale(head_dim, scale), jnp.float32)
  common.check_weight("sigma", sigma, (num_heads,), "[num_heads]")
  return 1.0 / sigma.astype(jnp.float32) ** 2


def _check_log_prior(log_prior, key):
  if log_prior is not None:
    common.check_weight("log_prior", log_prior, key.shape[:3], "[batch, kv_len, num_kv_heads]")


def _probabilistic_block_form(query, key, scale, *, sigma=None, log_prior=None, em_steps=0,
                              key_prior_strength=1.0) -> BlockForm:
  """The posterior is a softmax of q̃_i·k̃_j with q̃ = [q/σ², 1/σ², 1] and
  k̃ = [k, −‖k‖²/2, log π] (scale 1; float32 transforms, in the query's dtype): softmax blocks
  merged through the log-sum-exp. The EM steps adapt every key to all queries: `em_steps`
  must be 0."""
  if checks.int_in_range("em_steps", em_steps, 0):
    raise ValueError(f"em_steps={em_steps} adapts every key to all queries, which no key "
                     "block can do alone: use em_steps=0 sequence-parallel")
  checks.positive_float("key_prior_strength", key_prior_strength)
  _check_log_prior(log_prior, key)
  precision = _precision(sigma, scale, query.shape[2], query.shape[3])[:, None]
  q = query.astype(jnp.float32)
  ones = jnp.ones(q.shape[:-1] + (1,), jnp.float32)
  q_ext = jnp.concatenate([q * precision, ones * precision, ones], axis=-1)
  k = key.astype(jnp.float32)
  prior = (jnp.zeros(k.shape[:-1], jnp.float32) if log_prior is None
           else log_prior.astype(jnp.float32))
  k_ext = jnp.concatenate([k, -0.5 * jnp.sum(k * k, axis=-1, keepdims=True), prior[..., None]],
                          axis=-1)
  return BlockForm("softmax", q_ext.astype(query.dtype), k_ext.astype(key.dtype), 1.0)


@register("probabilistic_attention", segment_ids=True, block_form=_probabilistic_block_form)
def probabilistic_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                            sigma=None, log_prior=None, em_steps=0, key_prior_strength=1.0,
                            segment_ids=None):
  """Probabilistic attention (Probabilistic Attention for Interactive Segmentation, Gabbur et
  al. 2021): the keys are the means of an isotropic Gaussian mixture with priors π, and the
  weights are the posterior of each component given the query (MAP inference):

    w_ij = π_j exp(−‖q_i − k_j‖² / 2σ²) / Σ_l π_l exp(−‖q_i − k_l‖² / 2σ²),   out = w V

  With uniform π and keys of equal norm this is softmax(QKᵀ/σ²)V. σ² defaults to 1/scale
  (σ² = √head_dim), so the dot-product term is the usual s·q·k.

  `em_steps` > 0 adapts the keys online, as the paper's EM: each step computes w (E step)
  and moves every key to the MAP estimate of its mean under a Gaussian prior centred on the
  given key k⁰_j, k_j ← (τ k⁰_j + Σ_i w_ij q_i) / (τ + Σ_i w_ij) (M step, τ =
  `key_prior_strength` in units of queries; with grouped-query attention the queries of the
  group's heads all count). The priors π stay as given; the paper's value adaptation needs
  annotator values for some tokens and is not part of this op. Every step is differentiable.
  Causal: keys j > i are masked; the EM steps use all queries and have no causal form.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    sigma: σ, None or `[num_heads]` (nonzero).
    log_prior: log π (up to a constant per row), `[batch, kv_len, num_kv_heads]`, or None
      (uniform).
    em_steps: EM iterations adapting the keys (0: none).
    key_prior_strength: τ > 0.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  em_steps = checks.int_in_range("em_steps", em_steps, 0)
  tau = checks.positive_float("key_prior_strength", key_prior_strength)
  if em_steps and is_causal:
    raise ValueError(f"em_steps={em_steps} adapts every key to all queries, which has no "
                     "causal form: use em_steps=0 with is_causal=True")
  k, g = dims.num_kv_heads, dims.groups
  precision = _precision(sigma, scale, dims.num_heads, dims.head_dim).reshape(1, k, g, 1, 1)
  _check_log_prior(log_prior, key)
  if log_prior is not None:
    log_prior = log_prior.astype(jnp.float32)
  full_mask = common.grouped(common.make_mask(dims, mask=mask, is_causal=is_causal,
                                              segment_ids=segment_ids), dims)
  q = common.group_query(query, k).astype(jnp.float32)
  key0 = keys = key.astype(jnp.float32)
  for _ in range(em_steps):
    w = _posterior(q, keys, log_prior, precision, full_mask)
    counts = jnp.transpose(jnp.sum(w, axis=(2, 3)), (0, 2, 1))[..., None]  # [b, s, k, 1]
    pulled = jnp.einsum("bkgts,btkgd->bskd", w, q)
    keys = (tau * key0 + pulled) / (tau + counts)
  w = _posterior(q, keys, log_prior, precision, full_mask)
  return common.weighted_values(w, value, dims).astype(query.dtype)


@register_params("probabilistic_attention")
class ProbabilisticParams(OpParams):
  """Learned priors and widths of probabilistic attention: `log_prior` = k_j·w_π + b_π per key
  and K/V head, a linear function of the key (`prior_weight [num_kv_heads, head_dim]`, `prior_bias
  [num_kv_heads]`, zeros: uniform priors at the start), and `sigma [num_heads]` = head_dim^¼
  (σ² = √head_dim, dot-product attention's temperature). Returns `{"log_prior", "sigma"}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, value
    zeros = nn.initializers.zeros_init()
    weight = self.param("prior_weight", nn.with_logical_partitioning(
        zeros, ("kv_heads", "head_dim")), (self.num_kv_heads, self.head_dim), self.param_dtype)
    bias = self.param("prior_bias", nn.with_logical_partitioning(zeros, ("kv_heads",)),
                      (self.num_kv_heads,), self.param_dtype)
    sigma = self.param("sigma", nn.with_logical_partitioning(
        nn.initializers.constant(math.sqrt(math.sqrt(self.head_dim))), ("heads",)),
                       (self.num_heads,), self.param_dtype)
    key, weight, bias, sigma = nn.dtypes.promote_dtype(key, weight, bias, sigma,
                                                       dtype=self.dtype)
    return {"log_prior": jnp.einsum("bskd,kd->bsk", key, weight) + bias, "sigma": sigma}
