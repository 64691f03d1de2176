"""Position embeddings for 2-D token grids: learned, or fixed 2-D sine-cosine (as big_vision)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

KINDS = ("learn", "sincos2d")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Any = jnp.float32) -> jnp.ndarray:
  """Fixed `[h * w, width]` embedding (MoCo v3 / "Better plain ViT baselines").

  With ω_k = temperature^(-k / (width/4 - 1)), k < width/4, the token at row y, column x gets
  [sin(x ω), cos(x ω), sin(y ω), cos(y ω)].
  """
  if width % 4:
    raise ValueError(f"width must be a multiple of 4 for sincos2d position embeddings, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = 1. / (temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1)))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)


class PositionEmbedding(nn.Module):
  """`[h * w, width]` position embedding of a `seqshape = (h, w)` token grid, added by the caller.

  Attributes:
    kind: "learn" (a parameter `pos_embedding`, logical axes `("position", "embed")`, normal
      init with stddev 1/sqrt(width)) or "sincos2d" (fixed, no parameter).
  """
  kind: str = "learn"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, seqshape: tuple[int, int], width: int):
    h, w = seqshape
    if self.kind == "learn":
      init = nn.initializers.normal(stddev=1 / np.sqrt(width))
      pe = self.param("pos_embedding", nn.with_logical_partitioning(init, ("position", "embed")),
                      (h * w, width), self.param_dtype)
      return jnp.asarray(pe, self.dtype)
    if self.kind == "sincos2d":
      return posemb_sincos_2d(h, w, width, dtype=self.dtype)
    raise ValueError(f"unknown position embedding {self.kind!r}; expected one of {KINDS}")


ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3")


def rope_frequencies(dim: int, base: float = 10_000., scaling: Any = None,
                     positions: jnp.ndarray | None = None) -> jnp.ndarray:
  """The `[dim/2]` float32 RoPE frequencies ω_i = base^(-2i / dim), optionally rescaled.

  `scaling` is None or a dict with `rope_type` (the names and keys of Hugging Face
  transformers' `rope_parameters`) and `factor` s:
  - "linear" (position interpolation, Chen et al. 2023): ω / s.
  - "dynamic" (dynamic NTK, with `max_position_embeddings` M): the base becomes
    base·(s·L/M − (s − 1))^(dim/(dim−2)) with L = max(max(positions) + 1, M), the longest
    position of the call (transformers keeps the longest seen so far: the same in generation).
  - "llama3" (Llama 3.1; `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings` C): wavelengths above C/low_freq_factor are divided by s,
    those below C/high_freq_factor kept, the band between interpolated smoothly.
  """
  exponents = jnp.arange(dim // 2, dtype=jnp.float32) * 2.0 / dim
  if scaling is None:
    return base ** -exponents
  kind = scaling.get("rope_type") if hasattr(scaling, "get") else None
  if kind not in ROPE_SCALING_TYPES:
    raise ValueError(f"rope_scaling must be None or a dict with rope_type in "
                     f"{ROPE_SCALING_TYPES}, got {scaling!r}")
  factor = float(scaling["factor"])
  if kind == "linear":
    return base ** -exponents / factor
  if kind == "dynamic":
    max_len = float(scaling["max_position_embeddings"])
    length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_len)
    base = base * (factor * length / max_len - (factor - 1)) ** (dim / (dim - 2))
    return base ** -exponents
  freqs = base ** -exponents
  context = float(scaling["original_max_position_embeddings"])
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  wavelength = 2 * np.pi / freqs
  smooth = (context / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * freqs / factor + smooth * freqs
  return jnp.where(wavelength > context / low, freqs / factor,
                   jnp.where(wavelength < context / high, freqs, smoothed))


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10_000.,
               scaling: Any = None) -> jnp.ndarray:
  """Rotary position embedding (Su et al. 2021, "RoFormer") of `x: [batch, seq, heads, dim]`.

  With ω_i = base^(-2i / dim), i < dim/2, and the halves x = [x1, x2], the token at position p
  becomes [x1 cos(p ω) - x2 sin(p ω), x2 cos(p ω) + x1 sin(p ω)] (computed in float32). The
  positions are explicit (`[batch, seq]` or `[seq]` ints), so any token order works. `scaling`
  rescales ω for longer contexts (`rope_frequencies`).
  """
  if x.ndim != 4 or x.shape[-1] % 2:
    raise ValueError(f"apply_rope needs [batch, seq, heads, dim] with an even dim, got shape "
                     f"{x.shape}")
  if positions.shape not in (x.shape[:2], x.shape[1:2]):
    raise ValueError(f"positions must have shape [batch, seq] = {x.shape[:2]} or [seq], got "
                     f"{positions.shape}")
  freqs = rope_frequencies(x.shape[-1], base, scaling, positions)
  angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [b|, t, 1, half]
  if angles.ndim == 3:
    angles = angles[None]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
