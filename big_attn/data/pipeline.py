"""grain input pipelines: `get_dataset(input_config, ...)` and `dataset_info(input_config)`.

    ds = get_dataset(config.input, split="train", batch_size=128, seed=0, train=True,
                     rows=slice(0, 64), start_batch=step)
    batch = next(iter(ds))  # {"image", "labels", "label", "mask"}: rows 0..63 of global batch
                            # `step`; the order depends on the seed and batch size only

`input_config` (a ConfigDict or dict; absent keys take the defaults of the data set):
  name: "digits" (embedded, scikit-learn's 8x8 digits) or "tfds:NAME" ("tfds:cifar10",
    "tfds:imagenet2012", ...; ArrayRecord data prepared in `data_dir`, never downloaded).
  data_dir: the TFDS data directory (None: TFDS's default).
  image_size: output height = width (digits 32, cifar 32, imagenet2012 224).
  channels: 3 repeats a grey image to RGB (digits have 1); "derived" stacks a grey image with
    its horizontal and vertical gradients (central differences, x2 so that each lies in
    [-1, 1]): three channels that differ, for channel-wise models (ChannelViT).
  augment: crop_padding (zero-pad then random crop; digits 2, cifar 4), flip (random horizontal
    flip; off for digits), inception_crop (random resized crop, imagenet2012's default) with
    area_min (0.05).
  mixup: Beta(α, α) parameter of batch-level mixup in training; 0 turns it off.
  train_split, test_split: split names or TFDS slices ("train[:90%]"); the test split is
    "validation" for imagenet2012 and "test" otherwise.
  num_threads, prefetch: grain reader threads and the number of examples read ahead, for the
    per-example pipelines (TFDS data, inception crops). Digits batches are made whole with
    NumPy in the thread that reads them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np

from big_attn.data import batching, digits, preprocess, random_streams, tfds_source

_DEFAULTS = {
    "digits": dict(image_size=32, crop_padding=2, flip=False, inception_crop=False),
    "tfds:cifar10": dict(image_size=32, crop_padding=4, flip=True, inception_crop=False),
    "tfds:cifar100": dict(image_size=32, crop_padding=4, flip=True, inception_crop=False),
    "tfds:imagenet2012": dict(image_size=224, crop_padding=0, flip=True, inception_crop=True,
                              test_split="validation"),
}
_GENERIC = dict(crop_padding=0, flip=True, inception_crop=False)
_AUGMENT_KEYS = ("crop_padding", "flip", "inception_crop", "area_min")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if cfg is None:
    return default
  value = cfg.get(key, default)
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The input config with the data set's defaults filled in and every value checked."""
  name: str
  data_dir: str | None
  image_size: int
  channels: int | str | None
  crop_padding: int
  flip: bool
  inception_crop: bool
  area_min: float
  mixup: float
  train_split: str
  test_split: str
  num_threads: int
  prefetch: int

  @classmethod
  def parse(cls, cfg: Any) -> _Spec:
    name = _get(cfg, "name", "digits")
    if not isinstance(name, str) or not (name == "digits" or name.startswith("tfds:")):
      raise ValueError("config.input.name must be 'digits' or 'tfds:NAME' (e.g. 'tfds:cifar10'), "
                       f"got {name!r}")
    defaults = dict(_DEFAULTS.get(name, _GENERIC))
    augment = _get(cfg, "augment", {})
    unknown = sorted(set(augment.keys()) - set(_AUGMENT_KEYS))
    if unknown:
      raise ValueError(f"unknown config.input.augment keys {unknown}; expected some of "
                       f"{_AUGMENT_KEYS}")
    image_size = _get(cfg, "image_size", defaults.get("image_size"))
    if not isinstance(image_size, int) or image_size <= 0:
      raise ValueError(f"config.input.image_size must be a positive int, got {image_size!r}"
                       + (" (no default for this data set)" if image_size is None else ""))
    channels = _get(cfg, "channels")
    if channels not in (None, 1, 3, "derived"):
      raise ValueError(f"config.input.channels must be 1, 3 or 'derived', got {channels!r}")
    spec = cls(
        name=name, data_dir=_get(cfg, "data_dir"), image_size=image_size, channels=channels,
        crop_padding=_get(augment, "crop_padding", defaults["crop_padding"]),
        flip=bool(_get(augment, "flip", defaults["flip"])),
        inception_crop=bool(_get(augment, "inception_crop", defaults["inception_crop"])),
        area_min=float(_get(augment, "area_min", 0.05)),
        mixup=float(_get(cfg, "mixup", 0.0)),
        train_split=_get(cfg, "train_split", "train"),
        test_split=_get(cfg, "test_split", defaults.get("test_split", "test")),
        num_threads=_get(cfg, "num_threads", 4), prefetch=_get(cfg, "prefetch", 8))
    if not isinstance(spec.crop_padding, int) or spec.crop_padding < 0:
      raise ValueError(f"config.input.augment.crop_padding must be an int >= 0, got "
                       f"{spec.crop_padding!r}")
    if not 0.0 < spec.area_min <= 1.0:
      raise ValueError(f"config.input.augment.area_min must be in (0, 1], got {spec.area_min}")
    if spec.mixup < 0:
      raise ValueError(f"config.input.mixup must be >= 0 (0 = off), got {spec.mixup}")
    for key in ("num_threads", "prefetch"):
      if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
        raise ValueError(f"config.input.{key} must be a positive int, got {getattr(spec, key)!r}")
    return spec

  @property
  def tfds_name(self) -> str:
    return self.name[len("tfds:"):]

  def split_name(self, split: str) -> str:
    """"train"/"test" -> the configured split; any other name is passed through."""
    return {"train": self.train_split, "test": self.test_split}.get(split, split)

  def source(self, split: str):
    if self.name == "digits":
      return digits.DigitsSource(self.split_name(split))
    return tfds_source.TfdsSource(self.tfds_name, self.split_name(split), self.data_dir)


