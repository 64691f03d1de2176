"""Softmax attention whose map is multiplied, after the softmax, by a learned matrix.

    out = (softmax(s·QKᵀ + B, masked) ⊙ M) V

`urpe` takes M Toeplitz in the relative position (URPE), `mask_reweighted` a Gaussian mixture
of the tokens' distance or a free element-wise mask (RetNet viewed through convolution). M
multiplies the normalised weights, so rows no longer sum to one (that is the point of both
papers). Masked keys get weight 0 and a fully masked row returns zeros. The weights are
arguments; `URPEParams` and `MaskReweightedParams` own them for the `Attention` layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import OpParams, register, register_params

FORMS = ("gmm", "elm")
# Gaussian components of the GMM mask where `op_args` give no `num_components`.
DEFAULT_COMPONENTS = 3


def _toeplitz(table, t: int, s: int):
  """`[n, t + s − 1]` table -> `[n, t, s]`, entry (i, j) = `table[:, i − j + s − 1]`."""
  offsets = jnp.arange(t)[:, None] - jnp.arange(s)[None, :] + s - 1
  return table[:, offsets]


def _reweighted(query, key, value, multiplier, *, mask, is_causal, scale, segment_ids,
                bias=None):
  """(softmax(s·QKᵀ + bias, masked) ⊙ multiplier) V; `multiplier` and `bias` `[n, t, s]`."""
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  shape = (dims.num_kv_heads, dims.groups, dims.q_len, dims.kv_len)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape(shape)
  probs = common.masked_softmax(logits, full_mask) * multiplier.astype(jnp.float32).reshape(shape)
  return common.weighted_values(probs, value, dims).astype(query.dtype)


@register("urpe", segment_ids=True,
          block_refusal=(
              "its post-softmax multiplier C_ij = c_{i−j} (and the logit bias b_{i−j}) depends on"
              " the global offset i − j, which the ring's key blocks (scores, segment ids and a "
              "causal offset) do not see"))
def urpe_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                   rpe_multiplier=None, rpe_bias=None, segment_ids=None):
  """Universal RPE-based attention (Your Transformer May Not be as Powerful as You Expect,
  Luo et al. 2022): the softmax of an RPE model times a learned Toeplitz matrix C.

    out = (softmax(s·QKᵀ + B, masked) ⊙ C) V,   B_ij = b_{i−j},   C_ij = c_{i−j}  per head

  A softmax map is right-stochastic, which the paper shows limits RPE Transformers; the
  post-softmax C lifts that limit. B is the RPE inside the softmax (zeros when None). Causal:
  keys j > i are masked before the softmax.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    rpe_multiplier: c `[num_heads, q_len + kv_len − 1]`, entry `kv_len − 1 + r` = c_r for the
      offset r = i − j.
    rpe_bias: b, optional, laid out as `rpe_multiplier`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  size, layout = (dims.num_heads, dims.q_len + dims.kv_len - 1), "[num_heads, q_len + kv_len − 1]"
  common.check_weight("rpe_multiplier", rpe_multiplier, size, layout)
  if rpe_bias is not None:
    common.check_weight("rpe_bias", rpe_bias, size, layout)
    rpe_bias = _toeplitz(rpe_bias, dims.q_len, dims.kv_len)
  return _reweighted(query, key, value, _toeplitz(rpe_multiplier, dims.q_len, dims.kv_len),
                     mask=mask, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                     bias=rpe_bias)


