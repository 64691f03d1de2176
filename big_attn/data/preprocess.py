"""Per-example and per-batch image preprocessing in NumPy (runs in grain's reader threads).

Images enter as `[h, w, c]` uint8 (0..255) or float (already in [0, 1]) and leave as float32
in [-1, 1] (big_vision's `value_range(-1, 1)`).
"""
from __future__ import annotations

import functools
import math

import numpy as np


def to_unit_float(image: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 0..1; float images are taken to be in [0, 1] already."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
  """[0, 1] -> [-1, 1]."""
  return image * 2.0 - 1.0


@functools.lru_cache(maxsize=256)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size]` linear-interpolation weights (half-pixel centres, as jax.image.resize).

  The triangle kernel is widened by the scale when shrinking (antialiasing); rows sum to 1.
  """
  scale = in_size / out_size
  centres = (np.arange(out_size) + 0.5) * scale - 0.5
  support = max(scale, 1.0)
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centres[:, None]) / support)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a float `[h, w, c]` image to `size`."""
  h, w = image.shape[:2]
  if (h, w) == tuple(size):
    return image
  rows = np.tensordot(_resize_weights(h, size[0]), image, axes=([1], [0]))  # [H, w, c]
  out = np.tensordot(rows, _resize_weights(w, size[1]), axes=([1], [1]))  # [H, c, W]
  return np.ascontiguousarray(out.transpose(0, 2, 1))


def resize_small(image: np.ndarray, smaller_size: int) -> np.ndarray:
  """Resize keeping the aspect ratio so that the shorter side is `smaller_size`."""
  h, w = image.shape[:2]
  ratio = smaller_size / min(h, w)
  return resize(image, (max(smaller_size, round(h * ratio)), max(smaller_size, round(w * ratio))))


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def pad_and_random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad by `padding` on every side, then crop back to the original size at random."""
  if padding <= 0:
    return image
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + h, left:left + w]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, *,
                        area_min: float = 0.05, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        attempts: int = 10) -> np.ndarray:
  """Inception crop: a random area fraction in [area_min, 1] and aspect ratio, resized to size.

  Falls back to the central square crop when no sampled box fits in `attempts` tries.
  """
  h, w = image.shape[:2]
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    area = h * w * rng.uniform(area_min, 1.0)
    aspect = math.exp(rng.uniform(*log_ratio))
    ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
    if 0 < ch <= h and 0 < cw <= w:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return resize(image[top:top + ch, left:left + cw], (size, size))
  return resize(central_crop(image, min(h, w)), (size, size))


def mixup(batch: dict[str, np.ndarray], alpha: float, rng: np.random.Generator):
  """Mixup (Zhang et al., mixup: Beyond Empirical Risk Minimization), as big_vision.

  One λ ~ Beta(α, α) per batch, λ := max(λ, 1 - λ); image = λ·x + (1 - λ)·roll(x, 1) and
  labels likewise (so mixed labels still sum to 1); the integer `label` keeps the dominant
  example's class.
  """
  lam = rng.beta(alpha, alpha)
  lam = np.float32(max(lam, 1.0 - lam))
  out = dict(batch)
  for key in ("image", "labels"):
    out[key] = lam * batch[key] + (1 - lam) * np.roll(batch[key], 1, axis=0)
  return out
