"""Softmax attention whose map is multiplied, after the softmax, by a learned matrix.

    out = (softmax(s·QKᵀ + B, masked) ⊙ M) V

`urpe` takes M Toeplitz in the relative position (URPE), `mask_reweighted` a Gaussian mixture
of the tokens' distance or a free element-wise mask (RetNet viewed through convolution). M
multiplies the normalised weights, so rows no longer sum to one (that is the point of both
papers). Masked keys get weight 0 and a fully masked row returns zeros. The weights are
arguments; `URPEParams` and `MaskReweightedParams` own them for the `Attention` layer.

Both run sequence-parallel as softmax blocks whose bias and multiplier are read at the blocks'
global positions (`PairTerms`): M multiplies each block's numerator, the log-sum-exp merge
normalises.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import BlockForm, OpParams, PairTerms, register, register_params

FORMS = ("gmm", "elm")
# Gaussian components of the GMM mask where `op_args` give no `num_components`.
DEFAULT_COMPONENTS = 3


def _toeplitz(table, q_pos, k_pos, kv_len: int):
  """`[n, t + s − 1]` table -> `[n, len(q_pos), len(k_pos)]`, entry (i, j) =
  `table[:, q_pos[i] − k_pos[j] + kv_len − 1]`."""
  return table[:, q_pos[:, None] - k_pos[None, :] + kv_len - 1]


def _positions(length: int):
  return jnp.arange(length, dtype=jnp.int32)


def _urpe_terms(arrays, q_pos, k_pos, *, is_causal, kv_len):
  """URPE's `PairTerms`: the bias b_{i−j} (if given) and the multiplier c_{i−j}."""
  del is_causal  # the schedule masks the future keys
  bias = arrays.get("rpe_bias")
  return (None if bias is None else _toeplitz(bias, q_pos, k_pos, kv_len),
          _toeplitz(arrays["rpe_multiplier"], q_pos, k_pos, kv_len), None)


def _check_urpe(num_heads: int, q_len: int, kv_len: int, rpe_multiplier, rpe_bias) -> dict:
  """URPE's tables after their checks, as a dict (without a missing `rpe_bias`)."""
  size, layout = (num_heads, q_len + kv_len - 1), "[num_heads, q_len + kv_len − 1]"
  common.check_weight("rpe_multiplier", rpe_multiplier, size, layout)
  if rpe_bias is not None:
    common.check_weight("rpe_bias", rpe_bias, size, layout)
  tables = {"rpe_multiplier": rpe_multiplier, "rpe_bias": rpe_bias}
  return {k: v for k, v in tables.items() if v is not None}


def _urpe_block_form(query, key, scale, *, rpe_multiplier=None, rpe_bias=None) -> BlockForm:
  """Softmax blocks with URPE's Toeplitz bias and multiplier at global offsets."""
  tables = _check_urpe(query.shape[2], query.shape[1], key.shape[1], rpe_multiplier, rpe_bias)
  return BlockForm("softmax", query, key, scale,
                   pair_terms=PairTerms(_urpe_terms, (("kv_len", key.shape[1]),)),
                   pair_arrays=tables)


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


@register("urpe", segment_ids=True, block_form=_urpe_block_form)
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
  tables = _check_urpe(dims.num_heads, dims.q_len, dims.kv_len, rpe_multiplier, rpe_bias)
  bias, multiplier, _ = _urpe_terms(tables, _positions(dims.q_len), _positions(dims.kv_len),
                                    is_causal=is_causal, kv_len=dims.kv_len)
  return _reweighted(query, key, value, multiplier, mask=mask, is_causal=is_causal, scale=scale,
                     segment_ids=segment_ids, bias=bias)


def _squared_distances(grid, q_pos, k_pos):
  """`[len(q_pos), len(k_pos)]` squared distances of the tokens at these positions: on the
  row-major `grid` `(h, w)`, or of the 1-D positions when `grid` is None."""
  if grid is None:
    return (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32) ** 2
  (yq, xq), (yk, xk) = jnp.divmod(q_pos, grid[1]), jnp.divmod(k_pos, grid[1])
  return ((yq[:, None] - yk[None, :]) ** 2 + (xq[:, None] - xk[None, :]) ** 2).astype(
      jnp.float32)


def _mask_terms(arrays, q_pos, k_pos, *, is_causal, form, grid):
  """`mask_reweighted`'s `PairTerms`: the multiplier M at these positions."""
  del is_causal  # the schedule masks the future keys
  if form == "elm":
    return None, arrays["elm_mask"][:, q_pos[:, None], k_pos[None, :]], None
  dist2 = _squared_distances(grid, q_pos, k_pos)
  sigma2 = arrays["gmm_sigma"].astype(jnp.float32)[:, :, None, None] ** 2
  return None, jnp.sum(arrays["gmm_amplitude"].astype(jnp.float32)[:, :, None, None]
                       * jnp.exp(-dist2 / (2.0 * sigma2)), axis=1), None


def _check_mask_args(num_heads, t, s, form, gmm_amplitude, gmm_sigma, elm_mask, num_components,
                     grid) -> tuple[dict, tuple[int, int] | None]:
  """`(weights, grid)`: `mask_reweighted`'s weights of `form` as a dict and the `(h, w)` grid
  (or None), after their checks."""
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  grid = None if grid is None else windowed.check_grid(grid, t)
  if form == "elm":
    common.check_weight("elm_mask", elm_mask, (num_heads, t, s), "[num_heads, q_len, kv_len]")
    return {"elm_mask": elm_mask}, grid
  components = getattr(gmm_amplitude, "shape", (None, None))[-1]
  if num_components is not None and num_components != components:
    raise ValueError(f"num_components ({num_components}) must equal "
                     f"gmm_amplitude.shape[-1] ({components})")
  for name, x in (("gmm_amplitude", gmm_amplitude), ("gmm_sigma", gmm_sigma)):
    common.check_weight(name, x, (num_heads, components), "[num_heads, num_components]")
  if grid is not None and s != t:
    raise ValueError(f"mask_reweighted with a grid needs keys on the queries' grid: kv_len "
                     f"must be {t}, got {s}")
  return {"gmm_amplitude": gmm_amplitude, "gmm_sigma": gmm_sigma}, grid


def _mask_block_form(query, key, scale, *, form="gmm", gmm_amplitude=None, gmm_sigma=None,
                     elm_mask=None, num_components=None, grid=None) -> BlockForm:
  """Softmax blocks whose normalised weights are multiplied by M at global positions."""
  arrays, grid = _check_mask_args(query.shape[2], query.shape[1], key.shape[1], form,
                                  gmm_amplitude, gmm_sigma, elm_mask, num_components, grid)
  return BlockForm("softmax", query, key, scale, pair_arrays=arrays,
                   pair_terms=PairTerms(_mask_terms, (("form", form), ("grid", grid))))


@register("mask_reweighted", segment_ids=True, grid=True, block_form=_mask_block_form)
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
  arrays, grid = _check_mask_args(dims.num_heads, dims.q_len, dims.kv_len, form, gmm_amplitude,
                                  gmm_sigma, elm_mask, num_components, grid)
  _, multiplier, _ = _mask_terms(arrays, _positions(dims.q_len), _positions(dims.kv_len),
                                 is_causal=is_causal, form=form, grid=grid)
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