class _Preprocess:
  """Example `{"image", "label"}` -> `{"image", "labels", "label", "mask"}`.

  Augmented with `rng` in training; called without one (deterministic) for evaluation.
  """

  def __init__(self, spec: _Spec, num_classes: int):
    self._spec, self._num_classes = spec, num_classes

  def __call__(self, element, rng: np.random.Generator | None = None):
    spec, size, train = self._spec, self._spec.image_size, rng is not None
    image = _unit_image(element["image"])
    if train and spec.inception_crop:
      image = preprocess.random_resized_crop(image, size, rng, area_min=spec.area_min)
    elif spec.inception_crop:
      image = preprocess.central_crop(preprocess.resize_small(image, round(size * 8 / 7)), size)
    else:
      image = preprocess.resize(image, (size, size))
    if train:
      image = preprocess.pad_and_random_crop(image, spec.crop_padding, rng)
      if spec.flip and rng.random() < 0.5:
        image = image[:, ::-1]
    label = np.int32(element["label"])
    return {"image": _finish_image(spec, image),
            "labels": np.eye(self._num_classes, dtype=np.float32)[label],
            "label": label,
            "mask": np.bool_(element.get("mask", True))}


def _unit_image(image) -> np.ndarray:
  """Float32 `[h, w, c]` in [0, 1]."""
  image = preprocess.to_unit_float(image)
  return image[..., None] if image.ndim == 2 else image


def _finish_image(spec: _Spec, image: np.ndarray) -> np.ndarray:
  """`[H, W, c]` in [0, 1] -> float32 `[H, W, channels]` in [-1, 1]."""
  if spec.channels == "derived":
    if image.shape[-1] != 1:
      raise ValueError(f"config.input.channels='derived' needs grey images, got "
                       f"{image.shape[-1]} channels")
    gy, gx = np.gradient(image[..., 0])
    return np.ascontiguousarray(np.concatenate(
        [preprocess.normalize(image), 2 * gx[..., None], 2 * gy[..., None]], -1), np.float32)
  if spec.channels == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(preprocess.normalize(image), np.float32)


