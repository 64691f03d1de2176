"""Hard (stochastic) attention: one key per query, sampled from the attention distribution.

`hard_attention` draws z ~ Cat(softmax(s)) and returns v_z; its gradient is the score-function
(REINFORCE) estimator with a baseline. Without a random key it is deterministic (the
expectation Σ p_j v_j, or the value of the most probable key).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params

EVAL_MODES = ("expectation", "argmax")
BASELINES = ("expectation", "none")


def _log_probs(logits, mask):
  """Masked log-softmax, 0 at masked keys (so that a one-hot weight never meets −inf)."""
  if mask is not None:
    logits = jnp.where(mask, logits, common.MASKED_LOGIT)
  log_p = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return log_p if mask is None else jnp.where(mask, log_p, 0.0)


def _one_hot_choice(scores, mask):
  """One-hot `[.., s]` of argmax(scores) over the allowed keys; rows without keys are 0."""
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  choice = jax.nn.one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1], dtype=jnp.float32)
  return choice if mask is None else choice * jnp.any(mask, axis=-1, keepdims=True)


@register("hard_attention", segment_ids=True,
          block_refusal=(
              "its output is one value v_z, z drawn from (or the argmax of) the softmax over all "
              "the row's keys, with a score-function gradient through log p_z: a sample of the "
              "whole row is not a weighted sum that key blocks merge"))
def hard_attention(query, key, value, *, mask=None, is_causal=False, scale=None, rng=None,
                   eval_mode="expectation", baseline="expectation", segment_ids=None):
  """Hard attention: Show, Attend and Tell: Neural Image Caption Generation with Visual
  Attention (Xu et al., 2015, "hard" stochastic attention) and Latent Alignment and
  Variational Attention (Deng et al., 2018, categorical alignment trained by REINFORCE).

  The alignment is a latent categorical variable, p = softmax(s·QKᵀ) (masked), and

      z_i ~ Cat(p_i),   out_i = v_{z_i}.

  Training (`rng` given): the gradient is the score-function estimator of ∇E_z[L(v_z)] with
  the loss linearised at the output, L ≈ gᵀout for the incoming cotangent g:

      ∂/∂s_ij ≈ (gᵀ(v_{z_i} − b_i)) ∂log p_{z_i}/∂s_ij,   ∂/∂v_{z_i} = g_i,

  with the baseline b_i = Σ_j p_ij v_j (`baseline="expectation"`, the value a
  non-stochastic layer would return; it leaves the estimator unbiased since E[∇log p_z] = 0)
  or none. Its expectation over z is the exact gradient of gᵀE[out]. It is implemented by the
  surrogate out = v_z + (log p_z − sg(log p_z))·sg(v_z − b), whose value is v_z.
  Deterministic evaluation (`rng=None`): `eval_mode="expectation"` returns E[out] = Σ_j p_ij v_j
  (differentiable exactly, as the papers' test-time soft attention) and `"argmax"` returns
  v_{argmax_j p_ij} (gradient to the values only). The variational posterior of Deng et al.
  needs the target and belongs to the model, not the op.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key, value: `[batch, kv_len, num_kv_heads, head_dim | value_dim]` (GQA when fewer heads).
    mask: boolean, broadcastable to `[batch, num_heads, q_len, kv_len]`.
    is_causal: query t samples among keys s <= t.
    scale: logit scale s; `1/sqrt(head_dim)` when None.
    rng: a `jax.random` key: sample z (training); None: deterministic `eval_mode`.
    eval_mode: "expectation" or "argmax", used when `rng` is None.
    baseline: "expectation" (b = Σ_j p_j v_j) or "none", the REINFORCE control variate.
    segment_ids: as in `dot_product_attention`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; query rows with no key to
    attend give zeros.
  """
  if eval_mode not in EVAL_MODES:
    raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  probs = common.masked_softmax(logits, full_mask)
  v = value.astype(jnp.float32)
  if rng is None:
    if eval_mode == "expectation":
      return common.weighted_values(probs, v, dims).astype(query.dtype)
    # NaN scores give NaN, as every other op does, instead of some key's value.
    choice = jnp.where(jnp.isnan(probs).any(-1, keepdims=True), jnp.nan,
                       _one_hot_choice(jax.lax.stop_gradient(probs), full_mask))
    return common.weighted_values(choice, v, dims).astype(query.dtype)
  if not (isinstance(rng, jax.Array) and (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                         or (rng.dtype == jnp.uint32 and rng.shape == (2,)))):
    raise ValueError(f"rng must be a jax.random key or None, got {rng!r}")
  log_p = _log_probs(logits, full_mask)
  gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
  choice = _one_hot_choice(jax.lax.stop_gradient(log_p) + gumbel, full_mask)
  sampled = common.weighted_values(choice, v, dims)
  if baseline == "expectation":
    base = common.weighted_values(probs, v, dims)
  else:
    base = jnp.zeros_like(sampled)
  log_p_z = jnp.moveaxis(jnp.sum(choice * log_p, axis=-1), -1, 1)  # [b, t, k, g]
  log_p_z = log_p_z.reshape(dims.batch, dims.q_len, dims.num_heads, 1)
  surrogate = (log_p_z - jax.lax.stop_gradient(log_p_z)) * jax.lax.stop_gradient(sampled - base)
  return (sampled + surrogate).astype(query.dtype)


@register_params("hard_attention")
class HardAttentionParams(OpParams):
  """No weights: hands `hard_attention` the layer's "dropout" random stream as `rng` when the
  model is applied with one (training), so that evaluation without it is deterministic."""

  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    return {"rng": self.make_rng("dropout")} if self.has_rng("dropout") else {}
