"""Reading and steering the attention of any model built on `big_attn.layers.Attention`.

Nothing in the model changes: every `Attention` layer calls its op through one module method,
`Attention.attend`, and `hook_ops` intercepts that method with `flax.linen.intercept_methods`,
so a hook receives exactly the query, key, value, mask and op arguments the layer computed
(after qk-norm, RoPE and the op's own parameters) and may observe or replace the output.

What is captured is the op's *effective mixing matrix*: for an op linear in the values,
`out[b, i, h] = Σ_j M[b, h, i, j] · v[b, j, h]`, found by evaluating the op on one-hot values
(`M = op(q, k, I)`, in chunks of `value_dim` columns, so every op sees its usual shapes). For
softmax-like ops M is the attention map after normalisation and masking; for linear attention
the normalised kernel matrix `φ(q)·φ(k)ᵀ / z`; for retention the decayed score matrix; for ops
that pool or route keys the composite map from the original keys to the outputs. Checked on a
tiny ViT: softmax, sigmoid, clipped_softmax, cog, gated_attention, gatv2, neural_attention,
normalized, ngpt, lean_decode, lightning, lognormal_linear, performer, retention, latte, agent,
mixture_of_heads, window, grid, neighborhood, gpsa, levit_bias, decomposed_relpos,
spatial_reduction, bilevel_routing and sparse_blocks have exact maps. Ops that are not linear in
the values, or whose mixing differs per value channel, have none: channel_attention (mixes
channels), focused_linear (a depthwise convolution of V per channel), switchhead (value
experts), bottleneck (gathered values become keys) and sage_int8 (quantised P·V, off by ~1e-3);
`capture_attention` compares `M·v` with the op's output and raises `ValueError` when they differ
by more than `tolerance`.

Layers run inside `nn.scan` (`scan_layers=True`) are traced once for all layers; capture them
from the same model built with `scan_layers=False` (the parameters differ only by the stacked
leading axis).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers.attention import Attention
from big_attn.ops import common

Array = jax.Array
# hook(path, op_fn, query, key, value, kwargs) -> the op's output; kwargs hold mask, is_causal,
# segment_ids (when given) and the op arguments exactly as the layer passed them to `attend`.
OpHook = Callable[[str, Callable, Array, Array, Array, dict], Array]


def layer_path(module: nn.Module) -> str:
  """`"Transformer/encoderblock_0/MultiHeadAttention"`: the module's path in the variables."""
  return "/".join(module.path)


@contextlib.contextmanager
def hook_ops(hook: OpHook):
  """Within the context, the op of every `Attention` layer is called through `hook`.

  `hook(path, op_fn, query, key, value, kwargs)` gets `op_fn(query, key, value, **kwargs)`,
  the layer's `attend` (callable several times, e.g. on one-hot values), and `kwargs` with
  `mask`, `is_causal`, `segment_ids` (when given) and the op arguments. Only `attend` calls
  are hooked, the outermost one where an `attend` calls another (a model's override).
  """
  inside = [False]

  def interceptor(next_fun, args, kwargs, context):
    if (inside[0] or not isinstance(context.module, Attention)
        or context.method_name != "attend"):
      return next_fun(*args, **kwargs)
    query, key, value = args
    op_kwargs = dict(kwargs.get("op_args") or {}, mask=kwargs.get("mask"),
                     is_causal=kwargs.get("is_causal", False))
    if kwargs.get("segment_ids") is not None:
      op_kwargs["segment_ids"] = kwargs["segment_ids"]

    def op_fn(query, key, value, *, mask=None, is_causal=False, segment_ids=None, **op_args):
      return next_fun(query, key, value, mask=mask, is_causal=is_causal,
                      segment_ids=segment_ids, op_args=op_args)

    inside[0] = True
    try:
      return hook(layer_path(context.module), op_fn, query, key, value, op_kwargs)
    finally:
      inside[0] = False

  with nn.intercept_methods(interceptor):
    yield


def mixing_matrix(op_fn: Callable, query: Array, key: Array, value: Array,
                  kwargs: dict[str, Any]) -> Array:
  """`[batch, heads, q_len, kv_len]` float32 map M with `op(q, k, v) = M·v` (op linear in v).

  Evaluates `op_fn` on one-hot values, `value_dim` key positions at a time.
  """
  dims = common.check_qkv(query, key, value, same_head_dim=False)
  s, dv = dims.kv_len, dims.value_dim
  columns = []
  for start in range(0, s, dv):
    onehot = (jnp.arange(s)[:, None] == start + jnp.arange(dv)[None, :]).astype(value.dtype)
    out = op_fn(query, key, jnp.broadcast_to(onehot[None, :, None, :], value.shape), **kwargs)
    columns.append(out.astype(jnp.float32))
  m = jnp.concatenate(columns, axis=-1)[..., :s]  # [b, t, n, s]
  return jnp.transpose(m, (0, 2, 1, 3))


