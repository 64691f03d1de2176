"""Attention reuse: across the sampling steps of a diffusion Transformer (`big_attn.models.dit`)
and across the layers of a language model (`big_attn.models.lm`).

    images = dit.sample(model, params, labels, rng, num_steps=50, guidance_scale=2.0,
                        image_shape=(8, 8, 1), attention_reuse={"method": "pab"})

Methods (`METHODS`; the keys of each, with the papers' defaults, in `DEFAULTS`):

- "pab": Real-Time Video Generation with Pyramid Attention Broadcast (Zhao et al., 2024). At
  sampling step i (0 for the first, noisiest step) with timestep t inside the broadcast window
  lo < t·1000/T < hi (`timesteps`), a block's self-attention output is reused from the previous
  step unless i is a multiple of `self_range`, its cross-attention output unless i is a multiple
  of `cross_range`; outside the window every attention is computed. The defaults are the
  paper's Open-Sora setting for spatial and cross attention: window (450, 930), ranges 2 and 6
  (the pyramid: the more stable attention is broadcast over the longer range).
- "ditfastattn": DiTFastAttn: Attention Compression for Diffusion Transformer Models (Yuan et
  al., 2024). A plan gives each block's self-attention at each step one of `STRATEGIES`:
    "full":      O = Attn(Q, K, V);
    "wars":      window attention with residual caching, O = WinAttn(Q, K, V) + R, where
                 R = Attn − WinAttn was cached at the block's last "full" step (computed there
                 only when a "wars" step follows before the next "full" step); WinAttn lets
                 token i attend to the tokens j with |i − j| ≤ w, w = ⌈window_fraction·N⌉;
    "ast":       attention sharing across timesteps, O = the block's output of the previous step;
    "asc":       attention sharing across classifier-free guidance, "full" computed for the
                 conditional half of the batch only and used for the unconditional half too;
    "wars+asc":  both (the conditional half's window attention plus its cached residual).
  `plan` is one strategy name, applied to every block at every step except the steps i with
  i % full_every == 0 (only step 0 when `full_every` is None), which run "full", or a list of
  num_steps lists of depth names (the paper's
  per-step, per-layer plan, which it finds by a greedy search on calibration prompts; the
  search is not part of this module). No default plan: `plan` is required.

Across layers (`lm.Model(shared_attention_layers=...)`):

- EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models (Rahmati et al.,
  2024). A sharing layer l has no query or key projection: its attention is
  O_l = P_{l-1} (x W_v^l) W_o^l with the attention weights P_{l-1} = softmax(scale·Q Kᵀ + masks)
  of the layer before (`EchoAttention`); that layer computes its weights explicitly
  (`record_weights`, the softmax op's formula, `softmax_weights`) and a run of sharing layers
  reuses the weights of the last layer that computed them. The paper's knowledge-distillation
  fine-tuning from the unshared teacher is a training recipe, not part of the layer.

Reuse across steps is per `Attention.attend` call: the op's output (before the output
projection, a fixed affine map, so reusing it equals reusing the layer's output) is cached per
block in the sampler's `lax.scan` carry; a step's strategy is picked by `lax.switch`, so skipped
attention is not computed. Window attention is the block's op with a band mask (any op of the
registry); on this CPU path it runs the op's dense masked form, while the attention FLOPs
counted (`flops`) are those of a windowed kernel, 4·B·H·d·(number of attended pairs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.layers import settings as settings_lib
from big_attn.layers.attention import Attention, Projection
from big_attn.ops import checks
from big_attn.ops import common

METHODS = ("pab", "ditfastattn")
DEFAULTS = {
    "pab": dict(self_range=2, cross_range=6, timesteps=(450, 930)),
    "ditfastattn": dict(plan=None, full_every=None, window_fraction=0.125),
}
STRATEGIES = ("full", "wars", "ast", "asc", "wars+asc")
KINDS = ("self", "cross")

# Strategy flags (combined by `|`): compute full attention, window attention plus the cached
# residual, reuse the previous output, compute on the conditional half only, and (derived from
# the plan) cache the residual Attn − WinAttn at a full step.
FULL, WINDOW, SHARE, CFG, RESIDUAL = 1, 2, 4, 8, 16
_FLAGS = {"full": FULL, "wars": WINDOW, "ast": SHARE, "asc": FULL | CFG,
          "wars+asc": WINDOW | CFG}


@dataclasses.dataclass(frozen=True)
class ReusePlan:
  """A checked `attention_reuse` config (`resolve`) for one sampling run: `plans[kind]` is a
  `[num_steps, depth]` int array of strategy flags for the self- and cross-attention of every
  block at every step (step 0 is the first, noisiest one)."""
  method: str
  plans: dict[str, np.ndarray]
  window_fraction: float = 0.125

  @property
  def uses_cfg(self) -> bool:
    return any(bool(np.any(p & CFG)) for p in self.plans.values())

  def branches(self, kind: str, layer: int) -> tuple[int, ...]:
    """The distinct strategies of one attention over the steps, in order of first use."""
    return tuple(dict.fromkeys(int(c) for c in self.plans[kind][:, layer]))

  def branch_index(self, kind: str, layer: int) -> np.ndarray:
    """`[num_steps]` int32: each step's position in `branches(kind, layer)`."""
    order = {c: i for i, c in enumerate(self.branches(kind, layer))}
    return np.asarray([order[int(c)] for c in self.plans[kind][:, layer]], np.int32)


