"""The transformer's position-wise MLP block (as big_vision's `MlpBlock`)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(out_dim, the input's width by default).

  Attributes:
    mlp_dim: hidden width; 4x the input width when None.
    out_dim: output width; the input width when None.
    dropout: dropout rate on the hidden activations.
    approximate_gelu: tanh approximation of GELU (big_vision's); False is the exact erf form
      (PyTorch's `nn.GELU()`, so timm's weights).
  Parameters carry logical axis names (`embed`, `mlp`); 3-D activations are constrained to
  `("batch", "length", "mlp")`.
  """
  mlp_dim: int | None = None
  out_dim: int | None = None
  dropout: float = 0.0
  approximate_gelu: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()
  bias_init: Any = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    features = x.shape[-1]
    mlp_dim = self.mlp_dim or 4 * features

    def dense(width, axes, name):
      return nn.Dense(
          width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
          bias_init=nn.with_logical_partitioning(self.bias_init, axes[1:]))

    x = dense(mlp_dim, ("embed", "mlp"), "Dense_0")(x)
    if x.ndim == 3:
      x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return dense(self.out_dim or features, ("mlp", "embed"), "Dense_1")(x)