def mix(weights: Array, query: Array, key: Array, value: Array) -> Array:
  """`[b, heads, t, s]` weights times `[b, s, kv_heads, d]` values -> `[b, t, heads, d]`."""
  dims = common.check_qkv(query, key, value, same_head_dim=False)
  return common.weighted_values(common.grouped(weights, dims), value, dims)


def map_error(weights: Array, query: Array, key: Array, value: Array, out: Array
              ) -> tuple[Array, Array]:
  """`(max|M·v - out|, max|out|)` of a layer's map M and its op's output, in float32."""
  out32 = out.astype(jnp.float32)
  return (jnp.max(jnp.abs(mix(weights, query, key, value.astype(jnp.float32)) - out32)),
          jnp.max(jnp.abs(out32)))


def check_linear(errors: dict[str, tuple[Any, Any]], tolerance: float | None) -> None:
  """Raises `ValueError` naming the first layer whose `map_error` exceeds `tolerance`."""
  for path, (err, size) in errors.items():
    if tolerance is not None and float(err) > tolerance * max(float(size), 1e-30):
      raise ValueError(f"attention layer {path!r}: its op is not linear in the values "
                       f"(|M·v - out| = {float(err):.3g} for |out| = {float(size):.3g}); no "
                       "exact map")


def _apply(model: nn.Module, variables: Any, args, kwargs, hook: OpHook):
  with hook_ops(hook):
    return model.apply(variables, *args, **kwargs)


def capture_attention(model: nn.Module, variables: Any, *args, tolerance: float | None = 1e-3,
                      **kwargs) -> dict[str, Array]:
  """Runs `model.apply(variables, *args, **kwargs)`; returns `{layer path: [b, h, q, kv] map}`.

  Maps are in the order the layers ran (float32 mixing matrices, see the module docstring).
  `tolerance`: largest allowed `max|M·v - op(q,k,v)| / max|op(q,k,v)|` per layer (None: no
  check); a larger one raises `ValueError` naming the layer (its op is not linear in v).
  One compiled call; `kwargs` are static (e.g. `train=False`).
  """
  order = []  # execution order (jit returns dicts with sorted keys)

  def run(variables, args):
    maps, errors = {}, {}

    def hook(path, op_fn, query, key, value, op_kwargs):
      out = op_fn(query, key, value, **op_kwargs)
      if path in maps:
        raise ValueError(f"attention layer {path!r} ran twice in one call (a scanned or shared "
                         "layer); capture from a model without nn.scan")
      maps[path] = mixing_matrix(op_fn, query, key, value, op_kwargs)
      order.append(path)
      errors[path] = map_error(maps[path], query, key, value, out)
      return out

    _apply(model, variables, args, kwargs, hook)
    return maps, errors

  maps, errors = jax.jit(run)(variables, args)
  check_linear(errors, tolerance)
  return {path: maps[path] for path in order}


def attention_gradients(model: nn.Module, variables: Any, target_fn: Callable[[Any], Array],
                        *args, tolerance: float | None = 1e-3, **kwargs
                        ) -> tuple[dict[str, Array], dict[str, Array]]:
  """`(maps, grads)`: the maps of `capture_attention` and `∂ target_fn(output) / ∂ map`.

  The gradient is taken with respect to each layer's mixing matrix M as it multiplies the
  values (a zero perturbation Δ is added as `out + Δ·v`, so the forward pass is unchanged and
  `∂/∂Δ = ∂/∂M`), as in Transformer Interpretability Beyond Attention Visualization.
  `target_fn` maps the model's output to a scalar (e.g. the target logit summed over the batch).
  """
  maps = capture_attention(model, variables, *args, tolerance=tolerance, **kwargs)

  def target(deltas, variables, args):
    def hook(path, op_fn, query, key, value, op_kwargs):
      out = op_fn(query, key, value, **op_kwargs)
      return out + mix(deltas[path], query, key, value).astype(out.dtype)
    return target_fn(_apply(model, variables, args, kwargs, hook))

  zeros = {path: jnp.zeros_like(m) for path, m in maps.items()}
  return maps, jax.jit(jax.grad(target))(zeros, variables, args)


