"""The output layer of Pointer Networks."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers.attention import Projection
from big_attn.ops import learned_scoring


class PointerHead(nn.Module):
  """Pointer Networks (Vinyals, Fortunato & Jaitly 2015): a distribution over the input
  positions as the prediction,

    u_ij = vᵀ tanh(W_1 e_j + W_2 d_i),   log p(C_i = j | C_<i, P) = log softmax_j(u_ij),

  for decoder states `decoder [batch, steps, features]` and encoder states `encoder [batch,
  inputs, features]` (`big_attn.ops.learned_scoring.pointer_log_probs`). W_1, W_2 `[features,
  hidden_dim]` without bias, v `[hidden_dim]`. Returns float32 log-probabilities `[batch,
  steps, inputs]`, −inf where `mask` (boolean, True = may be pointed at, broadcastable to
  `[batch, steps, inputs]`) is False; `is_causal` lets step i point at inputs j <= i only.
  Train with the negative log-probability of the target positions.
  Parameters carry the logical axis names embed and head_dim.
  """
  hidden_dim: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, encoder, *, mask=None, is_causal: bool = False):
    if not isinstance(self.hidden_dim, int) or isinstance(self.hidden_dim, bool) or (
        self.hidden_dim < 1):
      raise ValueError(f"PointerHead: hidden_dim must be a positive int, got "
                       f"{self.hidden_dim!r}")
    for name, x in (("decoder", decoder), ("encoder", encoder)):
      if getattr(x, "ndim", None) != 3:
        raise ValueError(f"PointerHead: {name} must be [batch, length, features], got shape "
                         f"{getattr(x, 'shape', None)}")
    if decoder.shape[0] != encoder.shape[0]:
      raise ValueError(f"PointerHead: decoder and encoder batch sizes differ: "
                       f"{decoder.shape[0]} and {encoder.shape[0]}")
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.ndim > 3:
        raise ValueError(f"PointerHead: mask must broadcast to [batch, steps, inputs], got "
                         f"shape {mask.shape}")
      mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)[:, None]
    project = lambda x, name: Projection(  # pylint: disable=g-long-lambda
        (x.shape[-1], 1, self.hidden_dim), ("embed", None, "head_dim"), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)(x)
    attn_vec = self.param("v", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.hidden_dim ** -0.5), (None, "head_dim")),
                          (1, self.hidden_dim), self.param_dtype)
    log_probs = learned_scoring.pointer_log_probs(
        project(decoder, "decoder_proj"), project(encoder, "encoder_proj"),
        attn_vec=attn_vec, mask=mask, is_causal=is_causal)
    return log_probs[:, 0]
