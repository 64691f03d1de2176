"""Normalisation layers with logically named parameters."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def layer_norm(dtype: Any = None, param_dtype: Any = jnp.float32, name: str | None = None, *,
               epsilon: float = 1e-6) -> nn.LayerNorm:
  """`nn.LayerNorm` whose scale and bias carry the logical axis name `norm`."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


CONV_NORMS = ("batch", "layer")


def batch_norm(use_running_average: bool, dtype: Any = None, param_dtype: Any = jnp.float32,
               name: str | None = None, *, epsilon: float = 1e-3, momentum: float = 0.99,
               zero_scale: bool = False) -> nn.BatchNorm:
  """`nn.BatchNorm` over the last axis whose scale and bias carry the logical axis name `norm`.

  Its running `mean` and `var` live in the `batch_stats` collection: the train step applies
  the model with `mutable=["batch_stats"]` and `use_running_average=False` (statistics of the
  global batch, updated as `momentum·old + (1 − momentum)·batch`); evaluation reads them.
  The defaults are TensorFlow's (the MaxViT authors' code); PyTorch's are eps 1e-5 and
  momentum 0.9 in this convention. `zero_scale`: the scale starts at 0 (a residual branch that
  starts as the identity).
  """
  scale_init = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
  return nn.BatchNorm(
      use_running_average=use_running_average, momentum=momentum, epsilon=epsilon, dtype=dtype,
      param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(scale_init, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def conv_norm(kind: str, train: bool, dtype: Any = None, param_dtype: Any = jnp.float32,
              name: str | None = None, *, batch_norm_eps: float = 1e-3,
              batch_norm_momentum: float = 0.99, layer_norm_eps: float = 1e-6) -> nn.Module:
  """The norm of a convolutional block: "batch" (`batch_norm`) or "layer" (`layer_norm` over
  channels at every pixel: stateless, the same parameters)."""
  if kind == "batch":
    return batch_norm(not train, dtype, param_dtype, name, epsilon=batch_norm_eps,
                      momentum=batch_norm_momentum)
  if kind == "layer":
    return layer_norm(dtype, param_dtype, name, epsilon=layer_norm_eps)
  raise ValueError(f"unknown conv_norm {kind!r}; expected one of {CONV_NORMS}")
