"""Hierarchical local-global vision transformers: DaViT, Twins-SVT, DiNAT, BiFormer, RMT.

    model = Model(num_classes=1000, variant="davit_t")       # or family="twins_svt", sizes...
    params = model.init(jax.random.key(0), images)["params"]  # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

Four stages of pre-norm blocks on `[batch, h, w, c]` maps: a stem (stride `patch_size`, 4 in
the papers) and three 2x downsamplings, so the total stride is 8·patch_size and any multiple of
it is a valid input side. Block `j` of a stage attends with op `ops[j % 2]` (local, global):

| family      | paper                                      | ops (local, global)                  |
|-------------|--------------------------------------------|--------------------------------------|
| `davit`     | DaViT: Dual Attention Vision Transformers  | window, channel_attention            |
| `twins_svt` | Twins: Revisiting the Design of Spatial    | window (LSA), softmax on sub-sampled |
|             | Attention in Vision Transformers           | keys/values (GSA)                    |
| `dinat`     | Dilated Neighborhood Attention Transformer | neighborhood, dilated neighborhood   |
| `biformer`  | BiFormer: Vision Transformer with Bi-Level | bilevel_routing (global softmax in   |
|             | Routing Attention                          | the last stage)                      |
| `rmt`       | RMT: Retentive Networks Meet Vision        | retention (Manhattan decay),         |
|             | Transformers                               | decomposed along H, W where marked   |

Every attention is `big_attn.layers.Attention(op=..., op_args=...)` with the stage's `grid`
filled in (for ops that take one), so a config can swap either op (`local_attention`,
`global_attention`, `local_attention_args`, `global_attention_args`). Per family, following the
authors' code:
- DaViT: conv position encoding (depthwise 3x3, residual) before the attention and before the
  MLP of every block; stem conv (2p−1)x(2p−1) stride p (7x7/4) + LN; downsampling LN + 2x2
  conv stride 2; windows of 7 without relative position bias; channel groups = heads.
- Twins-SVT: patch embedding conv p x p stride p + LN (2x2 later); LSA windows of 7 (no
  relative position bias); GSA sub-samples keys/values by a `sr x sr` stride-`sr`
  channel-mixing conv + LN before their projections (`sr_ratios` 8, 4, 2, 1), as PVT/Twins do.
  The `spatial_reduction` op reduces after the projections with depthwise weights (its
  docstring leaves the Twins conv to the layer); that conv holds 1.8M of SVT-S's 24M
  parameters, so Twins' global op is dense softmax on the conv-reduced tokens (a config may
  set `global_attention="spatial_reduction"` with `sr_ratios=1`). PEG (depthwise 3x3, residual)
  after the first block of every stage.
- DiNAT: two 3x3 stride-2 convs + LN; downsampling 3x3 stride-2 conv (no bias) + LN; kernel 7
  with a relative position bias per block (passed to the op); odd blocks dilated by
  `side // kernel` per axis (8, 4, 2, 1 at 224²); layer scale 1e-5 in S and B.
- BiFormer: conv stem (3x3/2, norm, GELU, 3x3/2, norm); downsampling 3x3/2 conv + norm;
  depthwise 3x3 position encoding before the attention; 7x7 regions per stage, top-k 1, 4,
  16; the last stage is global attention with 8 heads (the authors' `AttentionLePE`); the
  region-level logit scale is dim^−0.5 (the authors' `qk_dim ** -0.5`); local context
  enhancement (depthwise 5x5 conv of V added to the attention output, before the output
  projection); MLP ratio 3.
- RMT: stem of four 3x3 convs (strides 2, 1, 2, 1) with norms and GELUs; downsampling 3x3/2
  conv + norm; depthwise 3x3 position encoding before the attention; Manhattan self-attention
  softmax(QKᵀ/√d + log γ·(|Δx|+|Δy|))V with γ_h = 1 − 2^(−a − b·h/heads) per stage (RMT's
  `init_values`, `heads_ranges`); decomposed (a pass along W, then along H, with 1-D decays
  and the same queries and keys, as the authors' `VisionRetentionChunk`) in the stages marked
  `decomposed`; rotary embedding of the flattened positions with RMT's frequencies
  10000^(−i/(d/2−1)) (`Attention.rope_base` = 10000^(d/(d−2)) gives exactly those; the
  half-split channel pairing is a fixed permutation of RMT's interleaved one); LCE (depthwise
  5x5 of V); FFN with a residual depthwise 3x3 conv between its layers; layer scale 1e-6 in the
  last two stages of B and L; head: Dense(1024) + norm + swish per token before pooling.

BiFormer's and RMT's stems, downsamplings and final norms are BatchNorm as in their code
(`conv_norm="batch"`, PyTorch's eps 1e-5 and momentum 0.1; statistics in `batch_stats`, which
the train step carries; BiFormer normalises the last map before pooling), or LayerNorm over
channels (`conv_norm="layer"`: stateless, same parameters). The head is global average
pooling, LayerNorm and the classifier (RMT: the projection, norm and swish first).
Stochastic depth (`drop_path`) rises linearly over the blocks, as in all five papers.

Parameter counts (224x224x3 input, 1000 classes; `jax.eval_shape`, nothing allocated), next to
the papers' ImageNet-1K comparison tables (DiNAT's Table 1 repeats NAT's counts). RMT-T is
2.4% above the paper's rounded "14M"; the authors' RMT_T3 code builds the same 14.33M.

| variant     | embed dims          | depths (blocks) | parameters | paper  |
|-------------|---------------------|-----------------|------------|--------|
| davit_t     | 96, 192, 384, 768   | 2, 2, 6, 2      | 28,360,168 | 28.3M  |
| davit_s     | 96, 192, 384, 768   | 2, 2, 18, 2     | 49,745,896 | 49.7M  |
| davit_b     | 128, 256, 512, 1024 | 2, 2, 18, 2     | 87,954,408 | 87.9M  |
| twins_svt_s | 64, 128, 256, 512   | 2, 2, 10, 4     | 24,060,776 | 24.0M  |
| twins_svt_b | 96, 192, 384, 768   | 2, 2, 18, 2     | 56,070,952 | 56.0M  |
| twins_svt_l | 128, 256, 512, 1024 | 2, 2, 18, 2     | 99,271,400 | 99.2M  |
| dinat_m     | 64, 128, 256, 512   | 3, 4, 6, 5      | 19,984,174 | 20M    |
| dinat_t     | 64, 128, 256, 512   | 3, 4, 18, 5     | 27,901,582 | 28M    |
| dinat_s     | 96, 192, 384, 768   | 3, 4, 18, 5     | 50,743,297 | 51M    |
| dinat_b     | 128, 256, 512, 1024 | 3, 4, 18, 5     | 89,769,652 | 90M    |
| biformer_t  | 64, 128, 256, 512   | 2, 2, 8, 2      | 13,145,832 | 13.1M  |
| biformer_s  | 64, 128, 256, 512   | 4, 4, 18, 4     | 25,542,376 | 25.5M  |
| biformer_b  | 96, 192, 384, 768   | 4, 4, 18, 4     | 56,814,184 | 57M    |
| rmt_t       | 64, 128, 256, 512   | 2, 2, 8, 2      | 14,334,216 | 14M    |
| rmt_s       | 64, 128, 256, 512   | 3, 4, 18, 4     | 26,967,240 | 27M    |
| rmt_b       | 80, 160, 320, 512   | 4, 8, 25, 8     | 54,154,896 | 54M    |
| rmt_l       | 112, 224, 448, 640  | 4, 8, 25, 8     | 95,464,864 | 95M    |

Variant names (`decode_variant`): davit_t, davit_s, davit_b; twins_svt_s, twins_svt_b,
twins_svt_l; dinat_m, dinat_t, dinat_s, dinat_b; biformer_t, biformer_s, biformer_b; rmt_t,
rmt_s, rmt_b, rmt_l. Depths count attention blocks (a DaViT "dual block" is two).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn import ops
from big_attn.layers import Attention, MlpBlock, conv_norm, layer_norm
from big_attn.layers.norm import CONV_NORMS
from big_attn.models import common
from big_attn.ops import retention as retention_lib
from big_attn.ops import spatial

FAMILIES = ("davit", "twins_svt", "dinat", "biformer", "rmt")
# Deprecated Model fields -> their names since issue #14 (kept for one release).
RENAMED = {"local_op": "local_attention", "global_op": "global_attention",
           "local_op_args": "local_attention_args", "global_op_args": "global_attention_args"}

# The authors' settings shared by every size of a family (a variant or the Model's fields
# override them). Per-stage tuples have four entries.
_FAMILY = {
    "davit": dict(ops=("window", "channel_attention"), patch_size=4, window_size=7,
                  mlp_ratios=4, norm_eps=1e-5),
    "twins_svt": dict(ops=("window", "softmax"), patch_size=4, window_size=7,
                      sr_ratios=(8, 4, 2, 1), mlp_ratios=4, norm_eps=1e-6),
    "dinat": dict(ops=("neighborhood", "neighborhood"), patch_size=4, kernel_size=7,
                  norm_eps=1e-5),
    "biformer": dict(ops=("bilevel_routing", "bilevel_routing"), patch_size=4, num_regions=7,
                     topks=(1, 4, 16, -1), mlp_ratios=3, norm_eps=1e-6),
    "rmt": dict(ops=("retention", "retention"), patch_size=4, norm_eps=1e-6,
                head_projection=1024),
}

_VARIANTS = {
    # DaViT Table 1 (T/S/B): dual blocks (1, 1, 3, 1) / (1, 1, 9, 1).
    "davit_t": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
                    num_heads=(3, 6, 12, 24)),
    "davit_s": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                    num_heads=(3, 6, 12, 24)),
    "davit_b": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                    num_heads=(4, 8, 16, 32)),
    # Twins Table 3 (SVT-S/B/L).
    "twins_svt_s": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4),
                        num_heads=(2, 4, 8, 16)),
    "twins_svt_b": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                        num_heads=(3, 6, 12, 24)),
    "twins_svt_l": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32)),
    # DiNAT / NAT Table 1 (Mini, Tiny, Small, Base); dims double per stage.
    "dinat_m": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 6, 5),
                    num_heads=(2, 4, 8, 16), mlp_ratios=3),
    "dinat_t": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 5),
                    num_heads=(2, 4, 8, 16), mlp_ratios=3),
    "dinat_s": dict(embed_dims=(96, 192, 384, 768), depths=(3, 4, 18, 5),
                    num_heads=(3, 6, 12, 24), mlp_ratios=2, layer_scale=1e-5),
    "dinat_b": dict(embed_dims=(128, 256, 512, 1024), depths=(3, 4, 18, 5),
                    num_heads=(4, 8, 16, 32), mlp_ratios=2, layer_scale=1e-5),
    # BiFormer Table 1 (T/S/B): head_dim 32, the last stage's global attention 8 heads.
    "biformer_t": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2),
                       num_heads=(2, 4, 8, 8)),
    "biformer_s": dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 18, 4),
                       num_heads=(2, 4, 8, 8)),
    "biformer_b": dict(embed_dims=(96, 192, 384, 768), depths=(4, 4, 18, 4),
                       num_heads=(3, 6, 12, 8)),
    # RMT (the authors' RMT_T3, RMT_S, RMT_B, RMT_L).
    "rmt_t": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                  mlp_ratios=3, decays=((2, 4), (2, 4), (2, 6), (2, 6)),
                  decomposed=(True, True, False, False)),
    "rmt_s": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4),
                  num_heads=(4, 4, 8, 16), mlp_ratios=(4, 4, 3, 3),
                  decays=((2, 4), (2, 4), (2, 6), (2, 6)), decomposed=(True, True, True, False)),
    "rmt_b": dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8),
                  num_heads=(5, 5, 10, 16), mlp_ratios=(4, 4, 3, 3),
                  decays=((2, 5), (2, 5), (2, 6), (2, 6)), decomposed=(True, True, True, False),
                  layer_scale=(None, None, 1e-6, 1e-6)),
    "rmt_l": dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8),
                  num_heads=(7, 7, 14, 20), mlp_ratios=(4, 4, 3, 3),
                  decays=((2, 6), (2, 6), (2, 6), (2, 6)), decomposed=(True, True, True, False),
                  layer_scale=(None, None, 1e-6, 1e-6)),
}

# Family-specific settings: which fields each family reads (others must stay None).
_FAMILY_FIELDS = {
    "davit": ("window_size",),
    "twins_svt": ("window_size", "sr_ratios"),
    "dinat": ("kernel_size", "layer_scale"),
    "biformer": ("num_regions", "topks"),
    "rmt": ("decays", "decomposed", "layer_scale", "head_projection"),
}
_ALL_FAMILY_FIELDS = ("window_size", "sr_ratios", "kernel_size", "num_regions", "topks",
                      "decays", "decomposed", "layer_scale", "head_projection")


def decode_variant(variant: str) -> dict[str, Any]:
  """"davit_t" -> dict(family="davit", embed_dims=..., depths=..., num_heads=..., ...).

  Names are `<family>_<size>`: davit_{t,s,b}, twins_svt_{s,b,l}, dinat_{m,t,s,b},
  biformer_{t,s,b}, rmt_{t,s,b,l}; the result holds the family's shared settings too.
  """
  if not isinstance(variant, str) or variant not in _VARIANTS:
    raise ValueError(f"unknown hvit variant {variant!r}; expected one of "
                     f"{', '.join(_VARIANTS)}")
  family = variant.rsplit("_", 1)[0]
  out = dict(_FAMILY[family], family=family)
  out.update(_VARIANTS[variant])
  return out


def _stage_tuple(name: str, value, kind=int, optional=False) -> tuple:
  """An int (or float) for every stage, or a tuple of four, as a 4-tuple."""
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 4
  ok = len(values) == 4 and all(
      (optional and v is None) or (isinstance(v, (int, float) if kind is float else int)
                                   and not isinstance(v, bool) and v > 0) for v in values)
  if not ok:
    raise ValueError(f"{name} must be a positive {kind.__name__} or a tuple of four, got "
                     f"{value!r}")
  return values


def _conv(features, kernel, stride, dtype, param_dtype, name, groups=1, use_bias=True,
          padding=None):
  """Convolution with padding `kernel // 2` (PyTorch's `padding=k//2`) unless given."""
  pad = kernel // 2 if padding is None else padding
  in_axis = None if groups == 1 else "channels_in"
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), ("conv_height", "conv_width", in_axis,
                                                      "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ("embed",)))


def _dense(features, axes, dtype, param_dtype, name, zero=False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         axes[1:]))


