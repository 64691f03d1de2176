"""grain input pipelines: digits split, batches, determinism, sharding, eval padding, resume."""
import collections
import hashlib
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from big_attn import data
from big_attn.data import batching, digits, pipeline, preprocess

NO_AUGMENT = {"crop_padding": 0, "flip": False}


def _cfg(**kw):
  return dict(dict(name="digits", image_size=16, num_threads=2, prefetch=2), **kw)


def _take(ds, n, it=None):
  it = iter(ds) if it is None else it
  return [next(it) for _ in range(n)]


def _keys(images):
  """Hashable identity of each image (rounded, so that float noise does not matter)."""
  return [np.round(im, 4).tobytes() for im in np.asarray(images)]


def _expected_eval_images(split, size):
  """The split's images via sklearn and jax.image.resize (independent of the pipeline)."""
  d = load_digits()
  idx = digits.split_indices(split)
  images = jnp.asarray(d.images[idx] / 16.0, jnp.float32)[..., None]
  resized = jax.image.resize(images, (len(idx), size, size, 1), "bilinear", antialias=True)
  return np.asarray(resized) * 2 - 1, d.target[idx]


def test_digits_split_fixed_stratified_disjoint():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert len(train) == 1497 and len(test) == 300
  assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
  counts = np.bincount(load_digits().target[test], minlength=10)
  assert counts.min() >= 29 and counts.max() <= 31
  info = data.dataset_info(_cfg(image_size=32, channels=3))
  assert info == dict(num_classes=10, image_shape=(32, 32, 3),
                      num_examples={"train": 1497, "test": 300})


def test_train_batch_shapes_dtypes_normalisation():
  ds = data.get_dataset(_cfg(), split="train", batch_size=8, seed=0, train=True)
  for batch in _take(ds, 2):
    assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (8, 10) and batch["labels"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["mask"].shape == (8,) and batch["mask"].dtype == np.bool_ and batch["mask"].all()
    np.testing.assert_array_equal(batch["labels"].argmax(-1), batch["label"])
    np.testing.assert_array_equal(batch["labels"].sum(-1), 1.0)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0  # the digits' background
  rgb = _take(data.get_dataset(_cfg(channels=3), split="train", batch_size=4, seed=0,
                               train=True), 1)[0]["image"]
  assert rgb.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_same_seed_same_batches_other_seed_differs():
  make = lambda seed: data.get_dataset(_cfg(mixup=0.2), split="train", batch_size=8,
                                       seed=seed, train=True)
  a, b, c = _take(make(3), 3), _take(make(3), 3), _take(make(4), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(np.any(x["image"] != z["image"]) for x, z in zip(a, c))


def test_eval_covers_test_split_once_in_order_with_padding_mask():
  ds = data.get_dataset(_cfg(), split="test", batch_size=128, seed=0, train=False)
  batches = list(ds)
  assert len(batches) == 3 and all(b["image"].shape == (128, 16, 16, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(384) < 300)
  images = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  want_images, want_labels = _expected_eval_images("test", 16)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_allclose(images, want_images, atol=1e-5)
  # A second pass over the same data set gives the same batches.
  np.testing.assert_array_equal(list(ds)[1]["image"], batches[1]["image"])


def _concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("splits", [[(0, 24), (24, 48), (48, 72)], [(0, 5), (5, 72)]])
def test_eval_rows_of_processes_make_the_global_batches(splits):
  whole = list(data.get_dataset(_cfg(), split="test", batch_size=72, seed=0, train=False))
  parts = [list(data.get_dataset(_cfg(), split="test", batch_size=72, seed=0, train=False,
                                 rows=slice(*s))) for s in splits]
  assert {len(p) for p in parts} == {len(whole)}  # every process runs the same eval steps
  for b, batch in enumerate(whole):
    got = _concat([p[b] for p in parts])
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])
  want, _ = _expected_eval_images("test", 16)
  seen = collections.Counter(_keys(np.concatenate([b["image"][b["mask"]] for b in whole])))
  assert seen == collections.Counter(_keys(want))


def test_train_order_depends_on_seed_and_global_batch_only():
  """Rows read by 1, 2 or 3 "processes" (any split of the batch) make the same global batches,
  mixup and augmentation included, and a resume at batch s reads batch s."""
  cfg = _cfg(mixup=0.5, augment={"crop_padding": 2, "flip": True})
  make = lambda rows=None, start=0: data.get_dataset(  # pylint: disable=unnecessary-lambda-assignment
      cfg, split="train", batch_size=12, seed=1, train=True, rows=rows, start_batch=start)
  whole = _take(make(), 4)
  for splits in ([(0, 6), (6, 12)], [(0, 1), (1, 7), (7, 12)]):
    parts = [_take(make(slice(*s)), 4) for s in splits]
    for b in range(4):
      got = _concat([p[b] for p in parts])
      for key in whole[b]:
        np.testing.assert_array_equal(got[key], whole[b][key])
  resumed = _take(make(slice(3, 9), start=2), 2)
  for got, want in zip(resumed, whole[2:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key][3:9])


def test_train_epochs_cover_the_split_and_reshuffle():
  cfg = _cfg(augment=NO_AUGMENT)
  reference = collections.Counter(_keys(_expected_eval_images("train", 16)[0]))
  # 1497 examples: one global batch is exactly one epoch.
  epoch1, epoch2 = _take(data.get_dataset(cfg, split="train", batch_size=1497, seed=7,
                                          train=True, rows=slice(0, 1497)), 2)
  keys1, keys2 = _keys(epoch1["image"]), _keys(epoch2["image"])
  assert collections.Counter(keys1) == reference == collections.Counter(keys2)
  assert keys1 != keys2  # a new order each epoch
  assert keys1 != _keys(_expected_eval_images("train", 16)[0])  # shuffled


def test_mixup_labels_sum_to_one():
  ds = data.get_dataset(_cfg(mixup=1.0), split="train", batch_size=16, seed=0, train=True)
  for batch in _take(ds, 3):
    np.testing.assert_allclose(batch["labels"].sum(-1), 1.0, rtol=1e-6)
    assert batch["labels"].max(-1).min() >= 0.5 - 1e-6
    np.testing.assert_array_equal(batch["labels"].argmax(-1)[batch["labels"].max(-1) > 0.5],
                                  batch["label"][batch["labels"].max(-1) > 0.5])
  assert np.any((batch["labels"] > 0) & (batch["labels"] < 1))


_PINNED = {  # computed with the per-example pipeline before the batch-level digits path existed
    "default": ((dict(name="digits", num_threads=2, prefetch=2),
                 dict(split="train", batch_size=64, seed=0, train=True)),
                ["12a11ffe08a552b1", "0a57f4dd15c10eaa"]),
    "mixup_flip_rows_resume": (
        (_cfg(mixup=0.5, augment={"crop_padding": 2, "flip": True}),
         dict(split="train", batch_size=12, seed=1, train=True, rows=slice(3, 9), start_batch=2)),
        ["1b6172e66230ef61", "a181facd6b0b556f"]),
    "rgb_shrink_next_epoch": (
        (_cfg(image_size=6, channels=3, augment={"crop_padding": 1}),
         dict(split="train", batch_size=10, seed=5, train=True, rows=slice(2, 7),
              start_batch=150)),
        ["00f60793062b4739", "6ae5509872a23d02"]),
    "eval": ((_cfg(), dict(split="test", batch_size=128, seed=0, train=False)),
             ["a9f2992f75e9c0e9", "e6416d50003817bf", "dd59cfa27accc9d1"]),
}


def _digest(batch):
  digest = hashlib.sha256()
  for key in sorted(batch):
    value = np.ascontiguousarray(batch[key])
    digest.update(f"{key}{value.dtype}{value.shape}".encode() + value.tobytes())
  return digest.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(_PINNED))
