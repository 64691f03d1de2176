"""`big_attn.data.random_streams` against grain's and NumPy's own numbers, bit for bit."""
import grain
import numpy as np
import pytest

from big_attn import data
from big_attn.data import pipeline, random_streams


@pytest.mark.parametrize("length,seed", [(1, 3), (2, 0), (17, 2**32 - 2), (1497, 11),
                                         (5000, 7), (70001, 1)])
def test_shuffle_order_is_grains(length, seed):
  """Three epochs of `MapDataset.range(length).shuffle(seed).repeat()` (the seed wraps past
  2**32 - 1), through the table (short lengths) and the direct cycle walk (long ones)."""
  stream = grain.MapDataset.range(length).shuffle(seed=seed).repeat()
  probe = np.random.default_rng(0)
  for epoch in range(3):
    order = random_streams.shuffle_order(length, seed, epoch)
    positions = (np.arange(length) if length <= 1497
                 else np.sort(probe.choice(length, 200, replace=False)))
    want = [stream[epoch * length + int(i)] for i in positions]
    np.testing.assert_array_equal(order[positions], want)
    if length <= 5000:
      np.testing.assert_array_equal(np.sort(order), np.arange(length))


def _numpy_stream(key, position):
  """grain's `random_map` generator of `position`."""
  bits = np.random.Philox(key=key)
  state = bits.state
  state["state"]["counter"] = np.array([0, 0, 0, position], np.uint64)
  bits.state = state
  return np.random.Generator(bits)


def test_philox_block_and_draws_are_numpys():
  key = np.random.Philox(12345).state["state"]["key"]
  positions = np.array([0, 1, 2, 63, 1000, 2**40 + 3, 2**63 + 5], np.uint64)
  words = random_streams.philox_first_block(key, positions)
  for row, position in zip(words, positions):
    np.testing.assert_array_equal(row, _numpy_stream(key, position).bit_generator.random_raw(4))
  positions = np.arange(500)
  words = random_streams.philox_first_block(key, positions)
  for bound in (2, 5, 9, 1000003):
    draws = [random_streams.bounded_uint32(half, bound)
             for half in random_streams.split_uint32(words[:, 0])]
    coins = random_streams.unit_double(words[:, 1])
    for p in positions:
      rng = _numpy_stream(key, p)
      assert [int(d[0][p]) for d in draws] == list(rng.integers(0, bound, size=2))
      assert all(d[1][p] for d in draws)
      assert coins[p] == rng.random()


def test_bounded_draw_flags_numpys_rejections():
  # Lemire's method rejects a word whose product with the bound leaves less than
  # (2**32 - bound) % bound in its low half: for bound 5, only the word 0.
  value, exact = random_streams.bounded_uint32(np.array([0, 1, 2**32 - 1], np.uint64), 5)
  np.testing.assert_array_equal(exact, [False, True, True])
  np.testing.assert_array_equal(value, [0, 0, 4])


def test_digits_batch_redraws_rejected_rows_with_numpy(monkeypatch):
  """A row whose vectorised draw NumPy would have rejected is drawn by NumPy itself: with every
  other row marked rejected the batch is unchanged (no word here is really rejected)."""
  cfg = dict(name="digits", image_size=8, augment=dict(crop_padding=2, flip=True))
  kwargs = dict(split="train", batch_size=16, seed=4, train=True, start_batch=93)
  want = next(iter(data.get_dataset(cfg, **kwargs)))
  bounded = random_streams.bounded_uint32

  def reject_odd_rows(words, bound):
    value, exact = bounded(words, bound)
    return value, exact & (np.arange(len(exact)) % 2 == 0)

  monkeypatch.setattr(random_streams, "bounded_uint32", reject_odd_rows)
  calls = []
  batches = pipeline._ArrayBatches  # pylint: disable=protected-access
  draw_one = batches._draw_one  # pylint: disable=protected-access

  def counted(self, position):
    calls.append(position)
    return draw_one(self, position)

  monkeypatch.setattr(batches, "_draw_one", counted)
  got = next(iter(data.get_dataset(cfg, **kwargs)))
  assert len(calls) == 8
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