def full_plan(num_steps: int, depth: int) -> ReusePlan:
  """Every attention computed at every step (no reuse)."""
  return ReusePlan("none", {kind: np.full((num_steps, depth), FULL, np.int32) for kind in KINDS})


def _with_residuals(plan: np.ndarray) -> np.ndarray:
  """Marks the full steps followed by a window step before the next full step with RESIDUAL."""
  plan = plan.copy()
  for layer in range(plan.shape[1]):
    pending = False
    for step in range(plan.shape[0] - 1, -1, -1):
      code = plan[step, layer]
      if code & FULL:
        if pending:
          plan[step, layer] = code | RESIDUAL
        pending = False
      elif code & WINDOW:
        pending = True
  return plan


def _pab(settings: dict[str, Any], timesteps: np.ndarray, num_timesteps: int,
         depth: int) -> dict[str, np.ndarray]:
  lo, hi = settings["timesteps"]
  t = np.asarray(timesteps, np.float64) * 1000.0 / num_timesteps
  inside = (lo < t) & (t < hi)
  step = np.arange(len(timesteps))
  plans = {}
  for kind in KINDS:
    reuse = inside & (step % settings[f"{kind}_range"] != 0)
    plans[kind] = np.repeat(np.where(reuse, SHARE, FULL)[:, None], depth, axis=1).astype(np.int32)
  return plans


def _ditfastattn(settings: dict[str, Any], num_steps: int, depth: int) -> dict[str, np.ndarray]:
  plan = settings["plan"]
  if isinstance(plan, str):
    if plan not in STRATEGIES:
      raise ValueError(f"attention_reuse['plan'] must be one of {STRATEGIES} or a list of "
                       f"per-step lists of them, got {plan!r}")
    codes = np.full((num_steps, depth), _FLAGS[plan], np.int32)
    every = settings["full_every"] or num_steps
    codes[np.arange(num_steps) % every == 0] = FULL
  else:
    rows = [list(row) for row in plan] if isinstance(plan, (list, tuple)) else None
    if (rows is None or len(rows) != num_steps or any(len(r) != depth for r in rows)
        or any(s not in STRATEGIES for r in rows for s in r)):
      raise ValueError(f"attention_reuse['plan'] must be a strategy name or num_steps="
                       f"{num_steps} lists of depth={depth} names from {STRATEGIES}, got "
                       f"{plan!r}")
    codes = np.asarray([[_FLAGS[s] for s in r] for r in rows], np.int32)
  for layer in range(depth):
    full_seen = False
    for step in range(num_steps):
      code = codes[step, layer]
      if (code & SHARE and step == 0) or (code & WINDOW and not full_seen):
        raise ValueError(f"attention_reuse['plan']: block {layer} at step {step} reuses "
                         f"{'a residual' if code & WINDOW else 'an output'} that no earlier "
                         "step computed (the first step must compute, a 'wars' step needs an "
                         "earlier 'full' or 'asc' step)")
      full_seen |= bool(code & FULL)
  return {"self": _with_residuals(codes), "cross": np.full((num_steps, depth), FULL, np.int32)}


