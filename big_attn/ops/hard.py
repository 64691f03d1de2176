"""Hard (stochastic) attention: one key per query, sampled from the attention distribution,
and variational attention, which samples it from an amortised posterior.

`hard_attention` draws z ~ Cat(softmax(s)) and returns v_z; its gradient is the score-function
(REINFORCE) estimator with a baseline. Without a random key it is deterministic (the
expectation Σ p_j v_j, or the value of the most probable key).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import BlockForm, HeadArg, OpParams, register, register_params

Array = jax.Array

EVAL_MODES = ("expectation", "argmax")
BASELINES = ("expectation", "none")


def log_probs(logits, mask):
  """Masked log-softmax, 0 at masked keys (so that a one-hot weight never meets −inf)."""
  if mask is not None:
    logits = jnp.where(mask, logits, common.MASKED_LOGIT)
  log_p = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return log_p if mask is None else jnp.where(mask, log_p, 0.0)


def head_keys(rng, num_heads: int, batch: int) -> Array:
  """`[num_heads, batch, ...]` uint32 key data of `fold_in(fold_in(rng, h), b)`: the noise of
  head h of batch element b."""
  rng = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
  fold = lambda h, b: jax.random.key_data(  # noqa: E731
      jax.random.fold_in(jax.random.fold_in(rng, h), b))
  return jax.vmap(jax.vmap(fold, (None, 0)), (0, None))(jnp.arange(num_heads),
                                                         jnp.arange(batch))


def pair_gumbel(keys: Array, q_pos: Array, k_pos: Array) -> Array:
  """Gumbel noise `[batch, heads, t, s]` of the pairs (query at global position q_pos[i], key at
  k_pos[j]) of each head and batch element (`keys` from `head_keys`): a function of those and
  the pair's global positions only, so any block of the sequence draws the same noise for a
  pair."""
  def one(key, i, j):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), i), j)
    return jax.random.gumbel(key, (), jnp.float32)
  pairs = jax.vmap(jax.vmap(one, (None, None, 0)), (None, 0, None))
  noise = jax.vmap(jax.vmap(pairs, (0, None, None)), (0, None, None))(keys, q_pos, k_pos)
  return jnp.swapaxes(noise, 0, 1)


def _one_hot_choice(scores, mask):
  """One-hot `[.., s]` of argmax(scores) over the allowed keys; rows without keys are 0."""
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  choice = jax.nn.one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1], dtype=jnp.float32)
  return choice if mask is None else choice * jnp.any(mask, axis=-1, keepdims=True)


def check_rng(rng):
  if not (isinstance(rng, jax.Array) and (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                         or (rng.dtype == jnp.uint32 and rng.shape == (2,)))):
    raise ValueError(f"rng must be a jax.random key or None, got {rng!r}")


def _check_modes(eval_mode, baseline):
  if eval_mode not in EVAL_MODES:
    raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def _block_form(query, key, scale, *, rng=None, eval_mode="expectation",
                baseline="expectation") -> BlockForm:
  """Softmax for the expectation; otherwise the "hard" rule: blocks keep the max of s + g over
  their keys with its value and position, and their log-sum-exp (and softmax output for the
  baseline); the noise g of each pair comes from `pair_gumbel` at its global positions."""
  _check_modes(eval_mode, baseline)
  if rng is None and eval_mode == "expectation":
    return BlockForm("softmax", query, key, scale)
  keys = None
  if rng is not None:
    check_rng(rng)
    keys = head_keys(rng, query.shape[2], query.shape[0])
  return BlockForm("hard", query, key, scale,
                   params=dict(sampled=float(rng is not None),
                               baseline=float(rng is not None and baseline == "expectation")),
                   pair_arrays=keys)


@register("hard_attention", segment_ids=True, block_form=_block_form)
def hard_attention(query, key, value, *, mask=None, is_causal=False, scale=None, rng=None,
                   eval_mode="expectation", baseline="expectation", segment_ids=None):
  """Hard attention: Show, Attend and Tell: Neural Image Caption Generation with Visual
  Attention (Xu et al., 2015, "hard" stochastic attention) and Latent Alignment and
  Variational Attention (Deng et al., 2018, categorical alignment trained by REINFORCE).

  The alignment is a latent categorical variable, p = softmax(s·QKᵀ) (masked), and

      z_i ~ Cat(p_i),   out_i = v_{z_i},

  drawn by Gumbel-max, z_i = argmax_j s_ij + g_ij, with standard Gumbel noise g_ij drawn from
  `fold_in(rng, head, batch element, i, j)` (`pair_gumbel`): independent over pairs, so z has
  exactly the categorical distribution, and a function of the pair's global positions, so the
  ring and striped schedules, which merge the blocks' max of s + g, choose the same z.

  Training (`rng` given): the gradient is the score-function estimator of ∇E_z[L(v_z)] with
  the loss linearised at the output, L ≈ gᵀout for the incoming cotangent g:

      ∂/∂s_ij ≈ (gᵀ(v_{z_i} − b_i)) ∂log p_{z_i}/∂s_ij,   ∂/∂v_{z_i} = g_i,

  with the baseline b_i = Σ_j p_ij v_j (`baseline="expectation"`, the value a
  non-stochastic layer would return; it leaves the estimator unbiased since E[∇log p_z] = 0)
  or none. Its expectation over z is the exact gradient of gᵀE[out]. It is implemented by the
  surrogate out = v_z + (log p_z − sg(log p_z))·sg(v_z − b), whose value is v_z.
  Deterministic evaluation (`rng=None`): `eval_mode="expectation"` returns E[out] = Σ_j p_ij v_j
  (differentiable exactly, as the papers' test-time soft attention) and `"argmax"` returns
  v_{argmax_j p_ij} (gradient to the values only). Deng et al.'s variational posterior is
  `variational_attention`.

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
  _check_modes(eval_mode, baseline)
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
  check_rng(rng)
  return _reinforce_sample(logits, probs, full_mask, v, dims, rng, baseline).astype(query.dtype)


def _reinforce_sample(logits, probs, full_mask, v, dims, rng, baseline):
  """v_z with z ~ Cat(probs) drawn by Gumbel-max from `pair_gumbel`, as the surrogate
  v_z + (log p_z − sg(log p_z))·sg(v_z − b) whose gradient wrt the logits is REINFORCE's with
  the baseline b (`baseline`: "expectation", Σ_j p_j v_j, or "none"); float32 `[b, t, n, d]`."""
  log_p = log_probs(logits, full_mask)
  positions = lambda n: jnp.arange(n, dtype=jnp.int32)  # noqa: E731
  gumbel = pair_gumbel(head_keys(rng, dims.num_heads, dims.batch), positions(dims.q_len),
                       positions(dims.kv_len)).reshape(logits.shape)
  choice = _one_hot_choice(jax.lax.stop_gradient(logits) + gumbel, full_mask)
  sampled = common.weighted_values(choice, v, dims)
  if baseline == "expectation":
    base = common.weighted_values(probs, v, dims)
  else:
    base = jnp.zeros_like(sampled)
  log_p_z = jnp.moveaxis(jnp.sum(choice * log_p, axis=-1), -1, 1)  # [b, t, k, g]
  log_p_z = log_p_z.reshape(dims.batch, dims.q_len, dims.num_heads, 1)
  surrogate = (log_p_z - jax.lax.stop_gradient(log_p_z)) * jax.lax.stop_gradient(sampled - base)
  return sampled + surrogate


def _posterior_scores(query, key, value, posterior_query, *, scale, mask, is_causal,
                      segment_ids):
  """Prior and posterior `(dims, prior_logits, posterior_logits, mask)`, grouped as
  `common.scores`; the posterior's queries `[batch, q_len, num_heads, head_dim]`."""
  dims, prior, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                         is_causal=is_causal, segment_ids=segment_ids)
  common.check_weight("posterior_query", posterior_query, query.shape,
                      "[batch, q_len, num_heads, head_dim]")
  posterior = common.attention_logits(posterior_query, key, dims,
                                      common.default_scale(dims.head_dim, scale))
  return dims, prior, posterior, full_mask


