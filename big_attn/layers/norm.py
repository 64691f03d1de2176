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
