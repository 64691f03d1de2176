"""Skim-Attention: attention computed from the tokens' 2-D layout positions only.

`skim_attention` takes the layout queries and keys as arguments; `SkimParams` derives them
from the tokens' positions (the image grid, or the 1-D index) for the `Attention` layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import HeadArg, OpParams, register, register_params

FORMS = ("mask", "skim")
# Keys each query keeps in the "mask" form where the arguments give no `top_k`.
DEFAULT_TOP_K = 8


@register("skim_attention", segment_ids=True, grid=True,
          head_args={"layout_query": HeadArg(per_token=True),
                     "layout_key": HeadArg(per_token=True, kv=True)},
          block_refusal=(
              "each query keeps the top_k keys of its layout attention over all its keys (form "
              "'mask'): a top-k over the whole row is a selection that key blocks cannot make "
              "alone"))
def skim_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                   layout_query=None, layout_key=None, layout_dim=None, form="mask", top_k=None,
                   grid=None, segment_ids=None):
  """Skim-Attention (Skim-Attention: Learning to Focus via Document Layout, Nguyen et al. 2021):
  attention weights from the layout (2-D position) embeddings of the tokens alone.

    A_l = softmax(L_q L_kᵀ / √d_l, masked),   L_q, L_k: layout queries and keys
    "skim":  out = A_l V   (Skimformer: layout weights applied to the text values)
    "mask":  out = softmax(s·QKᵀ, masked ∧ top-k_j(A_l)) V   (Skim-Attention as a mask of a
             text model: each query keeps the `top_k` keys of highest layout attention)

  The layout queries and keys are arguments (`SkimParams` derives them from the positions of
  the tokens); "skim" does not read `query` or `key`. The default is "mask", whose text
  attention trains the layer's query and key projections; the top-k choice passes no gradient
  to the layout. Causal: keys j > i are masked before either softmax and the top-k.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, scale, segment_ids: as `dot_product_attention` (`scale` is the text
      attention's).
    layout_query: `[batch, q_len, num_heads, layout_dim]`.
    layout_key: `[batch, kv_len, num_kv_heads, layout_dim]`.
    layout_dim: optional; checked against `layout_query.shape[-1]`.
    form: "mask" or "skim".
    top_k: keys kept per query ("mask"); `DEFAULT_TOP_K` when None.
    grid: `(h, w)` of the image tokens (h·w = q_len = kv_len), checked only; the positions are
      in the layout arguments.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims, logits, full_mask = common.scores(query, key, value, scale=scale, mask=mask,
                                          is_causal=is_causal, segment_ids=segment_ids)
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  top_k = checks.positive_int("top_k", DEFAULT_TOP_K if top_k is None else top_k)
  if grid is not None:
    windowed.check_grid(grid, dims.q_len)
    windowed.check_grid(grid, dims.kv_len)
  size = getattr(layout_query, "shape", (None,))[-1]
  if layout_dim is not None and layout_dim != size:
    raise ValueError(f"layout_dim ({layout_dim}) must equal layout_query.shape[-1] ({size})")
  common.check_weight("layout_query", layout_query,
                      (dims.batch, dims.q_len, dims.num_heads, size),
                      "[batch, q_len, num_heads, layout_dim]")
  common.check_weight("layout_key", layout_key,
                      (dims.batch, dims.kv_len, dims.num_kv_heads, size),
                      "[batch, kv_len, num_kv_heads, layout_dim]")
  layout_logits = common.attention_logits(layout_query, layout_key, dims,
                                          common.default_scale(size, None))
  if form == "skim":
    probs = common.masked_softmax(layout_logits, full_mask)
  else:
    ranked = jax.lax.stop_gradient(layout_logits if full_mask is None else jnp.where(
        full_mask, layout_logits, common.MASKED_LOGIT))
    kth = jax.lax.top_k(ranked, min(top_k, dims.kv_len))[0][..., -1:]
    # A NaN layout score is kept and replaces the text logit, so that it reaches the output.
    unknown = jnp.isnan(ranked)
    keep = (ranked >= kth) | unknown
    logits = jnp.where(unknown, ranked, logits)
    probs = common.masked_softmax(logits, keep if full_mask is None else keep & full_mask)
  return common.weighted_values(probs, value, dims).astype(query.dtype)


@register_params("skim_attention")
class SkimParams(OpParams):
  """Layout queries and keys from the tokens' positions, as LayoutLM's 2-D position embedding:
  token i at (row y_i, column x_i) of the `op_args["grid"]` image (without a grid: row 0,
  column i) is embedded as e_i = E_y[y_i] + E_x[x_i] (`layout_y [h, layout_dim]`, `layout_x
  [w, layout_dim]`, sized at initialisation, normal std 0.02), then projected per head,
  L_q = e W_q (`layout_wq [layout_dim, num_heads, layout_dim]`) and L_k = e W_k
  (`layout_wk [layout_dim, num_kv_heads, layout_dim]`), LeCun-normal. layout_dim =
  `op_args["layout_dim"]` (head_dim when absent). Self-attention: queries and keys are the
  same tokens. Returns `{"layout_query", "layout_key"}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, value
    op_args = self.op_args or {}
    length = query.shape[1]
    if key.shape[1] != length:
      raise ValueError(f"skim_attention embeds the positions of one sequence: q_len "
                       f"{length} must equal kv_len {key.shape[1]}")
    if op_args.get("grid") is None:
      h, w = 1, length
    else:
      h, w = windowed.patch_grid(op_args, length)
    dim = checks.positive_int("op_args['layout_dim']", op_args.get("layout_dim",
                                                                  self.head_dim))
    table = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None))
    rows = self.param("layout_y", table, (h, dim), self.param_dtype)
    cols = self.param("layout_x", table, (w, dim), self.param_dtype)
    proj = lambda name, heads, axis: self.param(  # pylint: disable=g-long-lambda
        name, nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=0,
                                                                       out_axis=(1, 2)),
                                           (None, axis, None)), (dim, heads, dim),
        self.param_dtype)
    wq = proj("layout_wq", self.num_heads, "heads")
    wk = proj("layout_wk", self.num_kv_heads, "kv_heads")
    rows, cols, wq, wk = nn.dtypes.promote_dtype(rows, cols, wq, wk, dtype=self.dtype)
    y, x = jnp.divmod(jnp.arange(h * w), w)
    embedded = jnp.broadcast_to((rows[y] + cols[x])[None], (query.shape[0], h * w, dim))
    return {"layout_query": jnp.einsum("bte,enl->btnl", embedded, wq),
            "layout_key": jnp.einsum("bte,ekl->btkl", embedded, wk)}