def _drop_path(rate: float, x, deterministic: bool):
  """Stochastic depth: an example's whole branch dropped with probability `rate`."""
  return nn.Dropout(rate=rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)


def _decomposed(op_fn, query, key, value, grid, **kwargs):
  """RMT's decomposed Manhattan attention: `op_fn` along each row (grid (1, w)), then along
  each column (grid (h, 1)) of the first pass's output, with the same queries and keys."""
  h, w = grid
  b = query.shape[0]

  def rows(x):
    return x.reshape(b * h, w, *x.shape[2:])

  def cols(x):
    x = x.reshape(b, h, w, *x.shape[2:]).swapaxes(1, 2)
    return x.reshape(b * w, h, *x.shape[3:])

  out = op_fn(rows(query), rows(key), rows(value), grid=(1, w), **kwargs)
  out = op_fn(cols(query), cols(key), cols(out.reshape(b, h * w, *out.shape[2:])),
              grid=(h, 1), **kwargs)
  out = out.reshape(b, w, h, *out.shape[2:]).swapaxes(1, 2)
  return out.reshape(b, h * w, *out.shape[3:])


class _BlockAttention(Attention):
  """`Attention` with the extras of the hierarchical ViTs around the op (`attend`): arrays
  added to the op's arguments (NAT's relative position bias), RMT's decomposed passes and the
  local context enhancement `lce` (`(kernel, bias)` of a depthwise conv of V, laid out as the
  `[h, w]` map `map_size`, added to the op's output: BiFormer and RMT)."""
  extra_args: Any = None
  decomposed: bool = False
  lce: Any = None
  map_size: tuple[int, int] | None = None

  def attend(self, query, key, value, *, mask=None, is_causal=False, segment_ids=None,
             op_args=None):
    op_args = dict(op_args or {}, **(self.extra_args or {}))
    call = functools.partial(super().attend, mask=mask, is_causal=is_causal,
                             segment_ids=segment_ids)
    if self.decomposed:
      grid = op_args.pop("grid")
      out = _decomposed(lambda q, k, v, **kw: call(q, k, v, op_args=kw), query, key, value,
                        grid, **op_args)
    else:
      out = call(query, key, value, op_args=op_args)
    if self.lce is not None:  # [b, h·w, heads, d] values as a [b, h, w, c] map
      h, w = self.map_size
      kernel, bias = (jnp.asarray(t, value.dtype) for t in self.lce)
      v = value.reshape(value.shape[0], h, w, -1)
      ctx = jax.lax.conv_general_dilated(
          v, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=v.shape[-1]) + bias
      out = out + ctx.reshape(out.shape).astype(out.dtype)
    return out