def resolve(config: Any, *, timesteps: np.ndarray, num_timesteps: int,
            depth: int) -> ReusePlan | None:
  """The `attention_reuse` config dict of a sampling run visiting `timesteps` (in visiting
  order) with a model of `depth` blocks, checked, with the defaults of `DEFAULTS`; None for
  None. Raises `TypeError` for a non-dict and `ValueError` naming the key for an unknown
  method, key or value."""
  parsed = settings_lib.method_settings("attention_reuse", config, DEFAULTS,
                                        "{'method': 'pab'}")
  if parsed is None:
    return None
  method, settings = parsed
  name = lambda key: f"attention_reuse[{key!r}]"  # pylint: disable=unnecessary-lambda-assignment
  num_steps = len(timesteps)
  if method == "pab":
    for kind in KINDS:
      checks.positive_int(name(f"{kind}_range"), settings[f"{kind}_range"])
    window = settings["timesteps"]
    if (not isinstance(window, (tuple, list)) or len(window) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
        or not window[0] < window[1]):
      raise ValueError(f"{name('timesteps')} must be a pair (lo, hi) with lo < hi on the "
                       f"1000-step scale, got {window!r}")
    return ReusePlan(method, _pab(settings, timesteps, num_timesteps, depth))
  if settings["plan"] is None:
    raise ValueError(f"{name('plan')} is required for method 'ditfastattn': a strategy from "
                     f"{STRATEGIES} or a per-step, per-block list of them")
  checks.positive_int(name("full_every"), settings["full_every"], optional=True)
  fraction = checks.unit_interval(name("window_fraction"), settings["window_fraction"])
  if fraction <= 0:
    raise ValueError(f"{name('window_fraction')} must be in (0, 1], got {fraction}")
  return ReusePlan(method, _ditfastattn(settings, num_steps, depth), window_fraction=fraction)


# ------------------------------------------------------------------------------- In a model call
_BLOCK = re.compile(r"block_(\d+)")


def locate(module: nn.Module) -> tuple[str, int] | None:
  """`(kind, block index)` of a DiT block's self- ("attn") or cross-attention ("cross_attn")
  module, from its path; None for any other module."""
  path = tuple(module.path)
  if len(path) < 2 or path[-1] not in ("attn", "cross_attn"):
    return None
  match = _BLOCK.fullmatch(path[-2])
  if match is None:
    return None
  return ("self" if path[-1] == "attn" else "cross"), int(match.group(1))


def window_mask(length: int, width: int) -> np.ndarray:
  """`[1, 1, length, length]` bool band: query i attends to keys j with |i − j| ≤ width."""
  pos = np.arange(length)
  return (np.abs(pos[:, None] - pos[None, :]) <= width)[None, None]


def window_width(plan: ReusePlan, length: int) -> int:
  return max(1, math.ceil(plan.window_fraction * length))


def _pairs(mask: np.ndarray | None, shape: tuple[int, int]) -> float:
  """Attended (query, key) pairs per batch row and head under a static band mask (or all)."""
  return float(np.sum(mask)) if mask is not None else float(shape[0] * shape[1])


@contextlib.contextmanager
def record_shapes() -> Iterator[dict[str, jax.ShapeDtypeStruct]]:
  """Within the context, every DiT attention's `attend` output shape, keyed "kind_layer"."""
  shapes: dict[str, jax.ShapeDtypeStruct] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    where = locate(context.module) if isinstance(context.module, Attention) else None
    if where is not None and context.method_name == "attend":
      shapes["%s_%d" % where] = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    yield shapes


