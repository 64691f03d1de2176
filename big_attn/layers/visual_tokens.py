"""The visual transformer (VT) module of Visual Transformers: Token-based Image Representation
and Processing for Computer Vision (Wu et al., 2020), on `[batch, H, W, C]` feature maps.

    vt = VisualTransformer(num_tokens=16, num_heads=2)
    x_out, tokens = vt.apply({"params": params_1}, x)                  # filter-based tokenizer
    x_out, tokens = vt.apply({"params": params_2}, x_out, tokens)      # recurrent tokenizer

With X the `[HW, C]` pixels of one example:

- tokenizer: A = softmax_HW(X W_A) (`[HW, L]`, one spatial attention map per visual token,
  W_A `[C, L]`), or, recurrent (after another VT, from its tokens T_in `[L, C_t]`),
  W_R = T_in W_{T→R} (`[L, C]`) and A = softmax_HW(X W_Rᵀ); then T = (Aᵀ X) W_T (`[L, C_t]`);
- transformer over the L tokens: T ← T + MHSA(LN T), T ← T + MLP(LN T) (pre-norm;
  `big_attn.layers.Attention` with any registered op, `big_attn.layers.MlpBlock`);
- projector: X_out = X + softmax_L((X W_Q)(T W_K)ᵀ) (T W_V), unscaled as in the paper
  (W_Q `[C, C_t]`, W_K `[C_t, C_t]`, W_V `[C_t, C]`), back to `[H, W, C]`.

The paper's own transformer is single-head with T ← T + softmax((T K)(T Q)ᵀ) T and a
two-layer MLP; here it is the codebase's multi-head pre-norm block.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers.attention import Attention
from big_attn.layers.mlp import MlpBlock
from big_attn.layers.norm import layer_norm
from big_attn.ops import checks


class VisualTransformer(nn.Module):
  """One VT module: tokenizer, transformer over the visual tokens, projector.

  Attributes:
    num_tokens: visual tokens L per example (16 in the paper's classifiers).
    token_dim: token channels C_t; the input's channels when None.
    num_heads: heads of the token transformer (dividing `token_dim`).
    mlp_ratio: the token MLP's hidden width over `token_dim`.
    op, op_args: the transformer's attention op by registry name and its arguments.
  `__call__(x, tokens=None)` takes `x: [batch, H, W, C]` and, for the recurrent tokenizer, the
  previous VT's tokens `[batch, L, C_t]`; it returns `(x_out [batch, H, W, C], tokens [batch, L,
  C_t])`. `token_maps` (`sow`n to "intermediates") holds A, `[batch, HW, L]`.
  """
  num_tokens: int = 16
  token_dim: int | None = None
  num_heads: int = 1
  mlp_ratio: float = 4.0
  op: str = "softmax"
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _dense(self, features, axes, name):
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=name, kernel_init=nn.with_logical_partitioning(
                        nn.initializers.xavier_uniform(), axes))

  @nn.compact
  def __call__(self, x, tokens=None):
    if x.ndim != 4:
      raise ValueError(f"VisualTransformer: x must be [batch, H, W, C], got shape {x.shape}")
    b, h, w, c = x.shape
    num_tokens = checks.positive_int("VisualTransformer: num_tokens", self.num_tokens)
    token_dim = checks.positive_int("VisualTransformer: token_dim", self.token_dim or c)
    if not isinstance(self.num_heads, int) or self.num_heads < 1 or token_dim % self.num_heads:
      raise ValueError(f"VisualTransformer: num_heads must be a positive int dividing token_dim "
                       f"({token_dim}), got {self.num_heads!r}")
    if self.mlp_ratio <= 0:
      raise ValueError(f"VisualTransformer: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
    if tokens is not None and tokens.shape != (b, num_tokens, token_dim):
      raise ValueError(f"VisualTransformer: tokens must be [batch, num_tokens, token_dim] = "
                       f"{(b, num_tokens, token_dim)}, got shape {tokens.shape}")
    pixels = x.reshape(b, h * w, c)

    # Tokenizer: spatial attention maps softmax-normalised over the pixels.
    if tokens is None:
      logits = self._dense(num_tokens, ("embed", None), "token_filter")(pixels)
    else:
      filters = self._dense(c, ("mlp", "embed"), "token_recurrent")(tokens)  # W_R: [b, L, C]
      logits = jnp.einsum("bnc,blc->bnl", pixels, filters.astype(pixels.dtype))
    maps = jax.nn.softmax(logits.astype(jnp.float32), axis=1)  # float32 statistics
    self.sow("intermediates", "token_maps", maps)
    tokens = jnp.einsum("bnl,bnc->blc", maps.astype(pixels.dtype), pixels)
    tokens = self._dense(token_dim, ("embed", "mlp"), "token_value")(tokens)

    # Transformer over the visual tokens.
    y = layer_norm(self.dtype, self.param_dtype, "norm1")(tokens)
    tokens = tokens + Attention(num_heads=self.num_heads, op=self.op, op_args=self.op_args,
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                name="attention")(y)
    y = layer_norm(self.dtype, self.param_dtype, "norm2")(tokens)
    tokens = tokens + MlpBlock(mlp_dim=max(1, int(round(self.mlp_ratio * token_dim))),
                               dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)

    # Projector: every pixel attends to the tokens.
    query = self._dense(token_dim, ("embed", "mlp"), "project_query")(pixels)
    key = self._dense(token_dim, ("mlp", None), "project_key")(tokens)
    value = self._dense(c, ("mlp", "embed"), "project_value")(tokens)
    weights = jax.nn.softmax(jnp.einsum("bnd,bld->bnl", query, key).astype(jnp.float32), axis=-1)
    out = pixels + jnp.einsum("bnl,blc->bnc", weights.astype(value.dtype), value)
    return out.reshape(b, h, w, c), tokens