class Block(nn.Module):
  """`x (+ CPE(x))`, `x + DropPath(γ1·Attn(LN(x)))`, `(+ CPE(x))`, `x + DropPath(γ2·FFN(LN(x)))`
  on a `[batch, h, w, c]` map.

  Attributes:
    num_heads, mlp_dim: attention heads and FFN hidden width.
    op, op_args: the attention op (registry name) and its arguments (`grid` is filled in);
      implementation: its `implementation`.
    cpe: depthwise 3x3 residual position encoding before the attention (DaViT, BiFormer, RMT).
    cpe_mlp: another one before the FFN (DaViT).
    kv_reduction: sub-sample keys/values by an r x r stride-r conv + LN before their
      projections (Twins GSA, PVT); 1: none.
    rpb_size: a relative position bias `[heads, 2k−1, 2k−1]` for op `neighborhood` (NAT).
    lce: kernel size of the local context enhancement (depthwise conv of V added to the op's
      output, BiFormer and RMT); 0: none.
    decomposed: the op (retention) runs along rows then columns (RMT).
    rope_base: rotary embedding base of `Attention` (RMT); None: none.
    ffn_conv: residual depthwise 3x3 conv between the FFN's layers, after the GELU (RMT).
    ffn_conv_before_gelu: the FFN's residual conv before its GELU instead (DAT++'s ConvFFN).
    layer_scale: initial γ (per channel, learned); None: no layer scale.
    approximate_gelu: tanh-approximate GELU in the FFN; False: exact (the papers' PyTorch code).
  """
  num_heads: int
  mlp_dim: int
  op: str
  op_args: Any = None
  implementation: str | None = None
  cpe: bool = False
  cpe_mlp: bool = False
  kv_reduction: int = 1
  rpb_size: int | tuple[int, int] | None = None
  lce: int = 0
  decomposed: bool = False
  rope_base: float | None = None
  ffn_conv: bool = False
  ffn_conv_before_gelu: bool = False
  layer_scale: float | None = None
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    b, h, w, c = x.shape
    dt, pdt = self.dtype, self.param_dtype
    if self.cpe:
      x = x + _conv(c, 3, 1, dt, pdt, "cpe", groups=c)(x)
    y = layer_norm(dt, pdt, "norm1", epsilon=self.norm_eps)(x)
    kv, kv_grid = None, (h, w)
    if self.kv_reduction > 1:
      r = self.kv_reduction
      kv = _conv(c, r, r, dt, pdt, "sr", padding=0)(y)
      kv = layer_norm(dt, pdt, "sr_norm", epsilon=self.norm_eps)(kv)
      kv_grid = kv.shape[1:3]
      kv = kv.reshape(b, -1, c)
    op_args = dict(self.op_args or {})
    if spatial.takes_grid(self.op):
      op_args["grid"] = kv_grid
    extra = {}
    if self.rpb_size is not None and self.op == "neighborhood":
      kh, kw = self.rpb_size
      extra["rpb"] = jnp.asarray(self.param(
          "rpb", nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02),
                                              ("heads", None, None)),
          (self.num_heads, 2 * kh - 1, 2 * kw - 1), pdt), dt)
    lce = None  # (kernel, bias) of the depthwise conv of V
    if self.lce:
      k = self.lce
      kernel = self.param("lce_kernel", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("conv_height", "conv_width", None, "embed")),
                          (k, k, 1, c), pdt)
      bias = self.param("lce_bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("embed",)), (c,), pdt)
      lce = (kernel, bias)
    y = _BlockAttention(num_heads=self.num_heads, op=self.op, op_args=op_args,
                        implementation=self.implementation, use_bias=True,
                        rope_base=self.rope_base, extra_args=extra, decomposed=self.decomposed,
                        lce=lce, map_size=(h, w), dtype=dt, param_dtype=pdt,
                        kernel_init=nn.initializers.xavier_uniform(), name="attention")(
                            y.reshape(b, h * w, c), kv)
    x = x + _drop_path(self.drop_path, self._scale("gamma1", y.reshape(b, h, w, c)),
                       deterministic)
    if self.cpe_mlp:
      x = x + _conv(c, 3, 1, dt, pdt, "cpe_mlp", groups=c)(x)
    y = layer_norm(dt, pdt, "norm2", epsilon=self.norm_eps)(x)
    if self.ffn_conv or self.ffn_conv_before_gelu:
      gelu = functools.partial(nn.gelu, approximate=self.approximate_gelu)
      y = _dense(self.mlp_dim, ("embed", "mlp"), dt, pdt, "fc1")(y)
      y = y if self.ffn_conv_before_gelu else gelu(y)
      y = y + _conv(self.mlp_dim, 3, 1, dt, pdt, "ffn_conv", groups=self.mlp_dim)(y)
      y = _dense(c, ("mlp", "embed"), dt, pdt, "fc2")(gelu(y) if self.ffn_conv_before_gelu
                                                       else y)
    else:
      y = MlpBlock(mlp_dim=self.mlp_dim, approximate_gelu=self.approximate_gelu, dtype=dt,
                   param_dtype=pdt, name="mlp")(y)
    return x + _drop_path(self.drop_path, self._scale("gamma2", y), deterministic)

  def _scale(self, name, y):
    if self.layer_scale is None:
      return y
    gamma = self.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(self.layer_scale), ("embed",)), (y.shape[-1],),
                       self.param_dtype)
    return y * jnp.asarray(gamma, y.dtype)


