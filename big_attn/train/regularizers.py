"""Loss terms computed from a model's attention maps during training.

The attention diversification loss of Robustifying Token Attention for Vision Transformers
(Guo, Stutz and Schiele, ICCV 2023): `config.loss.attention_diversification = λ` adds
λ·ADL to the task's loss. The maps are the mixing matrices of every `Attention` layer
(`interpret.capture.mixing_matrix`, differentiable), read through `capture.hook_ops` while the
task's loss runs, so no model code changes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from big_attn.interpret import capture


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

    def hook(path, op_fn, query, key, value, op_kwargs):
      if query.shape[1] == key.shape[1]:
        maps.append(capture.mixing_matrix(op_fn, query, key, value, op_kwargs))
      return op_fn(query, key, value, **op_kwargs)

    with capture.hook_ops(hook):
      result = loss_fn(model, variables, batch, rng, **kwargs)
    if not maps:
      raise ValueError(f"{type(model).__name__} ran no self-attention layer: the attention "
                       "diversification loss needs one")
    penalty = weight * attention_diversification_loss(maps, threshold=threshold)
    if isinstance(result, tuple):
      return (result[0] + penalty, *result[1:])
    return result + penalty

  return regularized
