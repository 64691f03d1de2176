"""Routed attention: tokens pick the regions (BiFormer) or the heads (MoH) they use.

- `bilevel_routing`: BiFormer's bi-level routing attention (region routing, then token
  attention over the gathered regions).
- `mixture_of_heads`: MoH, a per-token router weighting shared and top-k routed heads.

The top-k choices are discrete: gradients flow through the routed values and weights, not
through the selection.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import BlockForm, OpParams, register, register_params
from big_attn.ops.softmax import dot_product_attention

GATE_SCALINGS = ("paper", "official")


# BiFormer's defaults: an S x S = 7 x 7 grid of regions, k = 4 routed regions (its second
# stage; the stages use 1, 4, 16 and all regions).
BIFORMER_REGIONS = 7
BIFORMER_TOPK = 4
# MoH's default: 75% of the routed heads active per token (MoH-ViT-B, MoH-LLaMA3).
MOH_ACTIVE_FRACTION = 0.75


def _routed_mask(full, tokens, gathered, dims):
  """The mask read at (query token, gathered key token), in the grouped logits layout.

  full `[b|1, n|1, t|1, s]`; tokens `[S, R]` query tokens per region; gathered `[b, S, M]` key
  tokens per query region. Returns `[b, S, k|1, g|1, R|1, M]`.
  """
  per_query = full[:, :, None] if full.shape[2] == 1 else full[:, :, tokens]
  heads, rows = per_query.shape[1], per_query.shape[3]
  per_query = jnp.broadcast_to(
      per_query, (dims.batch, heads, tokens.shape[0], rows, dims.kv_len))
  index = jnp.broadcast_to(gathered[:, None, :, None, :],
                           (dims.batch, heads, tokens.shape[0], rows, gathered.shape[-1]))
  picked = jnp.take_along_axis(per_query, index, axis=-1)  # [b, n|1, S, R|1, M]
  return windowed.grouped_group_mask(picked, dims)


@register("bilevel_routing", causal=False, grid=True)
def bilevel_routing_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                              grid=None, num_regions=None, topk=None):
  """Bi-level routing attention: BiFormer, Vision Transformer with Bi-Level Routing Attention
  (Zhu et al., 2023).

  The `grid=(h, w)` image is split into a `num_regions=(S_h, S_w)` grid of regions r. Region
  level: Q^r, K^r are the means of the region's queries and keys, the affinity is
  A^r = Q^r (K^r)ᵀ (all heads' channels, as BiFormer routes once for all heads) and each query
  region keeps the indices I_r = topk(A^r_r) of its `topk` most related regions. Token level:
  the keys and values of those regions are gathered, K^g = gather(K, I_r), V^g = gather(V, I_r),
  and each query of region r attends to them:

      out_i = softmax(s·q_i K^gᵀ) V^g,   i ∈ r

  Cost O(seq·topk·h·w/(S_h·S_w)). The selection is discrete (no gradient); gradients flow
  through the gathered tokens. BiFormer's local context enhancement (a depthwise convolution
  of V added to the output) is a separate layer term, not part of the op. No causal form.

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, row-major image tokens.
    key, value: `[batch, h·w, num_kv_heads, head_dim | value_dim]`.
    mask: optional boolean mask broadcastable to `[batch, num_heads, seq, seq]` (e.g. key
      padding), read at the gathered keys; routing uses every token of a region.
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    grid: required `(h, w)`, `h·w == seq`.
    num_regions: `(S_h, S_w)` (or an int) dividing `(h, w)`; default BiFormer's S = 7, per side
      the largest divisor of the grid's side up to 7.
    topk: number of routed regions per query region, in `[1, S_h·S_w]`; default BiFormer's
      k = 4 (its second stage), at most S_h·S_w.

  Returns:
    `[batch, seq, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("bilevel_routing", is_causal)
  dims = common.check_qkv(query, key, value)
  if dims.q_len != dims.kv_len:
    raise ValueError("bilevel_routing is self-attention over one image: q_len must equal "
                     f"kv_len, got {dims.q_len} and {dims.kv_len}")
  grid = windowed.check_grid(grid, dims.q_len)
  regions = windowed.check_partition("num_regions", num_regions, grid, BIFORMER_REGIONS)
  num_regions_total = regions[0] * regions[1]
  topk = checks.int_in_range("topk", min(BIFORMER_TOPK, num_regions_total) if topk is None
                             else topk, 1, num_regions_total)
  scale = common.default_scale(dims.head_dim, scale)
  full = common.make_mask(dims, mask=mask)
  size = (grid[0] // regions[0], grid[1] // regions[1])  # tokens per region, per axis

  def regioned(x):  # [b, t, ...] -> [b, S, R, ...]
    return windowed.to_groups(x, grid, size, dilated=False)

  q_reg, k_reg, v_reg = regioned(query), regioned(key), regioned(value)
  q_mean = jnp.mean(q_reg.astype(jnp.float32), axis=2)  # [b, S, n, d]
  k_mean = jnp.mean(k_reg.astype(jnp.float32), axis=2)  # [b, S, k, d]
  q_mean = q_mean.reshape(*q_mean.shape[:2], dims.num_kv_heads, dims.groups, dims.head_dim)
  affinity = jnp.einsum("bikgd,bjkd->bij", q_mean, k_mean)
  _, routes = jax.lax.top_k(jax.lax.stop_gradient(affinity), topk)  # [b, S, topk]
  # A NaN affinity leaves the routing undefined: that query region's rows give NaN.
  undefined = jnp.where(jnp.isnan(affinity).any(-1), jnp.nan, 0.0)  # [b, S]
  q_reg = q_reg + undefined[:, :, None, None, None].astype(q_reg.dtype)

  batch_index = jnp.arange(dims.batch)[:, None, None]
  members = size[0] * size[1]

  def gathered(x):  # [b, S, R, k, c] -> [b, S, topk·R, k, c]
    picked = x[batch_index, routes]  # [b, S, topk, R, k, c]
    return picked.reshape(dims.batch, num_regions_total, topk * members, *x.shape[3:])

  region_mask = None
  if full is not None:
    tokens = regioned(np.arange(dims.q_len)[None])[0]  # [S, R]
    key_tokens = jnp.asarray(tokens)[routes].reshape(dims.batch, num_regions_total, -1)
    region_mask = _routed_mask(full, tokens, key_tokens, dims)
  out = windowed.group_attention(q_reg, gathered(k_reg), gathered(v_reg), dims, scale, None,
                                 region_mask)
  return windowed.from_groups(out, grid, size, dilated=False).astype(query.dtype)


def head_weights(router_logits, head_mix_logits, shared_heads: int, topk: int,
                 gate_scaling: str):
  """MoH's two-stage head weights g `[batch, q_len, num_heads]` in float32 (see the op)."""
  logits = router_logits.astype(jnp.float32)
  num_routed = logits.shape[-1] - shared_heads
  parts = []
  if shared_heads:
    shared = jax.nn.softmax(logits[..., :shared_heads], axis=-1)
    parts.append(shared * shared_heads if gate_scaling == "official" else shared)
  if num_routed:
    routed_logits = logits[..., shared_heads:]
    probs = jax.nn.softmax(routed_logits, axis=-1)
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(routed_logits), topk)
    selected = jnp.sum(jax.nn.one_hot(chosen, num_routed, dtype=jnp.float32), axis=-2)
    routed = probs * selected
    if gate_scaling == "official":
      routed = routed / jnp.sum(routed, axis=-1, keepdims=True) * topk
    parts.append(routed)
  if shared_heads and num_routed:
    alpha = jax.nn.softmax(head_mix_logits.astype(jnp.float32), axis=-1)
    if gate_scaling == "official":
      alpha = alpha * 2.0
    parts = [parts[0] * alpha[..., :1], parts[1] * alpha[..., 1:]]
  return jnp.concatenate(parts, axis=-1)


def _checked_head_weights(query, router_logits, shared_heads, topk, head_mix_logits,
                          gate_scaling):
  """MoH's head weights g `[batch, q_len, num_heads]` (float32) after the argument checks of
  `mixture_of_heads_attention` against `query` `[batch, q_len, num_heads, head_dim]`."""
  b, t, n = query.shape[:3]
  shared_heads = checks.int_in_range("shared_heads", shared_heads, 0, n)
  num_routed = n - shared_heads
  if num_routed:
    if topk is None:
      topk = max(1, round(MOH_ACTIVE_FRACTION * num_routed))
    topk = checks.int_in_range("topk", topk, 1, num_routed)
  elif topk not in (None, 0):
    raise ValueError(f"topk must be None or 0 when every head is shared, got {topk!r}")
  if gate_scaling not in GATE_SCALINGS:
    raise ValueError(f"gate_scaling must be one of {GATE_SCALINGS}, got {gate_scaling!r}")
  common.check_weight("router_logits", router_logits, (b, t, n), "[batch, q_len, num_heads]")
  if shared_heads and num_routed:
    common.check_weight("head_mix_logits", head_mix_logits, (b, t, 2), "[batch, q_len, 2]")
  elif head_mix_logits is not None:
    raise ValueError("head_mix_logits weighs shared against routed heads: it needs both, got "
                     f"shared_heads={shared_heads} of num_heads={n}")
  return head_weights(router_logits, head_mix_logits, shared_heads, topk, gate_scaling)


def _weighted_heads(weights, out, dtype):
  """g_h · out_h in float32, returned in `dtype`."""
  return (weights[..., None] * out.astype(jnp.float32)).astype(dtype)


def _moh_block_form(query, key, scale, *, router_logits=None, shared_heads=0, topk=None,
                    head_mix_logits=None, gate_scaling="paper") -> BlockForm:
  """Softmax blocks of every head merged through the log-sum-exp, then each head's merged
  output weighted by its g_h (a per-token map)."""
  weights = _checked_head_weights(query, router_logits, shared_heads, topk, head_mix_logits,
                                  gate_scaling)
  return BlockForm("softmax", query, key, scale,
                   output_map=lambda out, _: _weighted_heads(weights, out, out.dtype))


@register("mixture_of_heads", segment_ids=True, implementation=True, bias=True,
          block_form=_moh_block_form)
def mixture_of_heads_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                               router_logits=None, shared_heads=0, topk=None,
                               head_mix_logits=None, gate_scaling="paper", bias=None,
                               segment_ids=None, local_window_size=None, implementation=None):
  """Mixture-of-Head attention: MoH, Multi-Head Attention as Mixture-of-Head Attention
  (Jin et al., 2024).

  Heads are experts: a per-token router weights each head's output (the output projection
  then sums the weighted heads, Σ_h g_h·H^h W_O^h). The first `shared_heads` heads are always
  on; among the other heads each token keeps the `topk` with the largest router logits. The
  two-stage weights of the paper (Eqs. 5-6), with W_s x and W_r x the shared and routed parts
  of `router_logits` and W_h x = `head_mix_logits`:

      g_h = α₁ · softmax(W_s x)_h                  for a shared head h
      g_h = α₂ · softmax(W_r x)_h   if h ∈ topk    for a routed head h (0 otherwise)
      [α₁, α₂] = softmax(W_h x)
      out_h = g_h · softmax(s·Q_h K_hᵀ + B) V_h

  `gate_scaling="official"` uses the authors' code instead: the routed weights renormalised
  over the top-k and multiplied by `topk`, the shared ones multiplied by `shared_heads` and
  α multiplied by 2 (so the weights average about 1, like plain multi-head attention). All
  heads are computed here and the unselected ones weighted 0. Causal and all masks as
  `dot_product_attention`.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, bias, segment_ids, local_window_size, implementation: as
      `dot_product_attention`.
    router_logits: required `[batch, q_len, num_heads]`: shared heads' logits, then routed.
    shared_heads: number h_s of always-on heads (the first ones), in `[0, num_heads]`.
    topk: routed heads kept per token, in `[1, num_heads − h_s]` (unused when h_s = num_heads);
      default 75% of them (rounded, at least 1), MoH's setting for MoH-ViT-B and MoH-LLaMA3.
    head_mix_logits: `[batch, q_len, 2]` logits of α, required when there are both shared and
      routed heads.
    gate_scaling: "paper" or "official".

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_qkv(query, key, value)
  weights = _checked_head_weights(query, router_logits, shared_heads, topk, head_mix_logits,
                                  gate_scaling)
  out = dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal, segment_ids=segment_ids,
      local_window_size=local_window_size, implementation=implementation)
  return _weighted_heads(weights, out, query.dtype)


@register_params("mixture_of_heads")
class MixtureOfHeadsParams(OpParams):
  """The routers of MoH (Multi-Head Attention as Mixture-of-Head Attention, Jin et al. 2024):
  `router [features, num_heads]` (W_s for the `op_args["shared_heads"]` first heads, then W_r)
  and, when there are both shared and routed heads, `head_mix [features, 2]` (W_h). Linear maps
  of `inputs_q` without bias, PyTorch's default `Linear` initialisation (U(±1/√fan_in)) as the
  authors' code. Returns `{"router_logits": [batch, q_len, num_heads]}` and, with both kinds of
  heads, `"head_mix_logits": [batch, q_len, 2]`.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    shared = checks.int_in_range("op_args['shared_heads']",
                                 (self.op_args or {}).get("shared_heads", 0), 0, self.num_heads)
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    features = inputs_q.shape[-1]
    router = self.param("router", nn.with_logical_partitioning(init, ("embed", "heads")),
                        (features, self.num_heads), self.param_dtype)
    x, router = nn.dtypes.promote_dtype(inputs_q, router, dtype=self.dtype)
    out = {"router_logits": x @ router}
    if 0 < shared < self.num_heads:
      head_mix = self.param("head_mix", nn.with_logical_partitioning(init, ("embed", None)),
                            (features, 2), self.param_dtype)
      (head_mix,) = nn.dtypes.promote_dtype(head_mix, dtype=self.dtype)
      out["head_mix_logits"] = x @ head_mix
    return out