class Model(nn.Module):
  """Hierarchical local-global ViT: `[batch, H, W, C]` -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled, normalised features.
    variant: size name for `decode_variant` ("davit_t"); fields below override it.
    family: "davit", "twins_svt", "dinat", "biformer" or "rmt" (`arch` is an alias); implied by
      the variant.
    embed_dims, depths, num_heads: per stage (four each); depths count attention blocks.
    mlp_ratios: FFN width / embed dim (an int for all stages, or four).
    patch_size: stride of the stem (4 in the papers; a power of two for the conv stems of
      dinat, biformer and rmt); the total stride is 8·patch_size.
    window_size: DaViT / Twins LSA windows (on a smaller map or one it does not divide: the
      largest divisor of the map's side below it).
    sr_ratios: Twins GSA key/value sub-sampling per stage.
    kernel_size: DiNAT neighbourhood (clipped to the largest odd size a map holds).
    num_regions, topks: BiFormer regions per side and routed regions per stage (topk -1: the
      stage attends globally, the paper's last stage).
    decays: RMT `(init_value, heads_range)` per stage; decomposed: RMT stages attending along
      rows, then columns.
    layer_scale: initial layer scale, a float or one per stage (None: none).
    head_projection: RMT's Dense width before the pooling (None: none).
    local_attention, global_attention: registry names replacing the family's ops of even / odd
      blocks; local_attention_args, global_attention_args: their extra arguments (merged over
      the family's when the op is the family's own); a 2-D op gets the stage's `grid` and its
      sizes clipped to the map (`big_attn.ops.spatial`). attention_impl: the ops'
      `implementation` (None, "xla", "pallas", "cudnn"). `local_op`, `global_op`,
      `local_op_args`, `global_op_args`: deprecated names.
    drop_path: stochastic depth rate of the last block (linear from 0).
    approximate_gelu: tanh-approximate GELU in the FFNs; False: exact (timm's weights).
    conv_norm: BiFormer's and RMT's stem, downsampling and final norms, "batch" (their
      papers') or "layer"; the other families use LayerNorm.
    head_zeroinit: zero-initialised classifier.
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical names embed, mlp, heads, head_dim, norm, conv_height,
  conv_width, channels_in and classes.
  """
  num_classes: int
  variant: str | None = None
  family: str | None = None
  arch: str | None = None
  embed_dims: Any = None
  depths: Any = None
  num_heads: Any = None
  mlp_ratios: Any = None
  patch_size: int | None = None
  window_size: int | None = None
  sr_ratios: Any = None
  kernel_size: int | None = None
  num_regions: int | None = None
  topks: Any = None
  decays: Any = None
  decomposed: Any = None
  layer_scale: Any = None
  head_projection: int | None = None
  local_attention: str | None = None
  global_attention: str | None = None
  local_attention_args: Any = None
  global_attention_args: Any = None
  attention_impl: str | None = None
  drop_path: float = 0.0
  approximate_gelu: bool = True
  conv_norm: str = "batch"
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  local_op: str | None = None  # deprecated names of the four fields above
  global_op: str | None = None
  local_op_args: Any = None
  global_op_args: Any = None

  def __post_init__(self):
    common.rename_fields(self, RENAMED)
    super().__post_init__()

  def _norm(self, spec, name: str, train: bool):
    """The family's stem / downsampling / final norm: BatchNorm for BiFormer and RMT (with
    `conv_norm="batch"`), LayerNorm (the family's eps) otherwise."""
    kind = self.conv_norm if spec["family"] in ("biformer", "rmt") else "layer"
    return conv_norm(kind, train, self.dtype, self.param_dtype, name, batch_norm_eps=1e-5,
                     batch_norm_momentum=0.9, layer_norm_eps=spec["norm_eps"])

  def spec(self) -> dict[str, Any]:
    """The resolved settings: family defaults, then the variant's, then explicit fields."""
    names = {n for n in (self.family, self.arch) if n is not None}
    if len(names) > 1:
      raise ValueError(f"family {self.family!r} and arch {self.arch!r} disagree")
    family = names.pop() if names else None
    if self.conv_norm not in CONV_NORMS:
      raise ValueError(f"unknown conv_norm {self.conv_norm!r}; expected one of {CONV_NORMS}")
    spec = {}
    if self.variant is not None:
      spec = decode_variant(self.variant)
      if family is not None and family != spec["family"]:
        raise ValueError(f"variant {self.variant!r} is a {spec['family']} model, not "
                         f"family {family!r}")
      family = spec["family"]
    if family is None:
      raise ValueError(f"hvit Model needs a variant (e.g. 'davit_t') or a family, one of "
                       f"{FAMILIES}")
    if family not in _FAMILY:
      raise ValueError(f"unknown hvit family {family!r}; expected one of {FAMILIES} (or a "
                       "variant such as 'davit_t')")
    spec = dict(_FAMILY[family], **spec)
    spec["family"] = family
    for name in ("embed_dims", "depths", "num_heads", "mlp_ratios", "patch_size",
                 "head_projection") + _ALL_FAMILY_FIELDS:
      value = getattr(self, name)
      if value is None:
        continue
      if name in _ALL_FAMILY_FIELDS and name not in _FAMILY_FIELDS[family]:
        raise ValueError(f"{name} is not a setting of family {family!r} (its settings: "
                         f"{', '.join(_FAMILY_FIELDS[family])})")
      spec[name] = value
    missing = [k for k in ("embed_dims", "depths", "num_heads") if spec.get(k) is None]
    if missing:
      raise ValueError(f"hvit Model needs a variant or explicit {', '.join(missing)}")
    for name in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
      spec[name] = _stage_tuple(name, spec.get(name, 4))
    spec["layer_scale"] = _stage_tuple("layer_scale", spec.get("layer_scale"), float, True)
    for name in ("patch_size", "window_size", "kernel_size", "num_regions",
                 "head_projection"):
      value = spec.get(name)
      if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                    and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if family in ("dinat", "biformer", "rmt") and spec["patch_size"] & (spec["patch_size"] - 1):
      raise ValueError(f"patch_size of the {family} conv stem must be a power of two, got "
                       f"{spec['patch_size']}")
    if family == "twins_svt":
      spec["sr_ratios"] = _stage_tuple("sr_ratios", spec["sr_ratios"])
    if family == "biformer":
      topks = spec["topks"]
      topks = tuple(topks) if isinstance(topks, (tuple, list)) else (topks,) * 4
      if len(topks) != 4 or not all(isinstance(t, int) and (t >= 1 or t == -1)
                                    for t in topks):
        raise ValueError(f"topks must be four ints >= 1 or -1 (global), got {spec['topks']!r}")
      spec["topks"] = topks
    if family == "rmt":
      decays, decomposed = spec.get("decays", ((2, 4),) * 4), spec.get("decomposed")
      decomposed = (True, True, False, False) if decomposed is None else decomposed
      if not (isinstance(decays, (tuple, list)) and len(decays) == 4
              and all(isinstance(d, (tuple, list)) and len(d) == 2 for d in decays)):
        raise ValueError(f"decays must be four (init_value, heads_range) pairs, got {decays!r}")
      decomposed = tuple(decomposed) if isinstance(decomposed, (tuple, list)) else (
          (decomposed,) * 4)
      if len(decomposed) != 4 or not all(isinstance(d, bool) for d in decomposed):
        raise ValueError(f"decomposed must be a bool or four of them, got {decomposed!r}")
      spec["decays"], spec["decomposed"] = tuple(tuple(d) for d in decays), decomposed
    for i, (dim, heads) in enumerate(zip(spec["embed_dims"], spec["num_heads"])):
      if dim % heads:
        raise ValueError(f"embed_dims[{i}] = {dim} must be divisible by num_heads[{i}] = "
                         f"{heads}")
    ops_ = list(spec["ops"])
    for slot, (op, op_args) in enumerate(
        ((self.local_attention, self.local_attention_args),
         (self.global_attention, self.global_attention_args))):
      if op is not None:
        if op not in ops.names():
          raise ValueError(f"unknown attention op {op!r}; known: {', '.join(ops.names())}")
        ops_[slot] = op
      if op_args is not None and not hasattr(op_args, "keys"):
        raise TypeError(f"local_attention_args/global_attention_args must be dicts, got "
                        f"{type(op_args).__name__}")
    spec["ops"] = tuple(ops_)
    # Twins' global attention has its keys and values on the sr-reduced map.
    same_grid = family != "twins_svt" or all(r == 1 for r in spec["sr_ratios"])
    spatial.check_op(spec["ops"][1], "hvit", same_grid=same_grid)
    return spec

  def _op_args(self, spec, slot: int, stage: int, grid: tuple[int, int]) -> dict[str, Any]:
    """The family's arguments of the op in `slot` (0 local, 1 global) at `stage`, then the
    config's."""
    family, op = spec["family"], spec["ops"][slot]
    args = {}
    if op == _FAMILY[family]["ops"][slot]:
      if op == "window":
        args = dict(window_size=spec["window_size"], rpb=None)
      elif op == "neighborhood":
        kernel = tuple(min(spec["kernel_size"], s - 1 + s % 2) for s in grid)
        dilation = tuple(max(1, s // k) for s, k in zip(grid, kernel)) if slot else (1, 1)
        args = dict(kernel_size=kernel, dilation=dilation)
      elif op == "bilevel_routing":
        topk = spec["topks"][stage]
        if topk == -1:
          args = dict(num_regions=1, topk=1)
        else:
          args = dict(num_regions=spec["num_regions"], topk=topk,
                      scale=spec["embed_dims"][stage] ** -0.5)
      elif op == "retention":
        init_value, heads_range = spec["decays"][stage]
        args = dict(gamma=retention_lib.rmt_gammas(spec["num_heads"][stage], init_value,
                                                   heads_range).astype(np.float32))
    args.update((self.global_attention_args if slot else self.local_attention_args) or {})
    return spatial.op_args(op, args, grid) or {}

  def _stem(self, spec, x, train):
    family, p, dim = spec["family"], spec["patch_size"], spec["embed_dims"][0]
    dt, pdt = self.dtype, self.param_dtype
    norm = lambda name, y: self._norm(spec, name, train)(y)  # pylint: disable=g-long-lambda
    if family == "davit":
      return norm("stem_norm", _conv(dim, 2 * p - 1, p, dt, pdt, "stem")(x))
    if family == "twins_svt":
      return norm("stem_norm", _conv(dim, p, p, dt, pdt, "stem", padding=0)(x))
    halvings = int(math.log2(p))
    for i in range(halvings):
      width = dim if i == halvings - 1 else dim // 2
      if i and family != "dinat":
        x = nn.gelu(x)
      x = _conv(width, 3, 2, dt, pdt, f"stem_{i}")(x)
      if family == "dinat":
        continue
      x = norm(f"stem_norm_{i}", x)
      if family == "rmt":
        x = _conv(width, 3, 1, dt, pdt, f"stem_{i}_1")(nn.gelu(x))
        x = norm(f"stem_norm_{i}_1", x)
    return norm("stem_norm", x) if family == "dinat" else x

  def _downsample(self, spec, x, stage, train):
    family, dim = spec["family"], spec["embed_dims"][stage]
    dt, pdt = self.dtype, self.param_dtype
    name = f"downsample_{stage}"
    if family == "davit":
      x = self._norm(spec, f"{name}_norm", train)(x)
      return _conv(dim, 2, 2, dt, pdt, name, padding=0)(x)
    if family == "twins_svt":
      x = _conv(dim, 2, 2, dt, pdt, name, padding=0)(x)
    else:
      x = _conv(dim, 3, 2, dt, pdt, name, use_bias=family != "dinat")(x)
    return self._norm(spec, f"{name}_norm", train)(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    spec = self.spec()
    family = spec["family"]
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    stride = 8 * spec["patch_size"]
    if images.shape[1] % stride or images.shape[2] % stride:
      raise ValueError(f"image size {images.shape[1:3]} must be a multiple of the total "
                       f"stride {stride} (8 x patch_size)")
    deterministic = not train
    dt, pdt = self.dtype, self.param_dtype
    total = sum(spec["depths"])
    rates = np.linspace(0.0, self.drop_path, total) if total > 1 else np.zeros(total)
    x = self._stem(spec, jnp.asarray(images, dt), train)
    block_index = 0
    for stage, (dim, depth, heads, ratio) in enumerate(zip(
        spec["embed_dims"], spec["depths"], spec["num_heads"], spec["mlp_ratios"])):
      if stage:
        x = self._downsample(spec, x, stage, train)
      grid = x.shape[1:3]
      head_dim = dim // heads
      rope_base = None
      if family == "rmt":
        if head_dim % 2 or head_dim <= 2:
          raise ValueError(f"RMT's rotary embedding needs an even head_dim > 2, got {head_dim} "
                           f"at stage {stage}")
        rope_base = 10_000.0 ** (head_dim / (head_dim - 2))
      for j in range(depth):
        slot = j % 2
        op = spec["ops"][slot]
        kernel = (spec["kernel_size"],) * 2 if family == "dinat" else None
        x = Block(
            num_heads=heads, mlp_dim=dim * ratio, op=op,
            op_args=self._op_args(spec, slot, stage, grid), implementation=self.attention_impl,
            cpe=family in ("davit", "biformer", "rmt"), cpe_mlp=family == "davit",
            kv_reduction=spec["sr_ratios"][stage] if family == "twins_svt" and slot else 1,
            rpb_size=None if kernel is None else tuple(
                min(k, s - 1 + s % 2) for k, s in zip(kernel, grid)),
            lce=5 if family in ("biformer", "rmt") else 0,
            decomposed=family == "rmt" and op == "retention" and spec["decomposed"][stage],
            rope_base=rope_base, ffn_conv=family == "rmt",
            layer_scale=spec["layer_scale"][stage], drop_path=float(rates[block_index]),
            norm_eps=spec["norm_eps"], approximate_gelu=self.approximate_gelu, dtype=dt,
            param_dtype=pdt, name=f"stage{stage}_block{j}")(x, deterministic)
        block_index += 1
        if family == "twins_svt" and j == 0:
          x = x + _conv(dim, 3, 1, dt, pdt, f"stage{stage}_peg", groups=dim)(x)

    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if spec.get("head_projection"):
      x = _dense(spec["head_projection"], ("embed", "mlp"), dt, pdt, "head_projection")(x)
      x = nn.swish(self._norm(spec, "norm", train)(x))
      x = jnp.mean(x, axis=1)
    elif family == "biformer" and self.conv_norm == "batch":
      x = jnp.mean(self._norm(spec, "norm", train)(x), axis=1)
    else:
      x = self._norm(spec, "norm", train)(jnp.mean(x, axis=1))
    if self.num_classes:
      x = _dense(self.num_classes, ("embed", "classes"), dt, pdt, "head",
                 zero=self.head_zeroinit)(x)
    return x.astype(jnp.float32)
