"""What an image model hands a 2-D op: the token grid, extra tokens, per-stage sizes; refusals.

Ops on a row-major `grid=(h, w)` image of tokens are registered with `grid=True`
(`ops.spec(name).grid`); those without a 1-D form are `GRID_ONLY_OPS`. Image models pass `grid` to those ops (`op_args`
below) and refuse up front what they cannot run (`check_op`).

Extra tokens. ViTs put class, distillation or register tokens before the patches
(`extra_tokens=n`: the first n tokens). A 2-D op then runs on the patch tokens only, and the
extra tokens are global tokens with plain softmax (`attend`):
- an extra token's query attends to every token: softmax(s·q kᵀ) over all keys;
- a patch query i gets the 2-D op's output o_i over the patches, merged with its softmax
  attention to the extra keys as one softmax in which o_i stands for the n_p patch keys at
  logit 0: out_i = (n_p·o_i + Σ_e exp(s·q_i·k_e) v_e) / (n_p + Σ_e exp(s·q_i·k_e)). With
  zero logits this is exactly softmax attention over all n_p + n tokens.

Per-stage sizes. A window, partition, neighbourhood kernel or routing region larger than a
stage's map is clipped to it (`stage_sizes`): window and partition sizes and region counts to
the largest divisor of the map side not above them, a neighbourhood kernel to the largest odd
size the side holds (its dilation so that kernel·dilation fits), a routing top-k to the
regions, quadtree levels to the power-of-two factors of the map. Where the op arguments give no
size, the papers' (`PAPER_SIZES`: Swin's 7x7 windows, MaxViT's 7x7 grid, NAT's 7x7 kernel,
BiFormer's 7x7 regions) is used.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops.registry import get, has_causal_form, spec
from big_attn.ops.softmax import dot_product_attention

# The ops registered with `grid=True` (they take a `grid=(h, w)` image of tokens) that have no
# 1-D form: they need the grid.
GRID_ONLY_OPS = frozenset({"bilevel_routing", "decomposed_relpos", "gpsa", "grid", "levit_bias",
                           "quadtree", "spatial_reduction", "window"})
GRID_ONLY_OPS |= {"deformable_attention", "outlook_attention", "serialized_patch_attention"}
# Ops whose grid is that of the keys and values (any query length); the other grid ops need
# queries and keys on one grid.
KV_GRID_OPS = frozenset({"spatial_reduction"})
# Grid ops that take the keys' own grid as `kv_grid=(h', w')` beside the queries' `grid`.
TWO_GRID_OPS = frozenset({"decomposed_relpos"})
# Non-2-D ops that attend within one sequence (q_len == kv_len).
SELF_ATTENTION_OPS = frozenset({"channel_attention", "combiner", "kernelized_rpe", "switchhead",
                                "gin_attention", "reversed_attention", "single_head_attention"})
# Ops that need values as wide as the queries and keys, each with the reason its math needs it.
EQUAL_WIDTH_OPS = {
    "bottleneck": "its value tokens become the keys of its later stages",
    "channel_attention": "its query x key channel map mixes the value channels",
    "hyena": "it gates the values channel by channel with the queries and keys",
    "single_head_attention": "it passes query channels through beside the attended value "
                             "channels",
}
# The papers' stage-dependent sizes, used where the op arguments give none.
PAPER_SIZES = {("window", "window_size"): 7, ("grid", "grid_size"): 7,
               ("neighborhood", "kernel_size"): 7, ("bilevel_routing", "num_regions"): 7}


class OpRefused(ValueError):
  """A model refuses an op that is not meaningful in it (raised before any tracing)."""


def takes_grid(op: str) -> bool:
  """Whether op `op` works on a `grid=(h, w)` image of tokens (with or without a 1-D form)."""
  return spec(op).grid


def needs_grid(op: str) -> bool:
  """Whether op `op` only works on a `grid=(h, w)` image of tokens."""
  return takes_grid(op) and op in GRID_ONLY_OPS


def check_op(op: str, model: str, *, causal: bool = False, grid: bool = True,
             same_grid: bool = True, kv_grid: bool = False, wide_values: bool = False) -> None:
  """Raises `OpRefused` naming `op` and `model` when the op is not meaningful there: a model
  without a token grid (`grid=False`) and an op that needs one, a causal model and an op
  without a causal form, keys on another grid than the queries (`same_grid=False`) and a
  2-D op that needs them on one grid (unless the model passes the keys' grid, `kv_grid=True`,
  and the op takes it: `TWO_GRID_OPS`) or an op of `SELF_ATTENTION_OPS`, or values wider than
  the queries and keys (`wide_values=True`) and an op of `EQUAL_WIDTH_OPS`."""
  get(op)
  if not grid and needs_grid(op):
    raise OpRefused(f"{model}: attention op {op!r} works on a 2-D grid of image tokens; the "
                    f"{model} has a 1-D token sequence")
  if causal and not has_causal_form(op):
    raise OpRefused(f"{model}: attention op {op!r} has no causal form; the {model} attends "
                    "causally")
  two_grids = KV_GRID_OPS | (TWO_GRID_OPS if kv_grid else frozenset())
  if not same_grid and takes_grid(op) and op not in two_grids:
    raise OpRefused(f"{model}: attention op {op!r} needs queries and keys on one token grid; "
                    f"the {model}'s keys are on a reduced grid")
  if not same_grid and op in SELF_ATTENTION_OPS:
    raise OpRefused(f"{model}: attention op {op!r} attends within one sequence (q_len == "
                    f"kv_len); the {model}'s keys are a reduced sequence")
  if wide_values and op in EQUAL_WIDTH_OPS:
    raise OpRefused(f"{model}: attention op {op!r} needs values as wide as its queries and keys "
                    f"({EQUAL_WIDTH_OPS[op]}); the {model}'s values are wider")


def _pair(name: str, value) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                               for v in pair):
    raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
  return pair


def stage_sizes(op: str, op_args: dict[str, Any], grid: tuple[int, int]) -> dict[str, Any]:
  """`op_args` with the sizes of op `op` clipped to the `grid=(h, w)` map (see the module
  docstring); the papers' sizes where none is given."""
  args = dict(op_args)
  circular = op == "neighborhood" and args.get("radius") is not None  # CLEAR: no kernel
  for (name, key), size in PAPER_SIZES.items():
    if name == op and args.get(key) is None and not circular:
      args[key] = size
  for key in ("window_size", "grid_size", "num_regions", "reduction"):
    if takes_grid(op) and args.get(key) is not None:
      args[key] = tuple(common.largest_divisor(g, s) for s, g in zip(_pair(key, args[key]), grid))
  if op == "neighborhood" and not circular:
    kernel = tuple(min(k, g - 1 + g % 2) for k, g in zip(_pair("kernel_size",
                                                               args["kernel_size"]), grid))
    dilation = _pair("dilation", args.get("dilation") or 1)
    args["kernel_size"] = kernel
    args["dilation"] = tuple(max(1, min(d, g // k)) for d, g, k in zip(dilation, grid, kernel))
  if op == "bilevel_routing" and args.get("topk") is not None:
    args["topk"] = min(args["topk"], math.prod(args["num_regions"]))
  if op == "quadtree" and args.get("levels") is not None:
    fits = min((g & -g).bit_length() for g in grid)  # 1 + the power-of-two factors of a side
    args["levels"] = max(1, min(args["levels"], fits))
  return args


def op_args(op: str, user_args: Any, grid: tuple[int, int], extra_tokens: int = 0
            ) -> dict[str, Any] | None:
  """The op arguments an image model builds: `user_args`, plus, for an op that takes a grid, the
  `grid` of the patch tokens, the number of `extra_tokens` before them (when any) and the sizes
  clipped to the map (`stage_sizes`). None when there is nothing to pass."""
  args = dict(user_args or {})
  if takes_grid(op):
    args = stage_sizes(op, dict(args, grid=tuple(grid)), tuple(grid))
    if extra_tokens:
      args["extra_tokens"] = extra_tokens
  return args or None


def attend(op_fn: Callable, query, key, value, *, mask=None, is_causal: bool = False,
           extra_tokens: int = 0, **op_args):
  """`op_fn(query, key, value, mask=..., is_causal=..., **op_args)`, with the first
  `extra_tokens` tokens of queries and keys as global softmax tokens around the op (the rule
  of the module docstring). `[batch, seq, heads, head_dim]` layout, GQA; `mask` broadcastable
  to `[batch, heads, q_len, kv_len]` over all tokens."""
  if not extra_tokens:
    return op_fn(query, key, value, mask=mask, is_causal=is_causal, **op_args)
  if not isinstance(extra_tokens, int) or isinstance(extra_tokens, bool) or extra_tokens < 0:
    raise ValueError(f"extra_tokens must be an int >= 0, got {extra_tokens!r}")
  if is_causal:
    raise ValueError("extra_tokens are global tokens of a non-causal image model; got "
                     "is_causal=True")
  dims = common.check_qkv(query, key, value)
  n = extra_tokens
  if n >= min(dims.q_len, dims.kv_len):
    raise ValueError(f"extra_tokens {n} leaves no patch tokens of q_len {dims.q_len} and "
                     f"kv_len {dims.kv_len}")
  if mask is not None:
    mask = jnp.broadcast_to(mask, (dims.batch, mask.shape[-3] if mask.ndim >= 3 else 1,
                                   dims.q_len, dims.kv_len))
  part = lambda rows, cols: None if mask is None else mask[:, :, rows, cols]  # pylint: disable=unnecessary-lambda-assignment
  scale = common.default_scale(dims.head_dim, op_args.get("scale"))
  patches = slice(n, None)
  out_patch = op_fn(query[:, patches], key[:, patches], value[:, patches],
                    mask=part(patches, patches), is_causal=False, **op_args)
  out_extra = dot_product_attention(query[:, :n], key, value, mask=part(slice(None, n),
                                                                         slice(None)),
                                    scale=scale)
  # Patch queries against the extra keys, merged with the op's output (one softmax entry of
  # logit log n_p).
  groups = dims.num_heads // dims.num_kv_heads
  k_extra = jnp.repeat(key[:, :n], groups, axis=2).astype(jnp.float32)
  v_extra = jnp.repeat(value[:, :n], groups, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query[:, patches].astype(jnp.float32), k_extra) * scale
  seen = part(patches, slice(None, n))
  if seen is not None:
    logits = jnp.where(seen, logits, -jnp.inf)
  log_np = jnp.log(jnp.float32(dims.kv_len - n))
  top = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), log_np))
  weights = jnp.exp(logits - top)                                       # [b, h, q, n]
  op_weight = jnp.exp(log_np - top)                                     # [b, h, q, 1]
  merged = (op_weight.transpose(0, 2, 1, 3) * out_patch.astype(jnp.float32)
            + jnp.einsum("bhqk,bkhd->bqhd", weights, v_extra))
  merged = merged / (op_weight + jnp.sum(weights, axis=-1, keepdims=True)).transpose(0, 2, 1, 3)
  return jnp.concatenate([out_extra, merged.astype(out_patch.dtype)], axis=1)


__all__ = ["EQUAL_WIDTH_OPS", "GRID_ONLY_OPS", "KV_GRID_OPS", "OpRefused", "PAPER_SIZES",
           "SELF_ATTENTION_OPS", "TWO_GRID_OPS", "attend", "check_op", "needs_grid", "op_args", "stage_sizes",
           "takes_grid"]
