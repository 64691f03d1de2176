"""grain's per-example randomness, computed for many examples at once with NumPy.

grain defines a run's data order and augmentation one index at a time: `MapDataset.shuffle`
permutes each epoch with a cycle-walking Simon cipher (`index_shuffle`, about 13 µs a call for
the digits' 1,497 examples), and `random_map` gives example p its own Philox4x64-10 stream
(counter `[0, 0, 0, p]`, a generator's state reset per example). The functions here return the
same numbers for whole epochs and batches; `tests/test_random_streams.py` compares them with
grain's and NumPy's own, index for index and bit for bit.
"""
from __future__ import annotations

import functools
import math

import numpy as np

_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_MIN_BLOCK_BITS = 16  # grain's kMinBlockSize
_ROUNDS = 4  # the rounds `MapDataset.shuffle` asks for


def _seed_seq_words(seed: int, count: int) -> list[int]:
  """`std::seed_seq{seed}.generate` of `count` 32-bit words ([rand.util.seedseq]'s algorithm)."""
  n, s, v = count, 1, [seed % 2**32]
  words = [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q = p + t
  m = max(s + 1, n)
  mix = lambda x: x ^ (x >> 27)  # pylint: disable=unnecessary-lambda-assignment
  for k in range(m):
    r1 = 1664525 * mix(words[k % n] ^ words[(k + p) % n] ^ words[(k - 1) % n]) % 2**32
    r2 = (r1 + (s if k == 0 else (k % n) + v[k - 1] if k <= s else k % n)) % 2**32
    words[(k + p) % n] = (words[(k + p) % n] + r1) % 2**32
    words[(k + q) % n] = (words[(k + q) % n] + r2) % 2**32
    words[k % n] = r2
  for k in range(m, m + n):
    r3 = 1566083941 * mix((words[k % n] + words[(k + p) % n] + words[(k - 1) % n]) % 2**32) % 2**32
    r4 = (r3 - k % n) % 2**32
    words[(k + p) % n] ^= r3
    words[(k + q) % n] ^= r4
    words[k % n] = r4
  return words


def _simon_encrypt(values: np.ndarray, keys: list[int], word_bits: int) -> np.ndarray:
  """grain's `simon_encrypt`: Feistel rounds of Simon's round function on words of
  `word_bits` bits (two rounds per pair of keys)."""
  w = _U64(word_bits)
  mask = _U64((1 << word_bits) - 1)

  def rotl(x, r):
    return ((x << _U64(r)) | (x >> (w - _U64(r)))) & mask

  def simon_f(x):
    return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

  left, right = (values >> w) & mask, values & mask
  for k1, k2 in zip(keys[::2], keys[1::2]):
    left = left ^ simon_f(right) ^ _U64(k1 & int(mask))
    right = right ^ simon_f(left) ^ _U64(k2 & int(mask))
  return (left << w) | right


def shuffle_order(length: int, seed: int, epoch: int) -> np.ndarray:
  """Epoch `epoch` of `grain.MapDataset.range(length).shuffle(seed=seed)` (repeated): the
  int64 array whose entry i is the dataset's element `epoch * length + i` minus
  `epoch * length`."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  max_index = length - 1
  if max_index == 0:
    return np.zeros(1, np.int64)
  bits = math.ceil(math.log2(max_index))
  bits = max(bits + bits % 2, _MIN_BLOCK_BITS)
  keys = _seed_seq_words((seed + epoch) % 2**32, _ROUNDS)
  domain = 1 << bits
  if domain > 16 * length:  # long walks: look the cipher up in a table of the whole domain
    encrypt = _simon_encrypt(np.arange(domain, dtype=_U64), keys, bits // 2).__getitem__
  else:
    encrypt = functools.partial(_simon_encrypt, keys=keys, word_bits=bits // 2)
  # Cycle walking: encrypt until the value falls inside [0, max_index].
  out = encrypt(np.arange(length, dtype=_U64))
  outside = np.flatnonzero(out > max_index)
  while outside.size:
    out[outside] = encrypt(out[outside])
    outside = outside[out[outside] > max_index]
  return out.astype(np.int64)


# Philox4x64-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), as NumPy's
# `np.random.Philox` computes it.
_PHILOX_M = (_U64(0xD2E7470EE14C6C93), _U64(0xCA5A826395121157))
_PHILOX_W = (_U64(0x9E3779B97F4A7C15), _U64(0xBB67AE8584CAA73B))


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The high and low 64 bits of the 128-bit products `a * b`."""
  a0, a1 = a & _MASK32, a >> _U64(32)
  b0, b1 = b & _MASK32, b >> _U64(32)
  low_low, high_low, low_high = a0 * b0, a1 * b0, a0 * b1
  cross = (low_low >> _U64(32)) + (high_low & _MASK32) + low_high
  high = (high_low >> _U64(32)) + (cross >> _U64(32)) + a1 * b1
  return high, (cross << _U64(32)) | (low_low & _MASK32)


def philox_first_block(key: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """The first four 64-bit outputs of grain's `random_map` stream for each position p: NumPy's
  `Philox(key=key)` with counter `[0, 0, 0, p]` (it increments the counter's first word before
  each block). `[len(positions), 4]` uint64."""
  with np.errstate(over="ignore"):
    k0, k1 = _U64(key[0]), _U64(key[1])
    positions = np.asarray(positions, dtype=_U64)
    c0 = np.ones_like(positions)
    c1 = np.zeros_like(positions)
    c2 = np.zeros_like(positions)
    c3 = positions
    for r in range(10):
      if r:
        k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
      high0, low0 = _mulhilo(_PHILOX_M[0], c0)
      high1, low1 = _mulhilo(_PHILOX_M[1], c2)
      c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
  return np.stack([c0, c1, c2, c3], axis=-1)


def bounded_uint32(words: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
  """NumPy's `Generator.integers(0, bound)` from 32-bit draws `words` (Lemire's method), and
  whether the draw is exact: False where NumPy would reject the draw and take another, which
  the caller then makes with NumPy itself (probability below `bound / 2**32`)."""
  words = np.asarray(words, dtype=_U64)
  product = words * _U64(bound)
  leftover = product & _MASK32
  threshold = (2**32 - bound) % bound
  return (product >> _U64(32)).astype(np.int64), leftover >= threshold


def split_uint32(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A 64-bit output as NumPy's two `next_uint32` draws take it: low half first."""
  return words & _MASK32, words >> _U64(32)


def unit_double(words: np.ndarray) -> np.ndarray:
  """NumPy's `Generator.random()` from a 64-bit output: its top 53 bits over 2**53."""
  return (words >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
