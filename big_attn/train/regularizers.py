"""Loss terms computed from a model's attention maps during training, and attention transfer.

The attention diversification loss of Robustifying Token Attention for Vision Transformers
(Guo, Stutz and Schiele, ICCV 2023): `config.loss.attention_diversification = λ` adds
λ·ADL to the task's loss. The maps are the mixing matrices of every `Attention` layer
(`interpret.capture.mixing_matrix`, differentiable), read through `capture.hook_ops` while the
task's loss runs, so no model code changes.

Attention transfer (On the Surprising Effectiveness of Attention Transfer for Vision
Transformers): `config.loss.attention_transfer = "copy" | "distill"` with
`config.loss.attention_transfer_teacher = dict(model_name=..., model={...}, workdir=DIR)` (a
ViT trained by `big_attn.main` in DIR, restored once and passed to every step), and for
distillation `config.loss.attention_transfer_weight` (λ, default 1); `attention_transfer_layers`
limits either to the last layers (`with_attention_transfer`).
The token reduction consistency of Multi-criteria Token Fusion with One-step-ahead Attention
for Efficient Vision Transformers (Lee, Choi and Kim, CVPR 2024):
`config.loss.token_reduction_consistency = λ` trains an MCTF model (`token_reduction` method
"mctf", reduction number r) on the task's loss at r plus the task's loss at a second reduction
number r' (`config.loss.token_reduction_consistency_r`; None: ⌊r/2⌋, our choice where the
paper samples r') plus λ·‖x_cls − x'_cls‖² (mean over batch and channels) between the final
class tokens (the encoder's output token 0) of the two passes.

The selection labels of Context-Aware Token Selection and Packing for Enhanced Vision
Transformer (Select and Pack Attention): `config.loss.spa_selection = λ` adds λ times the mean
over SPA's gating layers (`token_reduction.TokenGate`) of the binary cross-entropy of their
gates against their selection labels (`token_reduction.selection_loss`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.interpret import capture
from big_attn.layers import token_reduction
from big_attn.models import deit
from big_attn.models import vit


THRESHOLD = 2.0  # τ·n: attention weights at or below 2/n are zeroed (the authors' code).


def attention_diversification_loss(maps: Sequence[jax.Array], *, threshold: float = THRESHOLD
                                   ) -> jax.Array:
  """Attention diversification loss (ADL), Robustifying Token Attention for Vision Transformers.

  For each map `[batch, heads, n, n]`: A the mean over heads, ā = mean_i A_i the mean
  attention row, weights at or below τ = `threshold`/n set to zero in both; the loss is the
  mean over layers, batch and rows i of cos(A_i, ā). Penalising it spreads each token's
  attention over a diverse set of tokens instead of the same few. A row that is all zero
  after the threshold has cosine 0.
  """
  if not maps:
    raise ValueError("maps must hold at least one attention map, got none")
  if threshold < 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}")
  terms = []
  for m in maps:
    if m.ndim != 4 or m.shape[-1] != m.shape[-2]:
      raise ValueError(f"maps must be self-attention maps [batch, heads, n, n], got shape "
                       f"{m.shape}")
    a = jnp.mean(m.astype(jnp.float32), axis=1)  # [b, n, n]
    mean_row = jnp.mean(a, axis=1, keepdims=True)  # [b, 1, n]
    tau = threshold / a.shape[-1]
    a = jnp.where(a > tau, a, 0.0)
    mean_row = jnp.where(mean_row > tau, mean_row, 0.0)
    dots = jnp.sum(a * mean_row, axis=-1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(mean_row, axis=-1)
    terms.append(jnp.mean(jnp.where(norms > 0, dots / jnp.where(norms > 0, norms, 1.0), 0.0)))
  return jnp.mean(jnp.stack(terms))


def with_attention_diversification(loss_fn: Callable[..., Any], weight: float, *,
                                   threshold: float = THRESHOLD) -> Callable[..., Any]:
  """`loss_fn` (a `Task.loss` or `Task.loss_with_stats`) plus `weight`·ADL of the model's
  self-attention maps in that same forward pass.

  The returned function has `loss_fn`'s signature and result (a loss, or a loss and batch
  statistics). Attention layers whose queries and keys differ in length (cross-attention,
  attention pooling) are left out. The model must run its layers unscanned and without remat
  (the maps are read outside those transforms).
  """
  if weight <= 0:
    raise ValueError(f"weight must be > 0, got {weight}")

  def regularized(model, variables, batch, rng, **kwargs):
    maps = []
    with capture.hook_ops(_self_attention_collector(maps)):
      result = loss_fn(model, variables, batch, rng, **kwargs)
    if not maps:
      raise ValueError(f"{type(model).__name__} ran no self-attention layer: the attention "
                       "diversification loss needs one")
    return _plus(result, weight * attention_diversification_loss(maps, threshold=threshold))

  return regularized


def _self_attention_collector(maps: list[jax.Array]) -> capture.OpHook:
  """An `OpHook` appending the mixing matrix of every self-attention layer to `maps`."""

  def hook(path, op_fn, query, key, value, op_kwargs):
    if query.shape[1] == key.shape[1]:
      maps.append(capture.mixing_matrix(op_fn, query, key, value, op_kwargs))
    return op_fn(query, key, value, **op_kwargs)

  return hook


def _plus(result: Any, penalty: jax.Array) -> Any:
  """A loss, or the loss of a `(loss, batch_stats)` pair, plus `penalty`."""
  if isinstance(result, tuple):
    return (result[0] + penalty, *result[1:])
  return result + penalty


# ------------------------------------------------------------------------------ Attention transfer
ATTENTION_TRANSFER_MODES = ("copy", "distill")


def attention_distillation_loss(student_maps: Sequence[jax.Array],
                                teacher_maps: Sequence[jax.Array]) -> jax.Array:
  """Cross-entropy H(T, S) = -Σ_j T_ij log S_ij of the student's attention rows S against the
  teacher's T, averaged over layers, batch, heads and rows (On the Surprising Effectiveness of
  Attention Transfer for Vision Transformers, Li et al., NeurIPS 2024: attention distillation).
  """
  if not student_maps or len(student_maps) != len(teacher_maps):
    raise ValueError(f"student_maps and teacher_maps must hold the same number (>= 1) of maps, "
                     f"got {len(student_maps)} and {len(teacher_maps)}")
  terms = []
  for s, t in zip(student_maps, teacher_maps):
    if s.ndim != 4 or s.shape != t.shape:
      raise ValueError(f"student and teacher maps must have the same shape [batch, heads, q, k], "
                       f"got {s.shape} and {t.shape}")
    log_s = jnp.log(jnp.maximum(s.astype(jnp.float32), jnp.finfo(jnp.float32).tiny))
    terms.append(jnp.mean(-jnp.sum(t.astype(jnp.float32) * log_s, axis=-1)))
  return jnp.mean(jnp.stack(terms))


def self_attention_maps(model: Any, variables: Any, images: jax.Array) -> list[jax.Array]:
  """The mixing matrices of `model`'s self-attention layers on `images` (evaluation mode), in
  the order the layers run, without gradient."""
  maps = []
  capture.apply_with_hook(model, variables, _self_attention_collector(maps), images, train=False)
  return [jax.lax.stop_gradient(m) for m in maps]


def check_attention_transfer(mode: str, weight: float, layers: int | None) -> None:
  """Raises `ValueError` for an unknown mode, a weight <= 0 or a layer count < 1."""
  if mode not in ATTENTION_TRANSFER_MODES:
    raise ValueError(f"mode must be one of {ATTENTION_TRANSFER_MODES}, got {mode!r}")
  if weight <= 0:
    raise ValueError(f"weight must be > 0, got {weight}")
  if layers is not None and layers < 1:
    raise ValueError(f"layers must be >= 1 or None (all), got {layers}")


def with_attention_transfer(loss_fn: Callable[..., Any], teacher: Any, teacher_variables: Any, *,
                            mode: str, weight: float = 1.0, layers: int | None = None
                            ) -> Callable[..., Any]:
  """`loss_fn` (a `Task.loss` or `Task.loss_with_stats`) with the attention maps of a
  pre-trained `teacher` ViT transferred to the student (On the Surprising Effectiveness of
  Attention Transfer for Vision Transformers).

  The teacher (`teacher.apply(teacher_variables, images, train=False)`) runs on the batch's
  images; its self-attention maps T_l (`self_attention_maps`) go to the student's l-th
  self-attention layer, for the last `layers` layers (None: all). "copy": the layer outputs
  T_l·V with its own values V (its queries and keys are not used: attention copy); "distill":
  the student keeps its attention and `weight`·H(T_l, S_l) (`attention_distillation_loss`) is
  added to the loss. Teacher and student need the same number of self-attention layers, heads
  and tokens. The student must run its layers unscanned and without remat.
  """
  check_attention_transfer(mode, weight, layers)

  def transferred(model, variables, batch, rng, **kwargs):
    teacher_maps = self_attention_maps(teacher, teacher_variables, batch["image"])
    first = 0 if layers is None else max(len(teacher_maps) - layers, 0)
    count, student_maps = [0], []

    def hook(path, op_fn, query, key, value, op_kwargs):
      if query.shape[1] != key.shape[1]:
        return op_fn(query, key, value, **op_kwargs)
      index = count[0]
      count[0] += 1
      if not first <= index < len(teacher_maps):
        return op_fn(query, key, value, **op_kwargs)
      target = teacher_maps[index]
      student_shape = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
      if target.shape != student_shape:
        raise ValueError(f"attention transfer: the teacher's map {index} has shape "
                         f"{target.shape}, the student's layer {path!r} [batch, heads, q, k] "
                         f"{student_shape}")
      if mode == "copy":
        return capture.mix(target, query, key, value).astype(value.dtype)
      student_maps.append(capture.mixing_matrix(op_fn, query, key, value, op_kwargs))
      return op_fn(query, key, value, **op_kwargs)

    with capture.hook_ops(hook):
      result = loss_fn(model, variables, batch, rng, **kwargs)
    if count[0] != len(teacher_maps):
      raise ValueError(f"attention transfer: the teacher has {len(teacher_maps)} self-attention "
                       f"layers, {type(model).__name__} ran {count[0]}")
    if mode == "copy":
      return result
    return _plus(result, weight * attention_distillation_loss(student_maps, teacher_maps[first:]))

  return transferred


def restore_attention_teacher(teacher: Any, num_classes: int, image_shape: tuple[int, ...]
                              ) -> tuple[Any, Any]:
  """`(teacher Model, its variables)` of a teacher dict `dict(model_name=..., model={...},
  workdir=DIR)` (a classifier trained by `big_attn.main` in DIR; DeiT's teacher dict, read by
  `deit.restore_teacher` from the newest checkpoint)."""
  module, _ = deit.teacher_spec(teacher, num_classes)
  return module, deit.restore_teacher(teacher, num_classes, image_shape)
def token_reduction_consistency_loss(class_token: jax.Array, other: jax.Array) -> jax.Array:
  """MCTF's token reduction consistency: the mean squared difference of the final class tokens
  `[batch, width]` of two passes with different reduction numbers (mean over batch and
  channels)."""
  if class_token.shape != other.shape or class_token.ndim != 2:
    raise ValueError(f"class tokens must both be [batch, width], got shapes {class_token.shape} "
                     f"and {other.shape}")
  return jnp.mean(jnp.square(class_token.astype(jnp.float32) - other.astype(jnp.float32)))


def _loss_and_calls(loss_fn, module_type, model, variables, batch, rng, **kwargs):
  """`loss_fn`'s result and the `(args, output)` of each call of a `module_type` module, in the
  order they ran (read with `nn.intercept_methods`)."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      calls.append((args, out))
    return out

  with nn.intercept_methods(interceptor):
    result = loss_fn(model, variables, batch, rng, **kwargs)
  return result, calls


