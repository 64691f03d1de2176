"""The embedded default data set: scikit-learn's handwritten digits (UCI optdigits test set).

1,797 grey 8x8 images, values 0..16, 10 classes. A fixed, stratified split holds out 300
images as the test split: the images are ordered by (class, a RandomState(0) permutation) and
every sixth is held out, which leaves 1,497 for training, whatever the library versions.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
NUM_EXAMPLES = {"train": 1497, "test": 300}
_HOLD_OUT_EVERY = 6


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1] in [0, 1]
  return images, digits.target.astype(np.int32)


@functools.lru_cache(maxsize=2)
def split_indices(split: str) -> np.ndarray:
  """Sorted indices into `load_digits()` of the "train" or "test" split."""
  if split not in NUM_EXAMPLES:
    raise ValueError(f"digits has splits {tuple(NUM_EXAMPLES)}, got split={split!r}")
  _, labels = _load()
  perm = np.random.RandomState(0).permutation(len(labels))
  order = perm[np.argsort(labels[perm], kind="stable")]
  held_out = np.zeros(len(labels), bool)
  held_out[order[::_HOLD_OUT_EVERY]] = True
  return np.flatnonzero(held_out if split == "test" else ~held_out)


class DigitsSource:
  """Random-access source of one split: `{"image": float32 [8, 8, 1] in [0, 1], "label": int}`."""

  def __init__(self, split: str):
    images, labels = _load()
    idx = split_indices(split)
    self._images, self._labels = images[idx], labels[idx]

  @property
  def images(self) -> np.ndarray:
    """All images of the split, float32 `[n, 8, 8, 1]` in [0, 1]."""
    return self._images

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"DigitsSource(num_examples={len(self)})"
