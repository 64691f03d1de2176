"""Attention ops that change how scores become weights: clipped, gated, signed, normalised.

Each op computes the scaled scores `s = scale·QKᵀ` in float32 (grouped-query layout, no copy
of K/V per query head), combines `mask`, `is_causal`, `segment_ids` and `local_window_size`
exactly as `dot_product_attention`, gives masked keys weight 0 and returns zeros for query rows
with nothing to attend to.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention, pallas_attention

NORMALIZATIONS = ("standardize", "scale")
# α of clipped softmax's γ = -α/T when neither `gamma` nor `alpha` is given (its docstring).
DEFAULT_CLIP_ALPHA = 0.5
COG_IMPLEMENTATIONS = (None, "xla", "pallas")


def _per_head(name: str, x, dims: common.Dims) -> jax.Array:
  """A scalar or `[num_heads]` float parameter laid out like the grouped scores."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be real, got dtype {x.dtype}")
  if x.ndim == 0:
    return x.astype(jnp.float32)
  if x.shape != (dims.num_heads,):
    raise ValueError(
        f"{name} must be a scalar or have shape [num_heads] = ({dims.num_heads},), "
        f"got shape {x.shape}")
  return x.astype(jnp.float32).reshape(1, dims.num_kv_heads, dims.groups, 1, 1)


def _clip_bounds(zeta, gamma, alpha, kv_len: int) -> tuple[float, float]:
  """Clipped softmax's checked `(ζ, γ)`, with γ = -α/kv_len when `gamma` is None."""
  if gamma is not None and alpha is not None:
    raise ValueError("pass either gamma or alpha (gamma = -alpha / kv_len), not both")
  if gamma is None:
    alpha = DEFAULT_CLIP_ALPHA if alpha is None else alpha
    alpha = checks.non_negative_float("alpha", alpha)
    gamma = -alpha / max(kv_len, 1)  # No keys (kv_len 0): an empty sum, any γ.
  if gamma > 0:
    raise ValueError(f"gamma must be <= 0, got {gamma}")
  if zeta < 1:
    raise ValueError(f"zeta must be >= 1, got {zeta}")
  return zeta, gamma


def _clipped_block_form(query, key, scale, *, zeta=1.0, gamma=None, alpha=None):
  """Clipped softmax in blocks: the softmax's log-sum-exp over all blocks first, then the
  clipped weights of every block, which add (γ from the whole sequence's `kv_len`)."""
  zeta, gamma = _clip_bounds(zeta, gamma, alpha, key.shape[1])
  return BlockForm("clipped_softmax", query, key, scale,
                   {"zeta": float(zeta), "gamma": float(gamma)})