def _squared_distances(grid, t: int, s: int):
  """`[t, s]` squared distances of the tokens: on the row-major `grid` (t = s = h·w), or of the
  1-D positions 0..t−1 and 0..s−1 when `grid` is None."""
  if grid is None:
    return (jnp.arange(t)[:, None] - jnp.arange(s)[None, :]).astype(jnp.float32) ** 2
  h, w = windowed.check_grid(grid, t)
  if s != t:
    raise ValueError(f"mask_reweighted with a grid needs keys on the queries' grid: kv_len "
                     f"must be {t}, got {s}")
  y, x = jnp.divmod(jnp.arange(h * w), w)
  return ((y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2).astype(jnp.float32)


@register("mask_reweighted", segment_ids=True, grid=True,
          block_refusal=(
              "its multiplier M_ij of the normalised weights depends on the global positions i "
              "and j (a Gaussian mixture of their distance, or a free table sized by the whole "
              "sequence), which the ring's key blocks do not see"))
def mask_reweighted_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                              form="gmm", gmm_amplitude=None, gmm_sigma=None, elm_mask=None,
                              num_components=None, grid=None, segment_ids=None):
  """Attention map times a learned spatial mask (Toward a Deeper Understanding: RetNet Viewed
  through Convolution, Li et al. 2023), as RetNet's decay mask on the attention matrix.

    out = (softmax(s·QKᵀ, masked) ⊙ M) V  per head, with
    "gmm" (Gaussian mixture mask):  M_ij = Σ_c a_c exp(−‖p_i − p_j‖² / (2σ_c²))
    "elm" (element-wise learnable mask):  M_ij a free weight per head and pair.

  p are the tokens' (row, column) on the `grid` image, or their 1-D positions without a grid.
  Each GMM component has the paper's two parameters (a_c, σ_c); σ_c must be nonzero. The map
  is not renormalised after the product. Causal: keys j > i are masked before the softmax.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention`.
    form: "gmm" or "elm".
    gmm_amplitude, gmm_sigma: a and σ, `[num_heads, num_components]` ("gmm").
    elm_mask: `[num_heads, q_len, kv_len]` ("elm").
    num_components: optional; checked against `gmm_amplitude.shape[-1]`.
    grid: `(h, w)` with h·w = q_len = kv_len, or None (1-D positions).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  if form == "elm":
    if grid is not None:
      windowed.check_grid(grid, dims.q_len)
    common.check_weight("elm_mask", elm_mask, (dims.num_heads, dims.q_len, dims.kv_len),
                        "[num_heads, q_len, kv_len]")
    multiplier = elm_mask
  else:
    components = getattr(gmm_amplitude, "shape", (None, None))[-1]
    if num_components is not None and num_components != components:
      raise ValueError(f"num_components ({num_components}) must equal "
                       f"gmm_amplitude.shape[-1] ({components})")
    for name, x in (("gmm_amplitude", gmm_amplitude), ("gmm_sigma", gmm_sigma)):
      common.check_weight(name, x, (dims.num_heads, components),
                          "[num_heads, num_components]")
    dist2 = _squared_distances(grid, dims.q_len, dims.kv_len)
    sigma2 = gmm_sigma.astype(jnp.float32)[:, :, None, None] ** 2
    multiplier = jnp.sum(gmm_amplitude.astype(jnp.float32)[:, :, None, None]
                         * jnp.exp(-dist2 / (2.0 * sigma2)), axis=1)
  return _reweighted(query, key, value, multiplier, mask=mask, is_causal=is_causal,
                     scale=scale, segment_ids=segment_ids)


@register_params("urpe")
class URPEParams(OpParams):
  """URPE's Toeplitz tables, sized by the query and key lengths at initialisation (a fixed-
  length model): `rpe_multiplier [num_heads, q_len + kv_len − 1]` = 1 (C starts as the all-ones
  matrix: plain RPE attention) and `rpe_bias` = 0. Returns both."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, value
    shape = (self.num_heads, query.shape[1] + key.shape[1] - 1)
    table = lambda name, init: self.param(  # pylint: disable=g-long-lambda
        name, nn.with_logical_partitioning(init, ("heads", None)), shape, self.param_dtype)
    multiplier = table("rpe_multiplier", nn.initializers.ones_init())
    bias = table("rpe_bias", nn.initializers.zeros_init())
    multiplier, bias = nn.dtypes.promote_dtype(multiplier, bias, dtype=self.dtype)
    return {"rpe_multiplier": multiplier, "rpe_bias": bias}


@register_params("mask_reweighted")
class MaskReweightedParams(OpParams):
  """The mask of `mask_reweighted`, `op_args["form"]` ("gmm" when absent).

  "gmm": `gmm_amplitude` and `gmm_sigma`, `[num_heads, K]` with K = `op_args["num_components"]`
  (`DEFAULT_COMPONENTS` when absent); component c starts at a_c = 1/K and σ_c = c + 1 (tokens),
  a local map at several scales. "elm": `elm_mask [num_heads, q_len, kv_len]` = 1 (plain
  attention at the start), sized at initialisation (with `op_args["grid"]`: the h·w patch
  tokens the op sees, without the extra tokens).
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, value
    op_args = self.op_args or {}
    form = op_args.get("form", "gmm")
    if form not in FORMS:
      raise ValueError(f"op_args['form'] must be one of {FORMS}, got {form!r}")
    if form == "elm":
      shape = (query.shape[1], key.shape[1])
      if op_args.get("grid") is not None:  # the patch tokens, without the extra tokens
        h, w = windowed.patch_grid(op_args, query.shape[1])
        shape = (h * w, h * w)
      elm = self.param("elm_mask", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("heads", None, None)),
                       (self.num_heads,) + shape, self.param_dtype)
      (elm,) = nn.dtypes.promote_dtype(elm, dtype=self.dtype)
      return {"elm_mask": elm}
    k = checks.positive_int("op_args['num_components']",
                            op_args.get("num_components", DEFAULT_COMPONENTS))
    init_amplitude = lambda rng, shape, dtype: jnp.full(shape, 1.0 / k, dtype)
    init_sigma = lambda rng, shape, dtype: jnp.broadcast_to(jnp.arange(1, k + 1, dtype=dtype),
                                                            shape)
    amplitude = self.param("gmm_amplitude", nn.with_logical_partitioning(
        init_amplitude, ("heads", None)), (self.num_heads, k), self.param_dtype)
    sigma = self.param("gmm_sigma", nn.with_logical_partitioning(init_sigma, ("heads", None)),
                       (self.num_heads, k), self.param_dtype)
    amplitude, sigma = nn.dtypes.promote_dtype(amplitude, sigma, dtype=self.dtype)
    return {"gmm_amplitude": amplitude, "gmm_sigma": sigma}