class _ArrayBatches:
  """Whole batches of an in-memory source (digits, without inception crop), the same values as
  `_Preprocess` per example (and `_Mixup`) at a fraction of the cost.

  The deterministic part (unit float, resize, channels, [-1, 1]) is computed once per image and
  the zero padding of the random crop once per split (as -1, the normalised 0); a batch is then
  one gather of its crops (flips as reversed column indices). Data order and each example's
  random draws are those of the per-example pipeline (grain's shuffled, repeated index stream
  and its `random_map` Philox stream of the example's global position), computed a whole epoch
  or batch at a time (`random_streams`).
  """

  def __init__(self, spec: _Spec, source, num_classes: int, *, batch_size: int, seed: int,
               train: bool):
    self._spec, self._num_classes, self._batch_size = spec, num_classes, batch_size
    size = spec.image_size
    images = np.stack([_finish_image(spec, preprocess.resize(_unit_image(image), (size, size)))
                       for image in source.images])
    self._pad = spec.crop_padding if train else 0
    pad = ((0, 0), (self._pad, self._pad), (self._pad, self._pad), (0, 0))
    self._padded = np.pad(images, pad, constant_values=np.float32(preprocess.normalize(0.0)))
    self._labels, self._train, self._seed = source.labels, train, seed
    self._mixup = spec.mixup if train else 0.0
    self._orders: dict[int, np.ndarray] = {}  # the epochs in use (a batch may span two)
    if train:
      self._key = np.random.Philox(batching.seed(seed, 1)).state["state"]["key"]

  def _order(self, positions: np.ndarray) -> np.ndarray:
    """The source indices at global positions `positions` of the shuffled, repeated stream."""
    epochs, offsets = np.divmod(positions, len(self._labels))
    index = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs).tolist():
      if epoch not in self._orders:
        self._orders = {e: o for e, o in self._orders.items() if e > epoch - 2}
        self._orders[epoch] = random_streams.shuffle_order(
            len(self._labels), batching.seed(self._seed, 0), epoch)
      here = epochs == epoch
      index[here] = self._orders[epoch][offsets[here]]
    return index

  def _draw_one(self, position: int) -> tuple[np.ndarray, bool]:
    """Crop offsets and flip of one example, drawn by NumPy from its Philox stream."""
    rng = np.random.Generator(np.random.Philox(key=self._key))
    state = rng.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, position], np.uint64)
    rng.bit_generator.state = state
    offsets = rng.integers(0, 2 * self._pad + 1, size=2) if self._pad else np.zeros(2, int)
    return offsets, bool(self._spec.flip and rng.random() < 0.5)

  def _draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop offsets `[n, 2]` and flips `[n]`: `integers(0, 2 * pad + 1, size=2)` then
    `random() < 0.5` of each position's stream, as `_Preprocess` draws them."""
    n = len(positions)
    offsets, flips = np.full((n, 2), self._pad), np.zeros(n, bool)
    if not (self._pad or self._spec.flip):
      return offsets, flips
    words = random_streams.philox_first_block(self._key, positions)
    exact = np.ones(n, bool)
    if self._pad:
      for axis, half in enumerate(random_streams.split_uint32(words[:, 0])):
        offsets[:, axis], exact_axis = random_streams.bounded_uint32(half, 2 * self._pad + 1)
        exact &= exact_axis
    if self._spec.flip:
      flips = random_streams.unit_double(words[:, 1 if self._pad else 0]) < 0.5
    for i in np.flatnonzero(~exact):  # NumPy rejected a draw and took more: let it draw
      offsets[i], flips[i] = self._draw_one(int(positions[i]))
    return offsets, flips

  def _examples(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    n, size = len(positions), self._spec.image_size
    if self._train:
      index, mask = self._order(positions), np.ones(n, bool)
      offsets, flips = self._draws(positions)
    else:
      mask = positions < len(self._labels)
      index = np.where(mask, positions, 0)
      offsets, flips = np.zeros((n, 2), int), np.zeros(n, bool)
    rows = offsets[:, :1] + np.arange(size)
    cols = offsets[:, 1:] + np.arange(size)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    label = self._labels[index].astype(np.int32)
    labels = np.zeros((n, self._num_classes), np.float32)
    labels[np.arange(n), label] = 1.0
    return {"image": self._padded[index[:, None, None], rows[:, :, None], cols[:, None, :]],
            "labels": labels, "label": label, "mask": mask}

  def __call__(self, b: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    first = b * self._batch_size
    if self._mixup <= 0:
      return self._examples(first + rows)
    # Row r is mixed with row r - 1 (mod batch) of the same global batch, as `_Mixup`.
    before = np.concatenate([[(rows[0] - 1) % self._batch_size], rows])
    examples = self._examples(first + before)
    rng = np.random.default_rng(batching.seed(self._seed, 3, b))
    mixed = preprocess.mixup(examples, self._mixup, rng)  # row i mixed with row i - 1
    return {key: value[1:] for key, value in mixed.items()}


class _Mixup:
  """Row r of global batch b mixed with row r - 1 (mod batch) of the same global batch, with one
  λ per global batch: `preprocess.mixup` of the whole batch, computed for one row."""

  def __init__(self, alpha: float, batch_size: int, seed: int):
    self._alpha, self._batch_size, self._seed = alpha, batch_size, seed

  def __call__(self, b: int, r: int, stream):
    first = b * self._batch_size
    row, previous = stream[first + r], stream[first + (r - 1) % self._batch_size]
    pair = {key: np.stack([row[key], previous[key]]) for key in ("image", "labels")}
    rng = np.random.default_rng(batching.seed(self._seed, 3, b))
    mixed = preprocess.mixup(pair, self._alpha, rng)  # row 0 mixed with row 1 (its roll)
    return dict(row, image=mixed["image"][0], labels=mixed["labels"][0])


class _Padded:
  """An eval split padded to whole batches: the examples of `source` (`mask=True`), then copies
  of its first (`mask=False`) up to `length`."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    real = index < len(self._source)
    element = dict(self._source[index if real else 0])
    element["mask"] = real
    return element


def _num_classes(spec: _Spec) -> int:
  if spec.name == "digits":
    return digits.NUM_CLASSES
  return tfds_source.features(spec.tfds_name, spec.data_dir)["num_classes"]


def dataset_info(input_config: Any) -> dict[str, Any]:
  """`dict(num_classes, image_shape=(H, W, C), num_examples={"train": n, "test": m})`."""
  spec = _Spec.parse(input_config)
  if spec.name == "digits":
    channels = 1
  else:
    channels = tfds_source.features(spec.tfds_name, spec.data_dir)["channels"]
  if spec.channels in (3, "derived"):
    channels = 3
  return dict(num_classes=_num_classes(spec),
              image_shape=(spec.image_size, spec.image_size, channels),
              num_examples={s: len(spec.source(s)) for s in ("train", "test")})


def get_dataset(input_config: Any, *, split: str, batch_size: int, seed: int, train: bool,
                rows: slice | None = None, start_batch: int = 0) -> grain.IterDataset:
  """The batched input pipeline of one process (`big_attn.data.batching`).

  Args:
    input_config: see the module docstring.
    split: "train", "test" (the configured train/test splits) or a split name of the source.
    batch_size: the global batch size.
    seed: shuffling and augmentation seed (train); the same seed gives the same batches.
    train: shuffled per epoch, repeated forever, augmented (each example with its own random
      stream, keyed by its position in the global order), mixed up if configured, remainder
      dropped. Otherwise one ordered pass without augmentation whose last batch is padded, with
      `mask` False on the padding.
    rows: the rows of each global batch this process reads (None: all).
    start_batch: the first global batch (training resumes at its step).

  Returns:
    A `grain.IterDataset` of `{"image": float32 [b, H, W, C] in [-1, 1], "labels": float32
    [b, num_classes], "label": int32 [b], "mask": bool [b]}` (b = the rows read).
  """
  rows = batching.check_rows(rows, batch_size)
  spec = _Spec.parse(input_config)
  num_classes = _num_classes(spec)
  source = spec.source(split)
  read = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch)

  if train and len(source) < batch_size:
    raise ValueError(f"split {split!r} has {len(source)} examples, fewer than the batch of "
                     f"{batch_size}")
  if spec.name == "digits" and not spec.inception_crop:
    make = _ArrayBatches(spec, source, num_classes, batch_size=batch_size, seed=seed,
                         train=train)
    # A batch costs a few vectorised NumPy calls: it is made in the reading thread (`main`'s
    # prefetch thread), since grain's reader threads would cost more than they save.
    return batching.made_batches(
        make, batch_size=batch_size, rows=rows,
        read=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
        start_batch=start_batch if train else 0,
        num_batches=None if train else math.ceil(len(source) / batch_size))
  preprocess_fn = _Preprocess(spec, num_classes)
  if train:
    stream = grain.MapDataset.source(source).shuffle(seed=batching.seed(seed, 0)).repeat()
    stream = stream.random_map(preprocess_fn, seed=batching.seed(seed, 1))
    combine = _Mixup(spec.mixup, batch_size, seed) if spec.mixup > 0 else None
    return batching.batches(stream, batch_size=batch_size, rows=rows, read=read,
                            start_batch=start_batch, combine=combine)

  num_batches = math.ceil(len(source) / batch_size)
  padded = _Padded(source, num_batches * batch_size)
  stream = grain.MapDataset.source(padded).map(preprocess_fn)
  return batching.batches(stream, batch_size=batch_size, rows=rows, read=read,
                          num_batches=num_batches)