def test_digits_batches_pinned_bit_for_bit(case):
  """Same seed, batch size, rows and start batch: the same bytes as the per-example pipeline
  (whose batches these digests are), and as that pipeline run now (`_Preprocess`, `_Mixup`)."""
  (cfg, kwargs), want = _PINNED[case]
  got = _take(data.get_dataset(cfg, **kwargs), len(want))
  assert [_digest(b) for b in got] == want
  if not kwargs["train"]:
    return
  # pylint: disable=protected-access
  spec = pipeline._Spec.parse(cfg)
  seed, batch_size = kwargs["seed"], kwargs["batch_size"]
  stream = grain.MapDataset.source(spec.source("train")).shuffle(seed=batching.seed(seed, 0))
  stream = stream.repeat().random_map(pipeline._Preprocess(spec, 10),
                                      seed=batching.seed(seed, 1))
  combine = pipeline._Mixup(spec.mixup, batch_size, seed) if spec.mixup > 0 else None
  # pylint: enable=protected-access
  per_example = _take(batching.batches(
      stream, batch_size=batch_size, rows=kwargs.get("rows"), read=grain.ReadOptions(),
      start_batch=kwargs.get("start_batch", 0), combine=combine), len(want))
  for batch, expected in zip(got, per_example):
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])
      assert batch[key].dtype == expected[key].dtype