def init_state(plan: ReusePlan, shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  """The sampler's carry: per attention that reuses anything, its cached output (and residual
  for window steps); per kind, the attention calls computed and their FLOPs."""
  cache = {}
  for key, shape in shapes.items():
    codes = plan.branches(*_where(key))
    if codes != (FULL,):
      zeros = jnp.zeros(shape.shape, shape.dtype)
      cache[key] = {"out": zeros, "res": zeros if any(c & WINDOW for c in codes) else None}
  stats = {kind: {"calls": jnp.zeros((), jnp.int32), "flops": jnp.zeros((), jnp.float32)}
           for kind in KINDS}
  return {"cache": cache, "stats": stats}


def _where(key: str) -> tuple[str, int]:
  kind, layer = key.rsplit("_", 1)
  return kind, int(layer)


def step_indices(plan: ReusePlan, state: dict[str, Any]) -> dict[str, jax.Array]:
  """Per cached attention of `state`, its `[num_steps]` branch indices (the `lax.scan` input
  of `apply_step`)."""
  return {key: jnp.asarray(plan.branch_index(*_where(key))) for key in state["cache"]}


@contextlib.contextmanager
def apply_step(plan: ReusePlan, index: dict[str, jax.Array], state: dict[str, Any]
               ) -> Iterator[dict[str, Any]]:
  """Within the context, the DiT attentions follow `plan` at the step whose branch indices
  (`ReusePlan.branch_index` at that step, keyed "kind_layer") are `index`, reading the carry
  `state` (`init_state`); yields the updated carry. The batch of a CFG-sharing step is the
  conditional half followed by the unconditional half (`dit.sample`'s layout)."""
  new = {"cache": dict(state["cache"]),
         "stats": {k: dict(v) for k, v in state["stats"].items()}}

  def interceptor(next_fun, args, kwargs, context):
    where = locate(context.module) if isinstance(context.module, Attention) else None
    if where is None or context.method_name != "attend":
      return next_fun(*args, **kwargs)
    key = "%s_%d" % where
    query, k, v = args[:3]
    mask = kwargs.get("mask")
    batch, length, heads, dim = query.shape
    band = None
    if any(c & (WINDOW | RESIDUAL) for c in plan.branches(*where)):
      if k.shape[1] != length:
        raise ValueError(f"window attention needs self-attention, got {length} queries and "
                         f"{k.shape[1]} keys in {key}")
      band = window_mask(length, window_width(plan, length))
    flop_unit = 4.0 * heads * dim  # per batch row and attended pair: q·k and p·v
    full_pairs = _pairs(None, (length, k.shape[1]))
    band_pairs = None if band is None else _pairs(band, (length, length))

    def attend(q, kk, vv, m):
      return next_fun(q, kk, vv, *args[3:], **dict(kwargs, mask=m))

    def branch(code: int) -> Callable[..., Any]:
      def run(cache):
        if code & SHARE:
          return cache["out"], cache["res"], jnp.int32(0), jnp.float32(0.0)
        flops = 0.0
        q, kk, vv, m, rows = query, k, v, mask, batch
        if code & CFG:
          half = batch // 2
          q, kk, vv = query[:half], k[:half], v[:half]
          m = mask[:half] if mask is not None and jnp.ndim(mask) and mask.shape[0] == batch \
              else mask
          rows = half
        def both(a):  # the conditional half's result for both halves
          return jnp.concatenate([a, a]) if code & CFG else a

        def windowed():
          window = jnp.asarray(band)
          return attend(q, kk, vv, window if m is None else m & window)

        res = None if cache is None else cache["res"]
        if code & WINDOW:  # with CFG sharing, the conditional half's residual for both
          out = both(windowed() + res[:rows])
          flops += rows * band_pairs * flop_unit
        else:
          out = attend(q, kk, vv, m)
          flops += rows * full_pairs * flop_unit
          if code & RESIDUAL:
            w = windowed()
            res = both(out - w)
            flops += rows * band_pairs * flop_unit
          out = both(out)
        return out, res, jnp.int32(1), jnp.float32(flops)
      return run

    codes = plan.branches(*where)
    stats = new["stats"][where[0]]
    if codes == (FULL,):
      out, _, calls, flops = branch(FULL)(None)
    else:
      cache = new["cache"][key]
      out, res, calls, flops = jax.lax.switch(index[key], [branch(c) for c in codes], cache)
      new["cache"][key] = {"out": out, "res": res}
    stats["calls"] = stats["calls"] + calls
    stats["flops"] = stats["flops"] + flops
    return out

  with nn.intercept_methods(interceptor):
    yield new


# ---------------------------------------------------------------------------------- Across layers
def softmax_weights(query: jax.Array, key: jax.Array, value: jax.Array, *, mask=None,
                    is_causal: bool = False, segment_ids=None, **op_args
                    ) -> tuple[common.Dims, jax.Array]:
  """`(dims, weights)`: the float32 weights `[batch, kv_heads, groups, q_len, kv_len]` of the
  softmax op with its `op_args` (scale, bias, local_window_size, logits_soft_cap); rows with
  nothing to attend to are zeros, as the op's output."""
  op_args.pop("implementation", None)
  dims, logits, full_mask = common.scores(query, key, value, mask=mask, is_causal=is_causal,
                                          segment_ids=segment_ids, **op_args)
  return dims, common.masked_softmax(logits, full_mask)


@contextlib.contextmanager
def record_weights(active: bool = True) -> Iterator[dict[str, jax.Array]]:
  """Within the context, the first `Attention.attend` call computes the softmax op as
  `softmax_weights` times the values and records the weights under "weights" in the yielded
  dict. Does nothing when not `active`."""
  seen: dict[str, jax.Array] = {}
  if not active:
    yield seen
    return

  def interceptor(next_fun, args, kwargs, context):
    if seen or not isinstance(context.module, Attention) or context.method_name != "attend":
      return next_fun(*args, **kwargs)
    if context.module.op != "softmax":
      raise ValueError(f"shared attention weights are softmax weights: the layer before a "
                       f"sharing layer needs op='softmax', got {context.module.op!r}")
    query, key, value = args[:3]
    dims, weights = softmax_weights(query, key, value, mask=kwargs.get("mask"),
                                    is_causal=kwargs.get("is_causal", False),
                                    segment_ids=kwargs.get("segment_ids"),
                                    **dict(kwargs.get("op_args") or {}))
    seen["weights"] = weights
    return common.weighted_values(weights, value, dims).astype(query.dtype)

  with nn.intercept_methods(interceptor):
    yield seen


class EchoAttention(nn.Module):
  """EchoAtt's sharing layer: `O = P (x W_v) W_o` with attention weights `P` `[batch, kv_heads,
  groups, length, length]` given by an earlier layer (`record_weights`); only the value and
  output projections are parameters (as `Attention`'s "value" and "out")."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False
  out_bias: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    b, t, features = x.shape
    groups = self.num_heads // self.num_kv_heads
    want = (b, self.num_kv_heads, groups, t, t)
    if weights is None or tuple(weights.shape) != want:
      raise ValueError(f"EchoAttention needs the attention weights of the layer before, "
                       f"[batch, kv_heads, groups, length, length] = {want}, got "
                       f"{None if weights is None else tuple(weights.shape)}")
    project = lambda shape, axes, name, contract, bias: Projection(  # pylint: disable=g-long-lambda
        shape=shape, logical_axes=axes, contract=contract, use_bias=bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
    value = project((features, self.num_kv_heads, self.head_dim),
                    ("embed", "kv_heads", "head_dim"), "value", 1, self.use_bias)(x)
    dims = common.Dims(b, t, t, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim)
    out = common.weighted_values(weights, value, dims)
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    return project((self.num_heads, self.head_dim, features), ("heads", "head_dim", "embed"),
                   "out", 2, out_bias)(out)
