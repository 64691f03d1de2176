"""Token reduction between the attention and the MLP of a ViT block, for any attention op.

    model = vit.Model(num_classes=10, variant="S/16", pool_type="cls", attention="softmax",
                      token_reduction={"method": "evit", "keep_rate": 0.7})

Methods (`METHODS`; the keys of each, with the papers' defaults, in `DEFAULTS`):

- "evit": Not All Patches are What You Need: Expediting Vision Transformers via Token
  Reorganizations (Liang et al., 2022). At each layer of `layers`, with `a_j` the class token's
  attention to patch token j (averaged over heads), the ⌈keep_rate·N⌉ patch tokens of largest
  `a_j` are kept (in decreasing order of `a_j`) and the others fused into one token
  `Σ_{j dropped} a_j x_j` (`fuse_token`; dropped otherwise). Needs a class token.
- "tome": Token Merging: Your ViT but Faster (Bolya et al., 2023), bipartite soft matching. The
  tokens are split alternately into sets A and B; each token of A is matched to its most
  cosine-similar token of B (metric: the keys averaged over heads); the `r` best-matched tokens
  of A are merged into their match by the size-weighted average `Σ s_i x_i / Σ s_i`, sizes add.
  Output order: the unmerged tokens of A (in their order), then B.
- "mctf": Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
  Transformers (Lee et al., 2024). Bipartite matching on the attraction
  `W_ij = W^sim_ij · W^info_ij · W^size_ij` with `W^sim = ((cos(x_i, x_j) + 1) / 2)^(1/τ_sim)`
  (similarity of the tokens), `W^info = (ã_i ã_j)^(1/τ_info)`, `ã = (1/a) / max(1/a)` where
  `a_j` is the attention token j receives (averaged over heads and queries), and
  `W^size = (s̃_i s̃_j)^(1/τ_size)`, `s̃ = (1/s) / max(1/s)` (a τ of 0 drops the criterion).
  Bidirectional: ⌊r/2⌋ tokens of A merge into B, then ⌈r/2⌉ tokens of B into the unmerged A
  (output: A then B); fusion weights each token by `a_i s_i`: `x = Σ a_i s_i x_i / Σ a_i s_i`,
  sizes add. The matching and the fusion weights carry no gradient. With `one_step_ahead`
  (the paper's setting; off by default) `a` is the one-step-ahead attention: the attention of
  the NEXT block, approximated on the tokens being fused (the block's MLP skipped):
  `softmax((LN'(x) W'_q)(LN'(x) W'_k)ᵀ·scale (+ log s))` with the next block's LayerNorm and
  projections; the last block, or one followed by an attention-free block, uses its own.
  The paper then reuses that map, fused, as the next block's attention; here the next block
  computes its own on the fused tokens. Its token reduction consistency (training) is
  `big_attn.train.regularizers.with_token_reduction_consistency`
  (`config.loss.token_reduction_consistency`).
- "stvit": Making Vision Transformers Efficient from A Token Sparsification View (Chang et al.,
  2023), semantic tokens. At its one layer the N patch tokens (a square grid, unreduced) are
  average-pooled into `num_tokens` (a square) semantic tokens `S₀ = P x` (adaptive pooling bins,
  `grid_pool`), which attend to all tokens, themselves and the image tokens:
  `S = S₀ + MHA(LN(S₀), LN([S₀; x]))` (softmax, learned projections); S replaces the image
  tokens in every later block. The paper's STGM is two blocks whose queries are the pooled and
  then the semantic tokens; here one cross-attention between the block's attention and its MLP.
  Its recovery module (STViT-R, image tokens re-attending to the semantic tokens) serves dense
  prediction and is not implemented: the classifier reads the class token or the mean.
- "sit": Self-slimmed Vision Transformer (Zong et al., 2022), token slimming module: the N
  tokens become ⌈keep_rate·N⌉ soft clusters `x̂ = A x`, `A = softmax_N(Wᵀ / tau)`, with
  `W = MLP(LN(x)) [N, N̂]` (C -> C/2 GELU -> N̂, learned); sizes `A s`. Its feature
  recalibration distillation (a teacher and the reverse module, training) is not implemented.
- "spa": Context-Aware Token Selection and Packing for Enhanced Vision Transformer (Select and
  Pack Attention). A gating layer scores each token `g_j = sigmoid(w·LN(x_j) + b)` (`TokenGate`),
  supervised by selection labels: `y_j = 1` for the ⌈keep_rate·N⌉ tokens that receive the
  most attention in the block, from the class token when the model has one, else averaged
  over the valid queries (softmax over the valid keys, averaged over heads; the paper derives
  its labels from object boxes, which classification lacks), with the binary
  cross-entropy `selection_loss` (`config.loss.spa_selection`). Without `threshold` the
  ⌈keep_rate·N⌉ tokens of largest gate are kept (`select_and_pack`, a fixed budget); with
  `threshold` τ each image keeps its own number, the tokens with `g_j > τ` (`pack`): they come
  first, in decreasing gate order, the rest are padding of size 0 that every later attention
  masks out as keys (the key-padding mask of the packed batch; shapes stay static), so it needs
  a class token and an op that takes a mask. Kept tokens are scaled by their gate, so the
  gate also learns from the task loss. The paper's Gumbel-softmax sampling of the selection and
  its multi-scale labels are not built.
- "dependencyvit": Visual Dependency Transformers: Dependency Tree Emerges from Reversed
  Attention (Ding et al., 2023), DependencyViT-Lite pruning. Each child token j distributes its
  message `m_j` over its parents, `A_ji = softmax_i(q_j·k_i·scale)`; the dependency score of
  token i is what it receives, `d_i = Σ_j A_ji m_j` (averaged over heads; `m` is the
  `reversed_attention` op's message controller, 1 for other ops). The leaves, tokens of lowest
  score, are pruned: the ⌈keep_rate·N⌉ of largest score stay, in their order.
- "lookupvit": LookupViT: Compressing visual information to a limited number of tokens (Koner
  et al., 2024). Before the block of `layers` (one index) the N patch tokens (a square grid),
  now lookup tokens, are pooled into `num_tokens` compressed tokens (`grid_pool`); from that
  block on every block is a LookupViT block (`LookupExchange`): the compressed tokens gather
  from the lookup tokens by cross-attention, go through the block's attention and MLP together
  with the protected tokens (the op sees only these), and the lookup tokens receive from them
  through the same attention logits transposed (the bidirectional cross-attention), then an
  MLP `mlp_reduction` times narrower than the block's. After the last block the lookup
  tokens are dropped: the head reads the class token or the mean of the compressed tokens.
- "mstm": Multi-Scale And Token Mergence: Make Your ViT More Efficient. Before the block of
  the first of `layers` the patch tokens (a square grid, unreduced) are fused with their
  multi-scale versions, `x̃ = mean_{s ∈ scales} U_s P_s x` (`P_s` the s×s average pooling of
  the grid, `U_s` its nearest upsampling; scale 1 is x itself; `multi_scale_fuse`). At each
  block of `layers` the patch tokens are ranked by importance, the class token's attention
  `a_j` (averaged over heads); the ⌈keep_rate·N⌉ crucial ones stay (in decreasing importance)
  and each other token is merged into the crucial token most similar to it (cosine of the
  keys averaged over heads), by the size-weighted average `Σ s_i x_i / Σ s_i`, sizes adding
  (`merge_into_crucial`). Needs a class token. The choice and the assignment carry no
  gradient. Our reading of the abstract: the multi-scale features are grid poolings fused
  once, where the tokens still form the grid.
- "hvt": Scalable Vision Transformers with Hierarchical Pooling (Pan et al., 2021). Before
  each block of `layers` (the starts of stages) the patch tokens are max-pooled along the
  sequence, per channel: windows of `kernel_size` (3) tokens every `stride` (2), no padding,
  so N tokens become ⌊(N − kernel_size)/stride⌋ + 1 (`max_pool_tokens`); a pooled token's size
  is the mean size of its window times the stride. The paper's model has no class token (its
  head averages the tokens: `pool_type="gap"`); here the class and register tokens, when there
  are any, are not pooled.

The learned modules (STViT's cross-attention, SiT's slimming MLP, SPA's gate) are the
parameters `token_reduction` of the reducing block; LookupViT's are `lookup_exchange` of each
LookupViT block.

Ops that need the patch grid (`big_attn.ops.spatial.takes_grid`) cannot run on reduced tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn import ops
from big_attn.layers import settings as settings_lib
from big_attn.layers.attention import Attention
from big_attn.layers.attention import Projection
from big_attn.layers.mlp import MlpBlock
from big_attn.layers.norm import layer_norm
from big_attn.ops import checks
from big_attn.ops import spatial

Array = jax.Array

METHODS = ("evit", "tome", "mctf", "stvit", "sit", "spa", "dependencyvit", "lookupvit", "hvt",
           "mstm")
# The papers' settings: EViT keeps 70% at the 4th, 7th and 10th of 12 layers (DeiT-S); ToMe's
# r = 16 on every layer (its timm patch); MCTF r = 16, τ_sim 1, τ_info 20, τ_size 40,
# bidirectional (DeiT-S); STViT 16 semantic tokens on DeiT; LookupViT's 5x5 compressed
# tokens, lookup MLP 4x narrower (our reading). `layers=None`: the 4th, 7th and 10th of 12
# layers scaled to the depth for EViT and the other pruning methods (SiT, SPA,
# DependencyViT-Lite: our choice of layers and rates, the papers' vary by model), every layer
# for ToMe and MCTF, the 5th of 12 for STViT (our reading
# of where its semantic tokens start) and the first for LookupViT (compressed from the start);
# HVT pools with a window of 3 and stride 2 at the starts of its stages, the 4th, 7th and 10th
# of 12 blocks (4 stages of 3 blocks); MSTM prunes 30% at EViT's layers, its scales 1 and 2 (our
# choice).
DEFAULTS = {
    "evit": dict(keep_rate=0.7, layers=None, fuse_token=True),
    "tome": dict(r=16, layers=None, prop_attn=True),
    "mctf": dict(r=16, layers=None, prop_attn=True, tau_sim=1.0, tau_info=20.0, tau_size=40.0,
                 bidirectional=True, one_step_ahead=False),
    "stvit": dict(num_tokens=16, layers=None),
    "sit": dict(keep_rate=0.5, layers=None, tau=1.0),
    "spa": dict(keep_rate=0.7, layers=None, threshold=None),
    "dependencyvit": dict(keep_rate=0.7, layers=None),
    "lookupvit": dict(num_tokens=25, layers=None, mlp_reduction=4),
    "hvt": dict(kernel_size=3, stride=2, layers=None),
    "mstm": dict(keep_rate=0.7, layers=None, scales=(1, 2)),
}
_EVIT_LAYERS_OF_12 = (3, 6, 9)
_ONE_LAYER = ("stvit", "lookupvit")  # the patch tokens are replaced once


@dataclasses.dataclass(frozen=True)
class TokenReduction:
  """A checked `token_reduction` config (`resolve`): the method, its settings and whether the
  model's first token is a class token."""
  method: str
  layers: tuple[int, ...]
  keep_rate: float = 1.0
  fuse_token: bool = True
  r: int = 0
  prop_attn: bool = False
  tau_sim: float = 0.0
  tau_info: float = 0.0
  tau_size: float = 0.0
  bidirectional: bool = False
  one_step_ahead: bool = False
  num_tokens: int = 0
  tau: float = 1.0
  mlp_reduction: int = 1
  kernel_size: int = 0
  stride: int = 0
  threshold: float | None = None
  scales: tuple[int, ...] = ()
  class_token: bool = True

  @property
  def pads(self) -> bool:
    """Whether the method leaves padding tokens (size 0) that later attentions mask out."""
    return self.method == "spa" and self.threshold is not None

  def bias_for(self, op: str) -> bool:
    """Whether proportional attention reaches `op` (as its `bias`)."""
    return self.prop_attn and ops.spec(op).bias