def test_augmentation_flip_and_crop():
  rng = np.random.default_rng(0)
  image = rng.random((6, 6, 1)).astype(np.float32)
  cropped = preprocess.pad_and_random_crop(image, 2, rng)
  assert cropped.shape == image.shape
  # The crop is a translation of the zero-padded image.
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  assert any(np.array_equal(cropped, padded[i:i + 6, j:j + 6])
             for i in range(5) for j in range(5))
  # Flips: with flip on, some batch images are mirrored versions of the unflipped pipeline's.
  base = _take(data.get_dataset(_cfg(augment=NO_AUGMENT), split="train", batch_size=32,
                                seed=0, train=True), 1)[0]["image"]
  flip = _take(data.get_dataset(_cfg(augment={"crop_padding": 0, "flip": True}), split="train",
                                batch_size=32, seed=0, train=True), 1)[0]["image"]
  mirrored = [np.array_equal(f, b[:, ::-1]) and not np.array_equal(f, b)
              for f, b in zip(flip, base)]
  same = [np.array_equal(f, b) for f, b in zip(flip, base)]
  assert any(mirrored) and any(same) and all(m or s for m, s in zip(mirrored, same))


@pytest.mark.parametrize("shape,size", [((37, 29, 3), (16, 16)), ((8, 8, 1), (32, 24)),
                                        ((5, 40, 2), (9, 7))])
def test_resize_matches_jax_image_resize(shape, size):
  image = np.random.default_rng(0).random(shape).astype(np.float32)
  want = jax.image.resize(image, size + shape[2:], "bilinear", antialias=True)
  np.testing.assert_allclose(preprocess.resize(image, size), want, atol=1e-5)


def test_random_resized_crop_and_eval_crop():
  rng = np.random.default_rng(0)
  image = rng.random((50, 70, 3)).astype(np.float32)
  for _ in range(5):
    assert preprocess.random_resized_crop(image, 24, rng).shape == (24, 24, 3)
  small = preprocess.resize_small(image, 20)
  assert small.shape == (20, 28, 3)
  assert preprocess.central_crop(small, 16).shape == (16, 16, 3)


def test_bad_input_config():
  ok = dict(split="train", batch_size=8, seed=0, train=True)
  with pytest.raises(ValueError, match="'digits' or 'tfds:NAME'"):
    data.get_dataset(_cfg(name="mnist"), **ok)
  with pytest.raises(ValueError, match="augment keys"):
    data.get_dataset(_cfg(augment={"crop_pading": 2}), **ok)
  with pytest.raises(ValueError, match="image_size"):
    data.get_dataset(_cfg(image_size=0), **ok)
  with pytest.raises(ValueError, match="mixup"):
    data.get_dataset(_cfg(mixup=-1.0), **ok)
  with pytest.raises(ValueError, match="rows 4:9 must lie in the global batch of 8"):
    data.get_dataset(_cfg(), **ok, rows=slice(4, 9))
  with pytest.raises(TypeError, match="rows must be a slice"):
    data.get_dataset(_cfg(), **ok, rows=(0, 4))
  with pytest.raises(ValueError, match="start_batch"):
    data.get_dataset(_cfg(), **ok, start_batch=-1)
  with pytest.raises(ValueError, match="splits"):
    data.get_dataset(_cfg(), **dict(ok, split="validation"))


def test_missing_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"big_attn\[tfds\]"):
    data.dataset_info(_cfg(name="tfds:cifar10"))


def test_tfds_cifar10_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = dict(name="tfds:cifar10", data_dir=str(tmp_path), num_threads=2, prefetch=2)
  with tfds.testing.mock_data(num_examples=20):
    info = data.dataset_info(cfg)
    assert info == dict(num_classes=10, image_shape=(32, 32, 3),
                        num_examples={"train": 20, "test": 20})
    train = _take(data.get_dataset(cfg, split="train", batch_size=8, seed=0, train=True), 3)
    assert train[0]["image"].shape == (8, 32, 32, 3) and train[0]["labels"].shape == (8, 10)
    assert train[0]["image"].min() >= -1 and train[0]["image"].max() <= 1
    test = list(data.get_dataset(cfg, split="test", batch_size=8, seed=0, train=False))
    assert len(test) == 3 and sum(int(b["mask"].sum()) for b in test) == 20
    source = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path))
    want = np.stack([source[i]["image"] for i in range(20)]).astype(np.float32) / 127.5 - 1
    got = np.concatenate([b["image"] for b in test])[:20]
    np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="data_dir"):
    data.dataset_info(cfg)  # nothing prepared there, and nothing is downloaded


def test_tfds_imagenet_crops_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = dict(name="tfds:imagenet2012", data_dir=str(tmp_path), image_size=32, num_threads=2,
             prefetch=2)
  with tfds.testing.mock_data(num_examples=6):
    assert data.dataset_info(cfg)["num_classes"] == 1000
    batch = _take(data.get_dataset(cfg, split="train", batch_size=4, seed=0, train=True), 1)[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["labels"].shape == (4, 1000)
    test = list(data.get_dataset(cfg, split="test", batch_size=4, seed=0, train=False))
    assert len(test) == 2 and test[0]["image"].shape == (4, 32, 32, 3)


def test_tfds_unprepared_data_dir_raises_file_not_found(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  config = {"name": "tfds:cifar10", "data_dir": str(tmp_path), "image_size": 32}
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.dataset_info(config)
