"""Linen modules that own the learned weights of attention mechanisms.

The ops in `big_attn.ops` are pure functions that take their weights as arguments. A mechanism
with learned weights registers here, under its op name, a module that creates those weights and
returns them as keyword arguments of the op. `big_attn.layers.Attention` calls it as

    extra_args = ParamsModule(num_heads=..., num_kv_heads=..., head_dim=..., op_args=...,
                              dtype=..., param_dtype=...)(inputs_q, query, key, value)

where `query/key/value` are the projected `[batch, seq, heads, head_dim]` arrays.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_PARAMS: dict[str, type[nn.Module]] = {}


def register_params(op_name: str):
  """Class decorator: registers the Linen module owning the weights of op `op_name`."""

  def decorator(cls):
    if op_name in _PARAMS:
      raise ValueError(f"parameters for op {op_name!r} are already registered")
    _PARAMS[op_name] = cls
    return cls

  return decorator


def params_module(op_name: str) -> type[nn.Module] | None:
  """The module owning op `op_name`'s weights, or None for a mechanism without weights."""
  return _PARAMS.get(op_name)


class OpParams(nn.Module):
  """Base of the per-op parameter modules (fields shared by all)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32


@register_params("gated_attention")
class GatedAttentionParams(OpParams):
  """The gate G(x) of gated attention (Quantizable Transformers, Bondarenko et al. 2023).

  As in the paper, `inputs_q` is split into `num_heads` equal chunks along the features and
  head h's logit is a linear map (with bias) of chunk h: `G(x)_{t,h} = x_{t,h,:}·w_h + b_h`.
  The bias starts at logit(π_init) so every gate opens to `gate_init` (π_init = 0.25, the
  authors' setting); the kernel uses PyTorch's default `Linear` initialisation
  (U(±1/√fan_in)), as the authors' models did. Returns `{"gate_logits": [batch, q_len,
  num_heads]}`.
  """
  gate_init: float = 0.25

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f"gated_attention splits inputs_q into one chunk per head: features ({features}) "
          f"must be divisible by num_heads ({self.num_heads})")
    if not 0.0 < self.gate_init < 1.0:
      raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init}")
    chunk = features // self.num_heads
    kernel = self.param(
        "gate_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1,
                                             out_axis=(), batch_axis=0),
            ("heads", None)),
        (self.num_heads, chunk), self.param_dtype)
    bias = self.param(
        "gate_bias",
        nn.with_logical_partitioning(
            nn.initializers.constant(jnp.log(self.gate_init / (1.0 - self.gate_init))),
            ("heads",)),
        (self.num_heads,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs_q, kernel, bias, dtype=self.dtype)
    x = x.reshape(*x.shape[:-1], self.num_heads, chunk)
    return {"gate_logits": jnp.einsum("...hc,hc->...h", x, kernel) + bias}


@register_params("normalized")
class NormalizedParams(OpParams):
  """Per-head gain g (ones) and shift β (zeros) of normalized attention (Normalized Attention
  Without Probability Cage, Richter & Wattenhofer 2020). Returns `{"gain", "shift"}`, each
  `[num_heads]`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                           ("heads",)),
                      (self.num_heads,), self.param_dtype)
    shift = self.param("shift", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("heads",)),
                       (self.num_heads,), self.param_dtype)
    gain, shift = nn.dtypes.promote_dtype(gain, shift, dtype=self.dtype)
    return {"gain": gain, "shift": shift}


@register_params("latte")
class LatteParams(OpParams):
  """Latent vectors w_l of Latte (Latent Attention for Linear Time Transformers, Dolga et al.
  2024): `op_args["num_latents"]` per head, initialised N(0, 1) so that s·q·w_l (s = 1/√d) is
  O(1). Returns `{"latents": [num_heads, num_latents, head_dim]}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    num_latents = (self.op_args or {}).get("num_latents")
    if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 1:
      raise ValueError(
          f"op 'latte' needs op_args['num_latents'], a positive int, got {num_latents!r}")
    latents = self.param(
        "latents",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ("heads", "latents", "head_dim")),
        (self.num_heads, num_latents, self.head_dim), self.param_dtype)
    (latents,) = nn.dtypes.promote_dtype(latents, dtype=self.dtype)
    return {"latents": latents}


@register_params("focused_linear")
class FocusedLinearParams(OpParams):
  """Weights of focused linear attention (FLatten Transformer, Han et al. 2023).

  - `dwc_kernel`, `dwc_bias`: the rank-restoring depthwise convolution of V, shared across
    heads as in the official code: `[k, 1, head_dim]` over the sequence, or `[k, k, 1, head_dim]`
    when `op_args["grid"] = (height, width)` (image tokens); `k = op_args["dwc_kernel_size"]`,
    5 by default as the paper. PyTorch's Conv default init (U(±1/√fan_in)), zero bias.
  - `feature_scale`: the learnable per-channel scale s of the focused map, `[num_kv_heads,
    head_dim]`, stored as a zero-initialised parameter and returned through softplus (ln 2 at
    init), as the paper.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key
    op_args = dict(self.op_args or {})
    size = op_args.get("dwc_kernel_size", 5)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(f"op_args['dwc_kernel_size'] must be a positive int, got {size!r}")
    image = op_args.get("grid") is not None
    spatial, names = ((size, size), ("conv_height", "conv_width")) if image else (
        (size,), ("conv_width",))
    value_dim = value.shape[-1]
    kernel = self.param(
        "dwc_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            names + (None, "head_dim")),
        spatial + (1, value_dim), self.param_dtype)
    bias = self.param(
        "dwc_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "head_dim")),
        (1, value_dim), self.param_dtype)
    scale = self.param(
        "feature_scale",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("kv_heads", "head_dim")),
        (self.num_kv_heads, self.head_dim), self.param_dtype)
    kernel, bias, scale = nn.dtypes.promote_dtype(kernel, bias, scale, dtype=self.dtype)
    return {"dwc_kernel": kernel, "dwc_bias": bias, "feature_scale": nn.softplus(scale)}