@register("variational_attention", segment_ids=True,
          head_args={"posterior_query": HeadArg(per_token=True)},
          block_refusal=(
              "its sample is drawn from the posterior's softmax over the whole row and "
              "returned with the REINFORCE surrogate of that row's log-probability, which the "
              "block merges of hard attention do not form for a second set of queries"))
def variational_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                          posterior_query=None, rng=None, baseline="expectation",
                          segment_ids=None):
  """Categorical variational attention (Latent Alignment and Variational Attention, Deng et
  al. 2018): the alignment z_i is latent, with the prior p(z_i) = softmax(s·q_i·Kᵀ) (masked)
  given by the queries and an amortised posterior q(z_i) = softmax(s·q̃_i·Kᵀ) whose queries q̃
  (`posterior_query`) come from an inference network that also reads the target y. Training
  maximises the ELBO

      log p(y) ≥ E_{z~q}[log p(y | v_z)] − KL(q(z) ‖ p(z)),

  and this op is its first term's alignment: with `rng`, z_i ~ q(z_i) (Gumbel-max, noise as
  `hard_attention`'s) and out_i = v_{z_i}; the gradient wrt the posterior's logits is the
  score-function (REINFORCE) estimator of the loss linearised at the output, with the baseline
  b_i = Σ_j q_ij v_j (soft attention under the posterior; `baseline="none"`: 0), the values'
  gradient pathwise. The prior's gradient comes from the KL term, `variational_kl`, which the
  model adds to its loss. Without `rng` (evaluation: the target is unknown) the output is the
  prior's expectation Σ_j p_ij v_j, soft attention. The paper's relaxed (Dirichlet)
  alignments are not implemented.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention` (prior and posterior).
    posterior_query: q̃ `[batch, q_len, num_heads, head_dim]`, needed with `rng`.
    rng: a `jax.random` key: sample from the posterior (training); None: the prior's mean.
    baseline: "expectation" or "none", the REINFORCE control variate.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; rows with no key give zeros.
  """
  _check_modes("expectation", baseline)
  if rng is None:
    dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                            is_causal=is_causal, segment_ids=segment_ids)
    probs = common.masked_softmax(logits, full_mask)
    return common.weighted_values(probs, value.astype(jnp.float32), dims).astype(query.dtype)
  check_rng(rng)
  dims, _, posterior, full_mask = _posterior_scores(
      query, key, value, posterior_query, scale=scale, mask=mask, is_causal=is_causal,
      segment_ids=segment_ids)
  probs = common.masked_softmax(posterior, full_mask)
  return _reinforce_sample(posterior, probs, full_mask, value.astype(jnp.float32), dims, rng,
                           baseline).astype(query.dtype)


