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
  sizes add. The matching and the fusion weights carry no gradient.

Tokens before the patches (class, distillation and register tokens: `num_protected`) are never
reduced and stay first. ToMe and MCTF merge `min(r, N // 2)` of the N other tokens per layer.

Op-agnostic: the reduction reads the block's projected queries and keys by intercepting
`Attention.attend` (`flax.linen.intercept_methods`, as `big_attn.interpret.capture` does), and
computes the attention maps it needs (EViT's class-token row, MCTF's received attention) with
plain softmax `softmax(q·kᵀ·scale + log s)` over the current tokens, whatever the op.
Proportional attention (ToMe, MCTF: `log s_j` added to the logits so a merged token counts for
its size) is passed to the op as its `bias` where the op takes one (`ops.spec(op).bias`:
softmax, sigmoid, clipped_softmax, gated_attention, mixture_of_heads, sage_int8) and skipped for
other ops.

Not implemented: MCTF's one-step-ahead attention (the next layer's attention; here the current
layer's, the paper's ablation without it) and its token-reduction consistency loss (training).
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

from big_attn import ops
from big_attn.layers import settings as settings_lib
from big_attn.layers.attention import Attention
from big_attn.ops import checks
from big_attn.ops import spatial

Array = jax.Array

METHODS = ("evit", "tome", "mctf")
# The papers' settings: EViT keeps 70% at the 4th, 7th and 10th of 12 layers (DeiT-S); ToMe's
# r = 16 on every layer (its timm patch); MCTF r = 16, τ_sim 1, τ_info 20, τ_size 40,
# bidirectional (DeiT-S). `layers=None`: EViT's layers scaled to the depth, every layer for
# ToMe and MCTF.
DEFAULTS = {
    "evit": dict(keep_rate=0.7, layers=None, fuse_token=True),
    "tome": dict(r=16, layers=None, prop_attn=True),
    "mctf": dict(r=16, layers=None, prop_attn=True, tau_sim=1.0, tau_info=20.0, tau_size=40.0,
                 bidirectional=True),
}
_EVIT_LAYERS_OF_12 = (3, 6, 9)


@dataclasses.dataclass(frozen=True)
class TokenReduction:
  """A checked `token_reduction` config (`resolve`): the method and its settings."""
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
  if method == "evit" and not has_class_token:
    raise ValueError("token_reduction method 'evit' ranks the patches by the class token's "
                     "attention: the model needs a class token (ViT pool_type 'cls' or 'tok')")
  name = lambda key: f"token_reduction[{key!r}]"  # pylint: disable=unnecessary-lambda-assignment
  layers = settings.pop("layers")
  if layers is None:
    layers = (sorted({min(depth - 1, round(i * depth / 12)) for i in _EVIT_LAYERS_OF_12})
              if method == "evit" else range(depth))
  if isinstance(layers, int) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in layers):
    raise ValueError(f"{name('layers')} must be a sequence of block indices, got {layers!r}")
  layers = tuple(sorted(set(layers)))
  if layers and not 0 <= layers[0] <= layers[-1] < depth:
    raise ValueError(f"{name('layers')} must hold block indices in [0, {depth}), got {layers}")
  out = {}
  for key, value in settings.items():
    if key == "keep_rate":
      out[key] = checks.unit_interval(name(key), value)
    elif key == "r":
      out[key] = checks.int_in_range(name(key), value, 0)
    elif key.startswith("tau_"):
      out[key] = checks.non_negative_float(name(key), value)
    else:
      out[key] = _bool(name(key), value)
  return TokenReduction(method=method, layers=layers, **out)


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
    seen.update(query=query, key=key, scale=op_args.get("scale"))
    if spec.bias_for(op):
      log_size = jnp.log(size).astype(query.dtype)[:, None, None, :]
      op_args["bias"] = log_size + op_args["bias"] if "bias" in op_args else log_size
      kwargs = dict(kwargs, op_args=op_args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield seen


def reduce_tokens(spec: TokenReduction, x: Array, size: Array, seen: Mapping[str, Any], *,
                  num_protected: int) -> tuple[Array, Array]:
  """`spec`'s method on a block's tokens `x: [b, n, c]` (after the attention's residual) and
  sizes, from the queries and keys `observe_attention` recorded; returns `(x, size)`."""
  query, key, scale = seen["query"], seen["key"], seen["scale"]
  prop = size if spec.prop_attn else None
  if spec.method == "evit":  # the fused token's weights carry gradients, as in EViT
    attn = class_attention(query, key, scale=scale)
    return evit(x, size, attn, spec.keep_rate, num_protected=num_protected,
                fuse_token=spec.fuse_token)
  if spec.method == "tome":
    return tome(x, size, jnp.mean(key, axis=2), spec.r, num_protected=num_protected)
  attn = received_attention(query, key, scale=scale, size=prop)
  return mctf(x, size, attn, spec.r, tau_sim=spec.tau_sim, tau_info=spec.tau_info,
              tau_size=spec.tau_size, bidirectional=spec.bidirectional,
              num_protected=num_protected)