def _bool(name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}")
  return value


def resolve(config: Any, depth: int, *, op: str = "softmax",
            has_class_token: bool = True) -> TokenReduction | None:
  """The `token_reduction` config dict of a ViT of `depth` blocks, checked, with the defaults of
  `DEFAULTS`; None for None. Raises `TypeError` for a non-dict and `ValueError` naming the key for
  an unknown method, key or value, for EViT without a class token and for a 2-D `op`."""
  parsed = settings_lib.method_settings("token_reduction", config, DEFAULTS,
                                        "{'method': 'tome', 'r': 8}")
  if parsed is None:
    return None
  method, settings = parsed
  if spatial.takes_grid(op):
    raise ValueError(f"token_reduction: attention op {op!r} needs the patch grid, which token "
                     "reduction does not keep")
  if method in ("evit", "mstm") and not has_class_token:
    raise ValueError(f"token_reduction method {method!r} ranks the patches by the class "
                     "token's attention: the model needs a class token (ViT pool_type 'cls' "
                     "or 'tok')")
  if method == "spa" and settings["threshold"] is not None and not has_class_token:
    raise ValueError("token_reduction method 'spa' with a threshold pads each image's tokens: "
                     "the model needs a class token (ViT pool_type 'cls' or 'tok') to read")
  name = lambda key: f"token_reduction[{key!r}]"  # pylint: disable=unnecessary-lambda-assignment
  layers = settings.pop("layers")
  if layers is None:
    layers = {"tome": range(depth), "mctf": range(depth), "stvit": (round(4 * depth / 12),),
              "lookupvit": (0,)}.get(method, sorted(
                  {min(depth - 1, round(i * depth / 12)) for i in _EVIT_LAYERS_OF_12}))
  if isinstance(layers, int) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in layers):
    raise ValueError(f"{name('layers')} must be a sequence of block indices, got {layers!r}")
  layers = tuple(sorted(set(layers)))
  if layers and not 0 <= layers[0] <= layers[-1] < depth:
    raise ValueError(f"{name('layers')} must hold block indices in [0, {depth}), got {layers}")
  if method in _ONE_LAYER and len(layers) != 1:
    raise ValueError(f"{name('layers')} of method {method!r} must hold one block index (the "
                     f"patch tokens are replaced once), got {layers}")
  out = {}
  for key, value in settings.items():
    if key == "keep_rate":
      out[key] = checks.unit_interval(name(key), value)
    elif key == "r":
      out[key] = checks.int_in_range(name(key), value, 0)
    elif key == "num_tokens":
      out[key] = checks.positive_int(name(key), value)
      if math.isqrt(value) ** 2 != value:
        raise ValueError(f"{name(key)} must be a square (a grid of pooled tokens), got {value}")
    elif key in ("mlp_reduction", "kernel_size", "stride"):
      out[key] = checks.positive_int(name(key), value)
    elif key == "tau":
      out[key] = checks.positive_float(name(key), value)
    elif key == "scales":
      if isinstance(value, (int, str)) or not value or not all(
          isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{name(key)} must be a non-empty sequence of positive ints (pooling "
                         f"sizes), got {value!r}")
      out[key] = tuple(sorted(set(value)))
    elif key == "threshold":
      out[key] = None if value is None else checks.unit_interval(name(key), value,
                                                                 include_one=False)
    elif key.startswith("tau_"):
      out[key] = checks.non_negative_float(name(key), value)
    else:
      out[key] = _bool(name(key), value)
  return TokenReduction(method=method, layers=layers, class_token=has_class_token, **out)


# ------------------------------------------------------------------------- Attention of the block
def _logits(query: Array, key: Array, scale: float | None, size: Array | None) -> Array:
  """`q·kᵀ·scale (+ log s_j)`: `[batch, heads, q_len, kv_len]` float32 (GQA keys repeated)."""
  query, key = query.astype(jnp.float32), key.astype(jnp.float32)
  key = jnp.repeat(key, query.shape[2] // key.shape[2], axis=2)
  scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * scale
  if size is not None:
    logits = logits + jnp.log(size)[:, None, None, :]
  return logits


def class_attention(query: Array, key: Array, *, scale: float | None = None,
                    size: Array | None = None) -> Array:
  """The first token's softmax attention over all tokens, averaged over heads: `[batch, n]`."""
  return jnp.mean(jax.nn.softmax(_logits(query[:, :1], key, scale, size), axis=-1)[:, :, 0], 1)


def received_attention(query: Array, key: Array, *, scale: float | None = None,
                       size: Array | None = None) -> Array:
  """The softmax attention each token receives, averaged over heads and queries: `[batch, n]`."""
  return jnp.mean(jax.nn.softmax(_logits(query, key, scale, size), axis=-1), axis=(1, 2))


# ----------------------------------------------------------------------------------- Reductions
def _gather(x: Array, idx: Array) -> Array:
  """`x[b, idx[b, i]]` for `x: [b, n, ...]` and `idx: [b, m]`."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def evit(x: Array, size: Array, cls_attn: Array, keep_rate: float, *, num_protected: int = 1,
         fuse_token: bool = True) -> tuple[Array, Array]:
  """EViT's reorganisation of `x: [b, n, c]` with token sizes `size: [b, n]` and the class
  token's attention `cls_attn: [b, n]` (token 0 is the class token).

  The first `num_protected` tokens stay; of the others, the ⌈keep_rate·N⌉ with the largest
  attention follow in decreasing order, then (`fuse_token`) `Σ_{dropped} a_j x_j` with size
  `Σ_{dropped} s_j`. Returns `(x, size)`; unchanged when nothing would be dropped.
  """
  p = num_protected
  n = x.shape[1] - p
  keep = math.ceil(keep_rate * n)
  if keep >= n:
    return x, size
  attn = cls_attn[:, p:]
  _, order = jax.lax.top_k(attn, n)
  kept, dropped = order[:, :keep], order[:, keep:]
  body, body_size = x[:, p:], size[:, p:]
  parts = [x[:, :p], _gather(body, kept)]
  sizes = [size[:, :p], _gather(body_size, kept)]
  if fuse_token:
    weight = _gather(attn, dropped).astype(x.dtype)
    parts.append(jnp.einsum("bj,bjc->bc", weight, _gather(body, dropped))[:, None])
    sizes.append(jnp.sum(_gather(body_size, dropped), axis=1, keepdims=True))
  return jnp.concatenate(parts, axis=1), jnp.concatenate(sizes, axis=1)


def _match(scores: Array, r: int) -> tuple[Array, Array, Array]:
  """Bipartite soft matching on `scores: [b, ta, tb]`: `(unmerged [b, ta - r] in index order,
  sources [b, r], their destinations [b, r])`; sources are the r rows of largest maximum."""
  order = jnp.argsort(-jnp.max(scores, axis=-1), axis=-1, stable=True)
  src, unm = order[:, :r], jnp.sort(order[:, r:], axis=-1)
  return unm, src, _gather(jnp.argmax(scores, axis=-1), src)


def _slots(unm: Array, src: Array, dst: Array, offset_dst: int) -> Array:
  """Output slots of the tokens of a set merged by `_match`: its unmerged tokens take slots
  0, 1, ... in order, its sources the slot `offset_dst + dst` of their destination."""
  batch = jnp.arange(unm.shape[0])[:, None]
  slot = jnp.zeros((unm.shape[0], unm.shape[1] + src.shape[1]), jnp.int32)
  slot = slot.at[batch, unm].set(jnp.arange(unm.shape[1], dtype=jnp.int32))
  return slot.at[batch, src].set(offset_dst + dst.astype(jnp.int32))


def _fuse(x: Array, size: Array, weight: Array, slot: Array, num_out: int,
          num_protected: int) -> tuple[Array, Array]:
  """Tokens after the protected ones summed into `num_out` slots, weighted by `weight`:
  `x_o = Σ_{slot(i)=o} w_i x_i / Σ w_i`, `s_o = Σ s_i`."""
  p = num_protected
  segsum = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_out))
  weight = weight[:, p:].astype(x.dtype)
  total = segsum(weight, slot)
  merged = segsum(x[:, p:] * weight[..., None], slot) / total[..., None]
  return (jnp.concatenate([x[:, :p], merged], axis=1),
          jnp.concatenate([size[:, :p], segsum(size[:, p:], slot)], axis=1))


def _cosine(metric: Array) -> tuple[Array, int, int]:
  """Cosine similarities between the even (A) and odd (B) tokens of `metric: [b, N, c]`."""
  metric = metric.astype(jnp.float32)
  squares = jnp.sum(metric * metric, axis=-1, keepdims=True)
  metric = metric / jnp.sqrt(jnp.where(squares > 0.0, squares, 1.0))  # a zero key: cosine 0
  a, b = metric[:, ::2], metric[:, 1::2]
  return jnp.einsum("bic,bjc->bij", a, b), a.shape[1], b.shape[1]


def tome(x: Array, size: Array, metric: Array, r: int, *,
         num_protected: int = 0) -> tuple[Array, Array]:
  """ToMe's bipartite soft matching: `x: [b, n, c]`, sizes `[b, n]`, the matching `metric:
  [b, n, d]` (keys averaged over heads). Merges `min(r, N // 2)` of the N tokens after the
  first `num_protected` by size-weighted average; returns `(x, size)`."""
  p = num_protected
  r = min(r, (x.shape[1] - p) // 2)
  if r <= 0:
    return x, size
  scores, ta, tb = _cosine(jax.lax.stop_gradient(metric[:, p:]))
  unm, src, dst = _match(scores, r)
  slot_b = jnp.broadcast_to(jnp.arange(ta - r, ta - r + tb, dtype=jnp.int32), (x.shape[0], tb))
  slot = _interleave(_slots(unm, src, dst, ta - r), slot_b)
  return _fuse(x, size, size, slot, ta - r + tb, p)


def multi_scale_fuse(x: Array, scales: tuple[int, ...], *, num_protected: int = 0) -> Array:
  """MSTM's multi-scale fusion of the tokens after the first `num_protected` of `x: [b, n, c]`
  (a square grid, raster order): `mean_{s ∈ scales} U_s P_s x`, `P_s` the s×s average pooling
  and `U_s` its nearest upsampling (s = 1: x)."""
  p = num_protected
  b, n, c = x[:, p:].shape
  side = math.isqrt(n)
  if side * side != n or any(side % s for s in scales):
    raise ValueError(f"token_reduction 'mstm' pools a square grid of patch tokens by scales "
                     f"{scales}: got {n} patch tokens (the grid side must be divisible by "
                     f"each scale)")
  grid = x[:, p:].reshape(b, side, side, c)
  fused = []
  for s in scales:
    pooled = grid.reshape(b, side // s, s, side // s, s, c).mean(axis=(2, 4))
    fused.append(jnp.repeat(jnp.repeat(pooled, s, axis=1), s, axis=2))
  return jnp.concatenate([x[:, :p], (sum(fused) / len(scales)).reshape(b, n, c)], axis=1)


def merge_into_crucial(x: Array, size: Array, importance: Array, metric: Array,
                       keep_rate: float, *, num_protected: int = 0) -> tuple[Array, Array]:
  """MSTM's mergence: of the tokens after the first `num_protected` of `x: [b, n, c]`, the
  ⌈keep_rate·N⌉ of largest `importance: [b, n]` stay (decreasing importance) and each other
  one is merged into the kept token of most cosine-similar `metric: [b, n, d]`, by the
  size-weighted average; sizes add. Returns `(x, size)`."""
  p = num_protected
  n = x.shape[1] - p
  keep = math.ceil(keep_rate * n)
  if keep >= n:
    return x, size
  order = _top(jax.lax.stop_gradient(importance[:, p:]), n)
  crucial, rest = order[:, :keep], order[:, keep:]
  metric = jax.lax.stop_gradient(metric[:, p:]).astype(jnp.float32)
  metric = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
  destination = jnp.argmax(jnp.einsum("brd,bkd->brk", _gather(metric, rest),
                                      _gather(metric, crucial)), axis=-1)
  batch = jnp.arange(x.shape[0])[:, None]
  slot = jnp.zeros((x.shape[0], n), jnp.int32)
  slot = slot.at[batch, crucial].set(jnp.arange(keep, dtype=jnp.int32))
  slot = slot.at[batch, rest].set(destination.astype(jnp.int32))
  return _fuse(x, size, size, slot, keep, p)


def _interleave(even: Array, odd: Array) -> Array:
  """`[e0, o0, e1, o1, ...]` along axis 1 (`even` one longer than `odd` or as long)."""
  batch, ta = even.shape
  out = jnp.zeros((batch, ta + odd.shape[1]), even.dtype)
  return out.at[:, ::2].set(even).at[:, 1::2].set(odd)


def _inverse_normalised(v: Array) -> Array:
  """`(1/v) / max(1/v)` over axis 1."""
  inv = 1 / v
  return inv / jnp.max(inv, axis=1, keepdims=True)


def mctf(x: Array, size: Array, attn: Array, r: int, *, tau_sim: float = 1.0,
         tau_info: float = 20.0, tau_size: float = 40.0, bidirectional: bool = True,
         num_protected: int = 0) -> tuple[Array, Array]:
  """MCTF's multi-criteria fusion of `x: [b, n, c]` (also the similarity metric) with sizes
  `[b, n]` and the attention each token receives `attn: [b, n]`. Merges `min(r, N // 2)` of the
  N tokens after the first `num_protected`: ⌊r/2⌋ from A into B, then ⌈r/2⌉ from B into the
  unmerged A (all r from A into B when not `bidirectional`); returns `(x, size)`."""
  p = num_protected
  r = min(r, (x.shape[1] - p) // 2)
  if r <= 0:
    return x, size
  # The matching and the fusion weights carry no gradient (as in MCTF).
  attn = jax.lax.stop_gradient(attn)
  scores, ta, tb = _cosine(jax.lax.stop_gradient(x[:, p:]))
  scores = jnp.maximum((scores + 1) / 2, 0)
  scores = scores ** (1 / tau_sim) if tau_sim else jnp.ones_like(scores)
  for tau, v in ((tau_info, attn), (tau_size, size)):
    if tau:
      w = _inverse_normalised(v[:, p:].astype(jnp.float32))
      scores = scores * (w[:, ::2, None] * w[:, None, 1::2]) ** (1 / tau)
  r1 = r // 2 if bidirectional else r
  # Stage 1, A into B: A's unmerged tokens take slots 0 .. ta-r1-1, B's the next tb.
  unm, src, dst = _match(scores, r1)
  slot_a = _slots(unm, src, dst, ta - r1)
  batch = x.shape[0]
  slot_b = jnp.broadcast_to(jnp.arange(ta - r1, ta - r1 + tb, dtype=jnp.int32), (batch, tb))
  num_out, r2 = ta - r1 + tb, r - r1
  if r2:
    # Stage 2, B into the unmerged A on the same scores: A's tokens keep their slots, B's
    # unmerged ones follow them; stage-1 slots are mapped to the final ones.
    unm2, src2, dst2 = _match(jnp.swapaxes(_gather(scores, unm), 1, 2), r2)
    slot_b = ta - r1 + _slots(unm2, src2, dst2 - (ta - r1), 0)
    final = jnp.concatenate([jnp.broadcast_to(jnp.arange(ta - r1, dtype=jnp.int32),
                                              (batch, ta - r1)), slot_b], axis=1)
    slot_a = _gather(final, slot_a)
    num_out -= r2
  return _fuse(x, size, attn * size, _interleave(slot_a, slot_b), num_out, p)


def _top(score: Array, keep: int) -> Array:
  """The indices of the `keep` largest entries of each row of `score: [b, n]`, largest first
  (ties: the lower index first)."""
  return jax.lax.top_k(score, keep)[1]


def dependency_scores(query: Array, key: Array, *, scale: float | None = None,
                      message: Array | None = None) -> Array:
  """DependencyViT's dependency score `d_i = Σ_j m_j softmax_i(q_j·k_i·scale)` of each token
  (the message it receives as a parent), averaged over heads: `[batch, n]`; `message`
  `[batch, n, heads]` (None: 1)."""
  probs = jax.nn.softmax(_logits(query, key, scale, None), axis=-1)  # [b, h, child, parent]
  if message is not None:
    probs = probs * jnp.swapaxes(message.astype(jnp.float32), 1, 2)[..., None]
  return jnp.mean(jnp.sum(probs, axis=2), axis=1)


def prune(x: Array, size: Array, score: Array, keep_rate: float, *,
          num_protected: int = 0) -> tuple[Array, Array]:
  """The first `num_protected` tokens of `x: [b, n, c]` and, of the others, the
  ⌈keep_rate·N⌉ of largest `score: [b, n]`, in their order; returns `(x, size)`."""
  p = num_protected
  n = x.shape[1] - p
  keep = math.ceil(keep_rate * n)
  if keep >= n:
    return x, size
  idx = jnp.sort(_top(jax.lax.stop_gradient(score[:, p:]), keep), axis=-1)
  return (jnp.concatenate([x[:, :p], _gather(x[:, p:], idx)], axis=1),
          jnp.concatenate([size[:, :p], _gather(size[:, p:], idx)], axis=1))


def select_and_pack(x: Array, size: Array, gate: Array, keep_rate: float, *,
                    num_protected: int = 0) -> tuple[Array, Array]:
  """SPA's selection: of the tokens after the first `num_protected` of `x: [b, n, c]`, the
  ⌈keep_rate·N⌉ of largest `gate: [b, n]` (in (0, 1)), packed in decreasing gate order and
  scaled by their gate `g_j x_j`; returns `(x, size)`."""
  p = num_protected
  idx = _top(jax.lax.stop_gradient(gate[:, p:]), math.ceil(keep_rate * (x.shape[1] - p)))
  kept = _gather(x[:, p:], idx) * _gather(gate[:, p:], idx)[..., None].astype(x.dtype)
  return (jnp.concatenate([x[:, :p], kept], axis=1),
          jnp.concatenate([size[:, :p], _gather(size[:, p:], idx)], axis=1))


def pack(x: Array, size: Array, gate: Array, threshold: float, *,
         num_protected: int = 0) -> tuple[Array, Array]:
  """SPA's packing of a variable number of tokens: of the tokens after the first
  `num_protected` of `x: [b, n, c]`, those of size > 0 with `gate: [b, n]` above `threshold`
  come first, in decreasing gate order, scaled by their gate `g_j x_j`; the others follow as
  padding, zeros of size 0. Returns `(x, size)` of the same shapes."""
  p = num_protected
  body_gate = gate[:, p:]
  kept = (size[:, p:] > 0) & (jax.lax.stop_gradient(body_gate) > threshold)
  order = _top(jnp.where(kept, jax.lax.stop_gradient(body_gate), -1.0), x.shape[1] - p)
  kept = _gather(kept, order)
  weight = jnp.where(kept, _gather(body_gate, order), 0.0).astype(x.dtype)
  return (jnp.concatenate([x[:, :p], _gather(x[:, p:], order) * weight[..., None]], axis=1),
          jnp.concatenate([size[:, :p], jnp.where(kept, _gather(size[:, p:], order), 0)], 1))


def selection_labels(score: Array, valid: Array, keep_rate: float) -> Array:
  """SPA's selection labels: 1 for the ⌈keep_rate·n⌉ of the n valid entries of each row of
  `score: [b, n]` (`valid` boolean) with the largest score (ties: the lower index), else 0."""
  rank = jnp.argsort(_top(jnp.where(valid, score, -jnp.inf), score.shape[1]), axis=-1)
  budget = jnp.ceil(keep_rate * jnp.sum(valid, axis=1, keepdims=True))
  return (valid & (rank < budget)).astype(jnp.float32)


def selection_loss(gate: Array, labels: Array, valid: Array) -> Array:
  """The binary cross-entropy of the gates `[b, n]` against the selection labels, averaged over
  the valid entries: `-mean(y log g + (1 - y) log(1 - g))`."""
  gate = jnp.clip(gate.astype(jnp.float32), 1e-7, 1 - 1e-7)
  bce = -(labels * jnp.log(gate) + (1 - labels) * jnp.log1p(-gate))
  return jnp.sum(jnp.where(valid, bce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def received_by_valid(query: Array, key: Array, valid: Array, *,
                      scale: float | None = None) -> Array:
  """The softmax attention each token receives from the `valid` queries over the valid keys
  (`valid: [b, n]` boolean), averaged over heads and those queries: `[b, n]`."""
  probs = jax.nn.softmax(jnp.where(valid[:, None, None, :], _logits(query, key, scale, None),
                                   -jnp.inf), axis=-1)
  weights = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid, 1, keepdims=True), 1)
  return jnp.einsum("bhqk,bq->bk", probs, weights) / probs.shape[1]


def max_pool_tokens(x: Array, size: Array, kernel_size: int, stride: int, *,
                    num_protected: int = 0) -> tuple[Array, Array]:
  """HVT's pooling: the tokens after the first `num_protected` of `x: [b, n, c]` max-pooled
  along the sequence per channel, windows of `kernel_size` every `stride`, no padding; sizes:
  the mean size of each window times `stride`. Returns `(x, size)`."""
  p = num_protected
  n = x.shape[1] - p
  if n < kernel_size:
    raise ValueError(f"token_reduction 'hvt' pools windows of kernel_size={kernel_size} "
                     f"tokens: got {n} patch tokens")
  window = dict(window_shape=(kernel_size,), strides=(stride,), padding="VALID")
  pooled = nn.max_pool(x[:, p:], **window)
  pooled_size = nn.avg_pool(size[:, p:, None], **window)[..., 0] * stride
  return (jnp.concatenate([x[:, :p], pooled], axis=1),
          jnp.concatenate([size[:, :p], pooled_size.astype(size.dtype)], axis=1))


def grid_pool(num_in: int, num_out: int) -> np.ndarray:
  """The `[num_out, num_in]` adaptive average pooling of a square grid of `num_in` tokens
  (raster order) into a square grid of `num_out`: output (r, c) of the o×o grid averages the
  rows ⌊r·s/o⌋ .. ⌈(r+1)·s/o⌉ - 1 and the same columns of the s×s grid."""
  side, out = math.isqrt(num_in), math.isqrt(num_out)
  if side * side != num_in or out * out != num_out or out > side:
    raise ValueError(f"token_reduction pools a square grid of patch tokens into "
                     f"num_tokens={num_out} (a square at most the grid): got {num_in} tokens")
  pool = np.zeros((out, out, side, side))
  for r in range(out):
    rows = slice(r * side // out, -(-(r + 1) * side // out))
    for c in range(out):
      pool[r, c, rows, c * side // out:-(-(c + 1) * side // out)] = 1
  pool = pool.reshape(num_out, num_in)
  return pool / pool.sum(1, keepdims=True)


def _pooled(x: Array, size: Array, num_tokens: int) -> tuple[Array, Array, Array]:
  """`(P x, P, sizes summed over the bins)` for the pooling `P = grid_pool` of `x: [b, n, c]`."""
  pool = grid_pool(x.shape[1], num_tokens)
  return (jnp.einsum("mn,bnc->bmc", pool.astype(x.dtype), x), pool,
          jnp.einsum("mn,bn->bm", (pool > 0).astype(size.dtype), size))


class SemanticTokens(nn.Module):
  """STViT's semantic tokens: `num_tokens` tokens pooled from the square grid `x: [b, n, c]`
  (`grid_pool`) attend, after one LayerNorm, with learned softmax multi-head attention to
  themselves and the tokens: `(S₀ + MHA(LN(S₀), LN([S₀; x])), sizes summed over the bins)`."""
  num_tokens: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: Array) -> tuple[Array, Array]:
    pooled, _, pooled_size = _pooled(x, size, self.num_tokens)
    norm = layer_norm(self.dtype, self.param_dtype, "LayerNorm")
    out = pooled + Attention(num_heads=self.num_heads, use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.xavier_uniform(),
                             name="MultiHeadAttention")(
                                 norm(pooled), norm(jnp.concatenate([pooled, x], axis=1)))
    return out, pooled_size


def compress(x: Array, size: Array, num_tokens: int, *,
             num_protected: int = 0) -> tuple[Array, Array]:
  """LookupViT's compressed tokens: `[protected, Z₀ = P x, x]` for the tokens `x` after the
  first `num_protected` (a square grid, `grid_pool`), and their sizes."""
  p = num_protected
  pooled, _, pooled_size = _pooled(x[:, p:], size[:, p:], num_tokens)
  return (jnp.concatenate([x[:, :p], pooled, x[:, p:]], axis=1),
          jnp.concatenate([size[:, :p], pooled_size, size[:, p:]], axis=1))


class LookupExchange(nn.Module):
  """LookupViT's bidirectional cross-attention between the compressed tokens `z: [b, m, c]`
  and the lookup tokens `x: [b, n, c]`, one similarity per head shared by both directions:

    L = (LN(z) W_q)(LN(x) W_k)ᵀ / √d                                      [b, h, m, n]
    gather:    z ← z + Σ_h softmax_n(L) (LN(x) W_v) W_o
    propagate: x ← x + Σ_h softmax_m(L)ᵀ (LN'(z) W'_v) W'_o,  x ← x + MLP(LN''(x))

  (projections with biases, the MLP's hidden width `mlp_dim`). Call `gather` before the
  block's attention and `propagate` after its MLP.
  """
  features: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, h = self.features, self.num_heads
    if c % h:
      raise ValueError(f"lookupvit: the width ({c}) must be divisible by num_heads ({h})")
    d = c // h
    dense = lambda shape, axes, contract=1: Projection(  # pylint: disable=g-long-lambda
        shape, axes, contract=contract, use_bias=True, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
    into, out = ((c, h, d), ("embed", "heads", "head_dim")), ((h, d, c),
                                                             ("heads", "head_dim", "embed"))
    self.norm_compressed = layer_norm(self.dtype, self.param_dtype)
    self.norm_lookup = layer_norm(self.dtype, self.param_dtype)
    self.query, self.key, self.value = dense(*into), dense(*into), dense(*into)
    self.out = dense(*out, contract=2)
    self.norm_back = layer_norm(self.dtype, self.param_dtype)
    self.value_back, self.out_back = dense(*into), dense(*out, contract=2)
    self.norm_mlp = layer_norm(self.dtype, self.param_dtype)
    self.mlp = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                        approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                        param_dtype=self.param_dtype)

  def gather(self, z: Array, x: Array) -> tuple[Array, Array]:
    """`(z + Σ_h softmax_n(L) V_x W_o, L)`; L float32 `[b, h, m, n]`."""
    lookup = self.norm_lookup(x)
    query, key = self.query(self.norm_compressed(z)), self.key(lookup)
    logits = jnp.einsum("bmhd,bnhd->bhmn", query.astype(jnp.float32),
                        key.astype(jnp.float32)) / math.sqrt(query.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1).astype(z.dtype)
    return z + self.out(jnp.einsum("bhmn,bnhd->bmhd", probs, self.value(lookup))), logits

  def propagate(self, x: Array, z: Array, logits: Array, deterministic: bool = True) -> Array:
    """`x + Σ_h softmax_m(L)ᵀ V'_z W'_o`, then its MLP residual."""
    probs = jax.nn.softmax(logits, axis=-2).astype(x.dtype)
    x = x + self.out_back(jnp.einsum("bhmn,bmhd->bnhd", probs,
                                     self.value_back(self.norm_back(z))))
    return x + self.mlp(self.norm_mlp(x), deterministic)


class TokenSlimming(nn.Module):
  """SiT's token slimming module: `x: [b, n, c]` into `num_out` tokens `A x` with
  `A = softmax_n(MLP(LN(x))ᵀ / tau)` (MLP C -> max(C/2, 1) exact GELU -> num_out, biases);
  sizes `A s`."""
  num_out: int
  tau: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: Array) -> tuple[Array, Array]:
    c = x.shape[-1]
    hidden = max(c // 2, 1)
    dense = lambda shape, axes, name: Projection(  # pylint: disable=g-long-lambda
        shape, axes, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = layer_norm(self.dtype, self.param_dtype, "LayerNorm")(x)
    h = nn.gelu(dense((c, hidden), ("embed", "mlp"), "hidden")(h), approximate=False)
    logits = dense((hidden, self.num_out), ("mlp", None), "weights")(h)
    attn = jax.nn.softmax(jnp.swapaxes(logits, 1, 2).astype(jnp.float32) / self.tau, axis=-1)
    return (jnp.einsum("bmn,bnc->bmc", attn.astype(x.dtype), x),
            jnp.einsum("bmn,bn->bm", attn, size.astype(jnp.float32)))


class TokenGate(nn.Module):
  """SPA's gating layer: `g_j = sigmoid(w·LN(x_j) + b)`, `[b, n]` float32, and its selection
  labels (`selection_labels` of `score` among the `valid` tokens at `keep_rate`, no gradient):
  returns `(gate, labels)`."""
  keep_rate: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, score: Array, valid: Array) -> tuple[Array, Array]:
    h = layer_norm(self.dtype, self.param_dtype, "LayerNorm")(x)
    logits = Projection((x.shape[-1],), ("embed",), use_bias=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="gate")(h)
    labels = selection_labels(jax.lax.stop_gradient(score), valid, self.keep_rate)
    return jax.nn.sigmoid(logits.astype(jnp.float32)), labels


# --------------------------------------------------------------------------------- In a block
@contextlib.contextmanager
def observe_attention(op: str, spec: TokenReduction | None,
                      size: Array | None) -> Iterator[dict[str, Any]]:
  """Within the context, the first `Attention.attend` call records its `query`, `key` and
  `scale` in the yielded dict and, with proportional attention for `op`, gets `log size` added
  to its `bias`. Does nothing without `spec`."""
  seen: dict[str, Any] = {}
  if spec is None:
    yield seen
    return

  def interceptor(next_fun, args, kwargs, context):
    if seen or not isinstance(context.module, Attention) or context.method_name != "attend":
      return next_fun(*args, **kwargs)
    query, key = args[:2]
    op_args = dict(kwargs.get("op_args") or {})
    seen.update(query=query, key=key, scale=op_args.get("scale"),
                message=op_args.get("message"))
    if spec.bias_for(op):
      log_size = jnp.log(size).astype(query.dtype)[:, None, None, :]
      op_args["bias"] = log_size + op_args["bias"] if "bias" in op_args else log_size
      kwargs = dict(kwargs, op_args=op_args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield seen


def reduce_tokens(spec: TokenReduction, x: Array, size: Array, seen: Mapping[str, Any], *,
                  num_protected: int, lookahead: Mapping[str, Any] | None = None,
                  dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """`spec`'s method on a block's tokens `x: [b, n, c]` (after the attention's residual) and
  sizes, from the queries and keys `observe_attention` recorded; returns `(x, size)`. For MCTF,
  `lookahead` (the next block's queries and keys of these tokens, recorded the same way) gives
  the one-step-ahead attention. Called inside a compact method, it creates the learned
  methods' module `token_reduction` there."""
  query, key, scale = seen["query"], seen["key"], seen["scale"]
  prop = size if spec.prop_attn else None
  p = num_protected
  learned = dict(dtype=dtype, param_dtype=param_dtype, name="token_reduction")
  if spec.method == "spa":
    valid = size > 0  # False for SPA's padding
    score = (class_attention(query, key, scale=scale, size=valid.astype(jnp.float32))
             if spec.class_token else received_by_valid(query, key, valid, scale=scale))
    gate, _ = TokenGate(spec.keep_rate, **learned)(x[:, p:], score[:, p:], valid[:, p:])
    gate = jnp.concatenate([jnp.ones_like(size[:, :p]), gate], axis=1)
    if spec.threshold is None:
      return select_and_pack(x, size, gate, spec.keep_rate, num_protected=p)
    return pack(x, size, gate, spec.threshold, num_protected=p)
  if spec.method == "dependencyvit":
    score = dependency_scores(query, key, scale=scale, message=seen["message"])
    return prune(x, size, score, spec.keep_rate, num_protected=p)
  if spec.method in ("sit", "stvit"):  # the patch tokens replaced by new ones
    module = (TokenSlimming(math.ceil(spec.keep_rate * (x.shape[1] - p)), spec.tau, **learned)
              if spec.method == "sit" else
              SemanticTokens(spec.num_tokens, query.shape[2], **learned))
    body, body_size = module(x[:, p:], size[:, p:])
    return (jnp.concatenate([x[:, :p], body], axis=1),
            jnp.concatenate([size[:, :p], body_size.astype(size.dtype)], axis=1))
  if spec.method == "evit":  # the fused token's weights carry gradients, as in EViT
    attn = class_attention(query, key, scale=scale)
    return evit(x, size, attn, spec.keep_rate, num_protected=num_protected,
                fuse_token=spec.fuse_token)
  if spec.method == "tome":
    return tome(x, size, jnp.mean(key, axis=2), spec.r, num_protected=num_protected)
  if spec.method == "mstm":
    return merge_into_crucial(x, size, class_attention(query, key, scale=scale),
                              jnp.mean(key, axis=2), spec.keep_rate, num_protected=p)
  if lookahead is not None:
    query, key, scale = lookahead["query"], lookahead["key"], lookahead["scale"]
  attn = received_attention(query, key, scale=scale, size=prop)
  return mctf(x, size, attn, spec.r, tau_sim=spec.tau_sim, tau_info=spec.tau_info,
              tau_size=spec.tau_size, bidirectional=spec.bidirectional,
              num_protected=num_protected)