def _loss_value(result):
  """The loss of a `Task.loss` (a scalar) or `Task.loss_with_stats` (a tuple) result."""
  return result[0] if isinstance(result, tuple) else result


def _with_loss(result, loss):
  """`result` with its loss replaced by `loss` (batch statistics kept)."""
  return (loss, *result[1:]) if isinstance(result, tuple) else loss


def _with_class_token(loss_fn, model, variables, batch, rng, **kwargs):
  """`loss_fn`'s result and the class token the model's encoder (`vit.Encoder`) outputs."""
  result, calls = _loss_and_calls(loss_fn, vit.Encoder, model, variables, batch, rng, **kwargs)
  if not calls:
    raise ValueError(f"{type(model).__name__} has no vit.Encoder: the token reduction "
                     "consistency reads its class token")
  return result, calls[-1][1][:, 0]


def with_token_reduction_consistency(loss_fn: Callable[..., Any], weight: float, *,
                                     r: int | None = None) -> Callable[..., Any]:
  """`loss_fn` (a `Task.loss` or `Task.loss_with_stats`) of an MCTF model at its reduction
  number plus the same loss at `r` (None: ⌊model r / 2⌋) plus `weight`·
  `token_reduction_consistency_loss` of the two passes' class tokens.

  The returned function has `loss_fn`'s signature and result (the batch statistics are the
  first pass's). The model must have a class token (ViT pool_type 'cls' or DeiT) and
  `token_reduction` method "mctf"; raises `ValueError` otherwise.
  """
  if weight <= 0:
    raise ValueError(f"weight must be > 0, got {weight}")
  if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
    raise ValueError(f"r must be None or an int >= 0, got {r!r}")

  def regularized(model, variables, batch, rng, **kwargs):
    reduction = getattr(model, "token_reduction", None)
    if not isinstance(reduction, Mapping) or reduction.get("method") != "mctf":
      raise ValueError(f"the token reduction consistency trains MCTF: the model needs "
                       f"token_reduction {{'method': 'mctf', ...}}, got {reduction!r}")
    if getattr(model, "pool_type", "cls") not in ("cls", "tok"):
      raise ValueError(f"the token reduction consistency compares class tokens: the model "
                       f"needs pool_type 'cls', got {model.pool_type!r}")
    other_r = reduction.get("r", token_reduction.DEFAULTS["mctf"]["r"]) // 2 if r is None else r
    other = model.clone(token_reduction=dict(reduction, r=other_r))
    result, class_token = _with_class_token(loss_fn, model, variables, batch, rng, **kwargs)
    other_result, other_class_token = _with_class_token(loss_fn, other, variables, batch, rng,
                                                        **kwargs)
    return _with_loss(result, _loss_value(result) + _loss_value(other_result) + weight
                      * token_reduction_consistency_loss(class_token, other_class_token))

  return regularized


def with_spa_selection(loss_fn: Callable[..., Any], weight: float) -> Callable[..., Any]:
  """`loss_fn` (a `Task.loss` or `Task.loss_with_stats`) plus `weight` times the mean over the
  model's SPA gating layers of `token_reduction.selection_loss` (gates against selection
  labels), read while the task's loss runs; same signature and result. Raises `ValueError`
  when the model runs no gating layer."""
  if weight <= 0:
    raise ValueError(f"weight must be > 0, got {weight}")

  def regularized(model, variables, batch, rng, **kwargs):
    result, calls = _loss_and_calls(loss_fn, token_reduction.TokenGate, model, variables,
                                    batch, rng, **kwargs)
    if not calls:
      raise ValueError(f"{type(model).__name__} ran no SPA gating layer: the selection loss "
                       "needs token_reduction {'method': 'spa', ...}")
    terms = [token_reduction.selection_loss(*out, args[2]) for args, out in calls]
    return _with_loss(result, _loss_value(result) + weight * jnp.mean(jnp.stack(terms)))

  return regularized