@register("clipped_softmax", segment_ids=True, bias=True, block_form=_clipped_block_form)
def clipped_softmax_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                              bias=None, zeta=1.0, gamma=None, alpha=None, segment_ids=None,
                              local_window_size=None):
  """Clipped softmax (Quantizable Transformers: Removing Outliers by Helping Attention Heads
  Do Nothing, Bondarenko et al. 2023).

  out = clip((ζ - γ)·softmax(s·QKᵀ + B) + γ, 0, 1) V, with γ ≤ 0 and ζ ≥ 1

  The stretch lets a weight reach exactly 0 (or 1) with finite scores, so heads can "do
  nothing" without pushing the softmax input to extremes. The paper sets ζ = 1 and
  γ = -α/T with T the sequence length (here `kv_len`) and α tuned per model (about 3 for
  BERT-base at T = 128, 12 for OPT); `gamma=None` uses that rule with `alpha`.

  Default α = 1/2 (`DEFAULT_CLIP_ALPHA`): at initialisation attention is near uniform
  (p ≈ 1/T), and every α ≥ T/(T − 1) clips all those weights to 0, leaving no gradient
  (α = 4 with CvT's 5 reduced keys). With α = 1/2 the uniform weight stays (1 + 1/T)/(2T) > 0
  and only weights p < 1/(2T + 1) (about half the uniform one) are clipped, for every T; pass
  `alpha` (or `gamma`) for the paper's tuned values. Masked keys get weight 0 and do not
  enter the softmax.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, bias, segment_ids, local_window_size: as `dot_product_attention`.
    zeta: upper stretch factor ζ ≥ 1.
    gamma: lower stretch factor γ ≤ 0; `-alpha / kv_len` when None (`-alpha` for no keys).
    alpha: α of the rule γ = -α/T (1/2 when None, see above); give `gamma` or `alpha`, not
      both.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims, logits, gmask = common.scores(query, key, value, mask=mask, is_causal=is_causal,
                                      scale=scale, segment_ids=segment_ids,
                                      local_window_size=local_window_size, bias=bias)
  zeta, gamma = _clip_bounds(zeta, gamma, alpha, dims.kv_len)
  probs = common.masked_softmax(logits, gmask)
  weights = jnp.clip((zeta - gamma) * probs + gamma, 0.0, 1.0)
  if gmask is not None:
    weights = jnp.where(gmask, weights, 0.0)
  return common.weighted_values(weights, value, dims).astype(query.dtype)


def _check_gate_logits(gate_logits, query) -> None:
  """`gate_logits` must be a floating `[batch, q_len, num_heads]` array (the query's)."""
  want = tuple(query.shape[:3])
  if gate_logits is None:
    raise ValueError(f"gated_attention needs gate_logits of shape [batch, q_len, num_heads] = "
                     f"{want}")
  if not hasattr(gate_logits, "dtype") or not jnp.issubdtype(gate_logits.dtype, jnp.floating):
    raise TypeError("gate_logits must be a floating array, got "
                    f"{getattr(gate_logits, 'dtype', type(gate_logits).__name__)}")
  if gate_logits.shape != want:
    raise ValueError(f"gate_logits must have shape [batch, q_len, num_heads] = {want}, "
                     f"got {gate_logits.shape}")


def _gated_block_form(query, key, scale, *, gate_logits=None, logits_soft_cap=None):
  """Gated attention in blocks: softmax blocks merged through the log-sum-exp, then the gate
  σ(G) multiplied into the merged output."""
  _check_gate_logits(gate_logits, query)
  if logits_soft_cap is not None:
    logits_soft_cap = checks.positive_float("logits_soft_cap", logits_soft_cap)
  return BlockForm("softmax", query, key, scale, {"soft_cap": logits_soft_cap},
                   gate_logits=gate_logits)


@register("gated_attention", segment_ids=True, implementation=True, bias=True,
          block_form=_gated_block_form)
def gated_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                    gate_logits=None, bias=None, segment_ids=None, local_window_size=None,
                    logits_soft_cap=None, implementation=None):
  """Gated attention (Quantizable Transformers: Removing Outliers by Helping Attention Heads
  Do Nothing, Bondarenko et al. 2023).

  out_{t,h} = σ(G(x)_{t,h}) · softmax(s·QKᵀ + B)_{t,h} V

  One gate per token and head lets a head switch its update off without extreme softmax
  inputs. The op takes the gate's logits G(x); `GatedAttentionParams` (below)
  owns the paper's per-head linear map that produces them. The inner attention is
  `dot_product_attention` with the same arguments (so `implementation` picks its backend).

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, bias, segment_ids, local_window_size, logits_soft_cap,
      implementation: as `dot_product_attention`.
    gate_logits: required `[batch, q_len, num_heads]` gate logits G(x) (before the sigmoid).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_qkv(query, key, value)
  _check_gate_logits(gate_logits, query)
  out = dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal, segment_ids=segment_ids,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      implementation=implementation)
  gate = jax.nn.sigmoid(gate_logits.astype(jnp.float32))[..., None]
  return (gate * out.astype(jnp.float32)).astype(query.dtype)


def _cog_block_form(query, key, scale) -> BlockForm:
  """Cog attention in blocks merged through the log-sum-exp of |s|, values weighted by
  sign(s)."""
  return BlockForm("cog", query, key, scale)


@register("cog", segment_ids=True, implementation=True, block_form=_cog_block_form)
def cog_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                  segment_ids=None, local_window_size=None, implementation=None):
  """Cog attention (More Expressive Attention with Negative Weights, Lv et al. 2024).

  w_ij = sign(s_ij) · exp(|s_ij|) / Σ_{j' unmasked} exp(|s_ij'|),  s = scale·QKᵀ;  out = W V

  The magnitudes are a softmax of |s| (stabilised by the row max of |s|, in float32) and the
  signs come from the scores, so a head can add (copy) and subtract (delete) values at once.
  Masked keys get weight 0 and do not enter the normaliser.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids, local_window_size: as `dot_product_attention`.
    implementation: None or "xla": the XLA computation; "pallas": the flash kernel's signed
      normalizer (`pallas_kernels.flash_attention(normalizer="signed")`, an online softmax of
      |S| whose weights carry the signs; GPU kernel, in the Pallas interpreter on CPU), which
      takes masks as `is_causal`, `segment_ids` and `local_window_size` (no `mask` array).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  if implementation not in COG_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {COG_IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if implementation == "pallas":
    dims = common.check_qkv(query, key, value)
    return pallas_attention(query, key, value, mask=mask, caller="cog ", normalizer="signed",
                            scale=common.default_scale(dims.head_dim, scale),
                            is_causal=is_causal, segment_ids=segment_ids,
                            local_window_size=local_window_size)
  dims, logits, gmask = common.scores(query, key, value, mask=mask, is_causal=is_causal,
                                      scale=scale, segment_ids=segment_ids,
                                      local_window_size=local_window_size)
  weights = jnp.sign(logits) * common.masked_softmax(jnp.abs(logits), gmask)
  return common.weighted_values(weights, value, dims).astype(query.dtype)


def _check_normalized(normalization, epsilon) -> float:
  """Normalized attention's checked ε (after its `normalization`)."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  return checks.positive_float("epsilon", epsilon)


def _nonzero_std(var):
  """√var where var > 0, else 0 (sqrt has an infinite slope at 0: one unmasked key, or equal
  scores), with finite gradients."""
  positive = var > 0.0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def _from_moments(gain, shift, normalization, epsilon, sums, value):
  """Normalized attention from the "moments" sums `[b, t, n, 2·dv + 4]` (Σv, Σs'·v, n, Σs',
  Σs'² over the visible keys, s' = s − c, and c): out_i = g/(σ_i+ε)·Σ_j (s_ij − μ_i) v_j +
  β Σ v_j ("standardize"), g/√n_i·Σ s_ij v_j + β Σ v_j ("scale")."""
  dv = value.shape[-1]
  sum_v, sum_sv = sums[..., :dv], sums[..., dv:2 * dv]
  count, sum_s, sum_ss, center = (sums[..., 2 * dv + i, None] for i in range(4))
  count = jnp.maximum(count, 1.0)
  heads = lambda x: x if x.ndim == 0 else x.reshape(1, 1, -1, 1)
  gain, shift = heads(gain), heads(shift)
  if normalization == "scale":
    out = gain * (sum_sv + center * sum_v) * jax.lax.rsqrt(count) + shift * sum_v
  else:
    mean = sum_s / count
    std = _nonzero_std(jnp.maximum(sum_ss / count - mean * mean, 0.0))
    # Σ(s − μ)v, exactly 0 (and so its gradient) in a row of one key.
    centred = jnp.where(count > 1.0, sum_sv - mean * sum_v, 0.0)
    out = gain / (std + epsilon) * centred + shift * sum_v
  return out.astype(value.dtype)


def _normalized_block_form(query, key, scale, *, gain=1.0, shift=0.0,
                           normalization="standardize", epsilon=1e-3,
                           local_window_size=None) -> BlockForm:
  """Blocks of the sums Σv, Σs·v, n, Σs, Σs² about the row's mean ("moments"), which add
  over key blocks; the output map standardises with the row's μ and σ from them."""
  dims = common.check_qkv(query, key, key)
  epsilon = _check_normalized(normalization, epsilon)
  if local_window_size is not None:
    raise ValueError("the sequence-parallel form of normalized attention takes no "
                     f"local_window_size, got {local_window_size!r}")
  gain, shift = _per_head("gain", gain, dims), _per_head("shift", shift, dims)
  return BlockForm("moments", query, key, scale, output_map=functools.partial(
      _from_moments, gain, shift, normalization, epsilon))


@register("normalized", segment_ids=True, block_form=_normalized_block_form)
def normalized_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                         gain=1.0, shift=0.0, normalization="standardize", epsilon=1e-3,
                         segment_ids=None, local_window_size=None):
  """Normalized attention (Normalized Attention Without Probability Cage, Richter &
  Wattenhofer 2020).

  The softmax is replaced by a normalisation of the scores s = scale·QKᵀ over the keys:

    "standardize" (NAP, the paper's proposal):  w_ij = g·(s_ij - μ_i)/(σ_i + ε) + β
    "scale" (its un-normalised ablation):       w_ij = g·s_ij/√n_i + β

  with μ_i, σ_i the mean and (population) standard deviation of row i over its n_i unmasked
  keys, g = `gain` and β = `shift` (per head; learned in the paper, initialised to 1 and 0 by
  `NormalizedParams` below). Weights are not confined to the probability
  simplex; masked keys get weight 0 and are excluded from μ, σ and n.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids, local_window_size: as `dot_product_attention`.
    gain: scalar or `[num_heads]` gain g.
    shift: scalar or `[num_heads]` offset β.
    normalization: "standardize" or "scale".
    epsilon: ε added to σ ("standardize"); 1e-3 as in the authors' code.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  epsilon = _check_normalized(normalization, epsilon)
  dims, logits, gmask = common.scores(query, key, value, mask=mask, is_causal=is_causal,
                                      scale=scale, segment_ids=segment_ids,
                                      local_window_size=local_window_size)
  g = _per_head("gain", gain, dims)
  beta = _per_head("shift", shift, dims)
  if gmask is None:
    keep = jnp.ones((), jnp.float32)
    count = jnp.float32(dims.kv_len)
  else:
    keep = gmask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1.0)
  if normalization == "scale":
    normed = logits * jax.lax.rsqrt(count)
  else:
    mean = jnp.sum(logits * keep, axis=-1, keepdims=True) / count
    centered = (logits - mean) * keep
    var = jnp.sum(centered * centered, axis=-1, keepdims=True) / count
    std = _nonzero_std(var)
    normed = centered / (std + epsilon)
  weights = (g * normed + beta) * keep
  return common.weighted_values(weights, value, dims).astype(query.dtype)


@register_params("gated_attention")
class GatedAttentionParams(OpParams):
  """The gate G(x) of gated attention (Quantizable Transformers, Bondarenko et al. 2023).

  As in the paper, `inputs_q` is split into `num_heads` equal chunks along the features and
  head h's logit is a linear map (with bias) of chunk h: `G(x)_{t,h} = x_{t,h,:}·w_h + b_h`.
  The bias starts at logit(π_init) so every gate opens to `gate_init` (π_init = 0.25, the
  authors' setting); the kernel uses PyTorch's default `Linear` initialisation
  (U(±1/√fan_in)), as the authors' models did. Returns `{"gate_logits": [batch, q_len,
  num_heads]}`.
  """
  gate_init: float = 0.25

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f"gated_attention splits inputs_q into one chunk per head: features ({features}) "
          f"must be divisible by num_heads ({self.num_heads})")
    checks.unit_interval("gate_init", self.gate_init, include_one=False)
    chunk = features // self.num_heads
    kernel = self.param(
        "gate_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1,
                                             out_axis=(), batch_axis=0),
            ("heads", None)),
        (self.num_heads, chunk), self.param_dtype)
    bias = self.param(
        "gate_bias",
        nn.with_logical_partitioning(
            nn.initializers.constant(jnp.log(self.gate_init / (1.0 - self.gate_init))),
            ("heads",)),
        (self.num_heads,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs_q, kernel, bias, dtype=self.dtype)
    x = x.reshape(*x.shape[:-1], self.num_heads, chunk)
    return {"gate_logits": jnp.einsum("...hc,hc->...h", x, kernel) + bias}


@register_params("normalized")
class NormalizedParams(OpParams):
  """Per-head gain g (ones) and shift β (zeros) of normalized attention (Normalized Attention
  Without Probability Cage, Richter & Wattenhofer 2020). Returns `{"gain", "shift"}`, each
  `[num_heads]`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                           ("heads",)),
                      (self.num_heads,), self.param_dtype)
    shift = self.param("shift", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("heads",)),
                       (self.num_heads,), self.param_dtype)
    gain, shift = nn.dtypes.promote_dtype(gain, shift, dtype=self.dtype)
    return {"gain": gain, "shift": shift}