def variational_kl(query, key, posterior_query, *, mask=None, is_causal=False, scale=None,
                   segment_ids=None):
  """KL(q(z_i) ‖ p(z_i)) = Σ_j q_ij (log q_ij − log p_ij) of `variational_attention`'s
  posterior and prior alignments, `[batch, q_len, num_heads]` float32 (0 for rows with no
  key): the term the ELBO subtracts, differentiable in all three arrays."""
  dims, prior, posterior, full_mask = _posterior_scores(
      query, key, key, posterior_query, scale=scale, mask=mask, is_causal=is_causal,
      segment_ids=segment_ids)
  log_q, log_p = log_probs(posterior, full_mask), log_probs(prior, full_mask)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)  # [b, k, g, t]
  if full_mask is not None:
    kl = jnp.where(jnp.any(full_mask, axis=-1), kl, 0.0)
  return jnp.moveaxis(kl.reshape(dims.batch, dims.num_heads, dims.q_len), 1, 2)


@register_params("hard_attention")
class HardAttentionParams(OpParams):
  """No weights: hands `hard_attention` the layer's "dropout" random stream as `rng` when the
  model is applied with one (training), so that evaluation without it is deterministic."""

  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    return {"rng": self.make_rng("dropout")} if self.has_rng("dropout") else {}
