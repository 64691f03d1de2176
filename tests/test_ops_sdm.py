"""`sdm` (Attention Approximates Sparse Distributed Memory): circle intersections against a
count by enumeration of {0, 1}^n, the read against a float64 reference, and the paper's
correspondence with softmax attention at the fitted β."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.ops import sdm
from tests import op_checks
from tests import reference as ref

OP = ops.get("sdm")
SEGMENTS = np.array([[0] * 3 + [1] * 4, [0] * 7])


@functools.lru_cache(maxsize=None)
def _enumerated_intersections(n, d):
  """`[2d + 1]` counts of the vectors of {0, 1}^n within d of both 0 and of 1^{d_v}0^{n−d_v}."""
  cube = np.array(list(itertools.product((0, 1), repeat=n)))
  near_origin = cube.sum(1) <= d
  counts = []
  for dv in range(2 * d + 1):
    other = np.zeros(n, int)
    other[:dv] = 1
    counts.append(int(np.sum(near_origin & (np.abs(cube - other).sum(1) <= d))))
  return np.array(counts, np.float64)


@pytest.mark.parametrize("n,d", [(8, 2), (10, 3), (12, 5)])
def test_circle_intersections_count_the_shared_neurons(n, d):
  np.testing.assert_allclose(np.exp(sdm.log_circle_intersections(n, d)),
                             _enumerated_intersections(n, d), rtol=1e-9)


def _sdm_reference(q, k, v, mask, radius, log_counts):
  """Σ_j c(d_v)·v_j / Σ_j c(d_v) in float64, d_v = n(1 − cos)/2, log c linear between
  integers, keys beyond 2d excluded."""
  q, k, v = ref.f64(q, k, v)
  n = q.shape[-1]
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  distance = 0.5 * n * (1.0 - ref.attention_logits(unit(q), unit(k), scale=1.0))
  table = jnp.asarray(np.log(log_counts))
  low = jnp.clip(jnp.floor(distance), 0, 2 * radius - 1).astype(int)
  frac = jnp.clip(distance, 0, 2 * radius) - low
  log_c = table[low] * (1 - frac) + table[jnp.minimum(low + 1, 2 * radius)] * frac
  weights = ref.masked_softmax(log_c, mask & (distance <= 2 * radius))
  return jnp.einsum("bnts,bsnd->btnd", weights, ref.repeat_kv(v, q.shape[2]))


def test_read_matches_the_formula_with_causal_segments_and_padding():
  """Forward and gradient wrt q, k, v at head_dim 12, radius 3 (intersections by enumeration);
  a row without keys gives zeros."""
  q, k, v = ref.qkv(t=7, n=4, k=2, d=12, seed=3)
  valid = np.ones((2, 1, 1, 7), bool)
  valid[1, ..., 0] = False
  full = ref.full_mask(2, 1, 7, 7, mask=valid, is_causal=True, segment_ids=SEGMENTS)
  op = functools.partial(OP, mask=valid, is_causal=True, segment_ids=SEGMENTS, radius=3)
  out = ref.assert_matches(op, lambda q, k, v: _sdm_reference(
      q, k, v, full, 3, _enumerated_intersections(12, 3)), (q, k, v))
  assert np.all(out[1, 0] == 0.0)


def test_bipolar_patterns_read_with_their_hamming_distances():
  """±1 queries and keys: the weights are the intersections at the integer Hamming distances,
  counted by enumeration; keys farther than 2d get none."""
  n, d = 10, 3
  bits = lambda seed, shape: np.random.default_rng(seed).integers(0, 2, shape)  # noqa: E731
  q_bits, k_bits = bits(0, (1, 5, 1, n)), bits(1, (1, 6, 1, n))
  v = ref.normal(2, (1, 6, 1, 4))
  out = OP(*(jnp.asarray(2.0 * x - 1.0, jnp.float32) for x in (q_bits, k_bits)), v, radius=d)
  hamming = np.abs(q_bits[0, :, None, 0] - k_bits[0, None, :, 0]).sum(-1)  # [t, s]
  counts = np.concatenate([_enumerated_intersections(n, d), np.zeros(n)])[hamming]
  want = (counts / counts.sum(-1, keepdims=True)) @ np.asarray(v[0, :, 0], np.float64)
  np.testing.assert_allclose(out[0, :, 0], want, rtol=1e-5, atol=1e-6)


def test_read_is_softmax_attention_at_the_fitted_beta():
  """The paper's correspondence: log c(d_v) is close to linear over 0..d, and the SDM read
  (head_dim 64, radius 11, queries near keys) is softmax attention with the logit scale β·n/2
  on L2-normalised queries and keys within 1% (relative L2 error, measured 0.23%)."""
  n, d = 64, 11
  logs = sdm.log_circle_intersections(n, d)[:d + 1]
  beta = ops.sdm_softmax_beta(n, d)
  residual = logs - np.polyval(np.polyfit(np.arange(d + 1), logs, 1), np.arange(d + 1))
  assert 1.0 - residual.var() / logs.var() > 0.97
  assert 0.4 < beta < 0.5
  _, k, v = ref.qkv(b=2, t=32, n=4, k=4, d=n, seed=1)
  q = k[:, ::-1] + 0.7 * ref.normal(5, k.shape)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  with ref.x64():
    soft = np.asarray(ref.softmax_attention(unit(ref.f64(q)), unit(ref.f64(k)), v,
                                            scale=beta * n / 2))
  out = np.asarray(OP(q, k, v, radius=d), np.float64)
  assert np.linalg.norm(out - soft) / np.linalg.norm(soft) < 1e-2


def test_causal_ignores_future_keys():
  q, k, v = ref.qkv(t=11, d=8)
  op_checks.assert_causal_ignores_future_keys(jax.jit(functools.partial(OP, is_causal=True)),
                                              q, k, v, cut=6)


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=3, n=2, k=2, d=4)
  return [(lambda: OP(q, k, v, radius=5), "radius"), (lambda: OP(q, k, v, radius=-1), "radius"),
          (lambda: OP(q, k, v, scale=0.5), "scale"),
          (lambda: ops.sdm_softmax_beta(0, 0), "head_dim")]


@pytest.mark.parametrize("case", range(4))
def test_bad_arguments_raise_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