SUPPRESSION_MODES = ("scores", "weights")


def suppression_hook(token: Array | int, factor: float, *, num_tokens: int,
                     mode: str = "scores") -> OpHook:
  """An `OpHook` suppressing key `token` in every layer whose key length is `num_tokens` (AtMan).

  AtMan: Understanding Transformer Predictions Through Memory Efficient Attention Manipulation
  multiplies the pre-softmax score of the suppressed token by `(1 - f)` for every query and
  head: `s'_ij = s_ij·(1 - f)` for `j = token`. Both modes add a bias to the op's `bias`
  argument (ops without one raise `ValueError`):
    "scores": bias `-f·s_ij` on column j with `s = cap(scale·q·kᵀ)`, the op's own logits
      (`common.scores` with its `scale` and `logits_soft_cap`), so `s + bias = (1-f)·s`: the
      paper's rule exactly for every op whose logits are `cap(scale·q·kᵀ) + bias` (softmax,
      sigmoid, windows, ALiBi-style biases; a model's own bias is kept, not scaled).
    "weights": bias `log(1 - f)` on column j, which multiplies `exp(s_ij)` by `(1 - f)`; for
      softmax the map becomes `A'_ij = (1-f)·A_ij / (1 - f·A_ij)`: a suppression of the
      normalised weight rather than of the score (the two coincide only where
      -f·s_ij = log(1-f)); for ops whose logits are not `scale·q·kᵀ`. Needs `f < 1`.

  `token` may be traced (one compiled function serves every token).
  """
  if mode not in SUPPRESSION_MODES:
    raise ValueError(f"mode must be one of {SUPPRESSION_MODES}, got {mode!r}")
  if not 0.0 <= factor <= 1.0 or (mode == "weights" and factor >= 1.0):
    raise ValueError(f"factor must be in [0, 1] ([0, 1) for mode='weights'), got {factor}")

  def hook(path, op_fn, query, key, value, op_kwargs):
    if key.shape[1] != num_tokens or factor == 0.0:
      return op_fn(query, key, value, **op_kwargs)
    column = (jnp.arange(num_tokens) == token)[None, None, None, :]  # [1, 1, 1, s]
    if mode == "scores":
      dims, logits, _ = common.scores(
          query, key, value, scale=op_kwargs.get("scale"),
          logits_soft_cap=op_kwargs.get("logits_soft_cap"))
      logits = logits.reshape(dims.batch, dims.num_heads, dims.q_len, dims.kv_len)
      extra = jnp.where(column, -factor * logits, 0.0)
    else:
      extra = jnp.where(column, jnp.log1p(-factor), 0.0).astype(jnp.float32)
    bias = op_kwargs.get("bias")
    bias = extra if bias is None else bias.astype(jnp.float32) + extra
    return op_fn(query, key, value, **dict(op_kwargs, bias=bias))

  return hook


def apply_with_hook(model: nn.Module, variables: Any, hook: OpHook, *args, **kwargs):
  """`model.apply(variables, *args, **kwargs)` with every `Attention` op called through `hook`."""
  return _apply(model, variables, args, kwargs, hook)


def block_outputs(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, Array]:
  """`{block path: [b, n, d] output}` of every module that directly holds an `Attention` layer.

  The residual stream after each transformer block (e.g. ViT's `encoderblock_i`), as Vision
  Transformers Need Registers measures token norms; a block whose output has no `[b, n, d]`
  array (an attention-pooling head) is left out. Taken with `nn.intercept_methods`, in one
  compiled call (`kwargs` are static).
  """
  parents: set[str] = set()
  outputs: dict[str, Array] = {}

  def interceptor(next_fun, args_, kwargs_, context):
    out = next_fun(*args_, **kwargs_)
    if context.method_name != "__call__":
      return out
    if isinstance(context.module, Attention):
      parents.add("/".join(context.module.path[:-1]))
    else:
      path = layer_path(context.module)
      if path in parents and path not in outputs:
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if hasattr(first, "ndim") and first.ndim == 3:
          outputs[path] = first
    return out

  def run(variables, args):
    outputs.clear()
    with nn.intercept_methods(interceptor):
      model.apply(variables, *args, **kwargs)
    return dict(outputs)

  result = jax.jit(run)(variables, args)
  return {path: result[path] for path in outputs}  # in execution order
