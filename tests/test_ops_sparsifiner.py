"""`sparsifiner` (Sparsifiner: Learning Sparse Instance-Dependent Attention) against a float64
reference: the low-rank map and its top-k keys from NumPy sorting, the sparse softmax with the
straight-through factor written from the formula."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

OP = ops.get("sparsifiner")
RANK = 3


def predictors(n=4, k=2, d=4, seed=20):
  return ref.normal(seed, (n, d, RANK)), ref.normal(seed + 1, (k, d, RANK))


def approx_map(q, k, wq, wk, full):
  """Â = softmax(Q W_q (K W_k)ᵀ/√r) per head over the allowed keys, float64."""
  low_q = jnp.einsum("btnd,ndr->bntr", q, wq)
  n = q.shape[2]
  low_k = jnp.einsum("bsnd,ndr->bnsr", ref.repeat_kv(k, n),
                     jnp.repeat(wk, n // wk.shape[0], axis=0))
  return ref.masked_softmax(jnp.einsum("bntr,bnsr->bnts", low_q, low_k) / np.sqrt(RANK), full)


def kept_keys(approx, full, topk):
  """Per row the `topk` allowed keys with the largest Â (argsort), as a boolean mask."""
  a = np.where(full, np.asarray(approx), -np.inf)
  order = np.argsort(-a, axis=-1, kind="stable")[..., :topk]
  kept = np.zeros(a.shape, bool)
  np.put_along_axis(kept, order, True, axis=-1)
  return kept & full


def sparsifiner_reference(q, k, v, wq, wk, full, kept):
  approx = approx_map(q, k, wq, wk, full)
  p = ref.masked_softmax(ref.attention_logits(q, k), kept)
  w = p * (1.0 + approx - jax.lax.stop_gradient(approx))
  return jnp.einsum("bnts,bsnd->btnd", w, ref.repeat_kv(v, q.shape[2]))


@pytest.mark.parametrize("causal,topk", [(False, 3), (True, 2)])
def test_matches_reference_with_straight_through_gradient(causal, topk):
  """GQA, key padding (example 1 has key 0 masked: its causal row 0 is empty), segments in
  the causal case; gradients wrt q, k, v and both predictors."""
  q, k, v = ref.qkv(t=9, n=4, k=2, d=4, seed=int(causal))
  wq, wk = predictors()
  valid = np.ones((2, 1, 1, 9), bool)
  valid[1, ..., 0] = False
  segments = np.array([[0] * 4 + [1] * 5, [0] * 9]) if causal else None
  full = ref.full_mask(2, 4, 9, 9, mask=valid, is_causal=causal, segment_ids=segments)
  with ref.x64():
    kept = kept_keys(approx_map(*ref.f64(q, k, wq, wk), full), full, topk)
  assert np.all(kept.sum(-1) <= topk)
  op = lambda q, k, v, wq, wk: OP(q, k, v, mask=valid, is_causal=causal, segment_ids=segments,
                                  predictor_q=wq, predictor_k=wk, topk=topk)
  out = ref.assert_matches(
      op, lambda *a: sparsifiner_reference(*a, full, kept), (q, k, v, wq, wk))
  if causal:
    assert np.all(out[1, 0] == 0.0)


def test_density_sets_topk_and_full_density_is_softmax():
  q, k, v = ref.qkv(t=8, n=4, k=2, d=4, seed=3)
  wq, wk = predictors()
  op = functools.partial(OP, predictor_q=wq, predictor_k=wk)
  np.testing.assert_allclose(op(q, k, v, density=1.0), ref.softmax_attention(q, k, v),
                             **ref.F32_TOL)
  np.testing.assert_array_equal(op(q, k, v), op(q, k, v, topk=2))  # ⌈0.25·8⌉


def test_layer_owns_the_predictor():
  op_checks.assert_layer_runs("sparsifiner", {"rank": 2},
                              {"predictor_q": (4, 4, 2), "predictor_k": (2, 4, 2)})


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=4, n=4, k=2, d=4)
  wq, wk = predictors()
  return [(lambda: OP(q, k, v), "predictor_q"),
          (lambda: OP(q, k, v, predictor_q=wq, predictor_k=wk[:1]), "predictor_k"),
          (lambda: OP(q, k, v, predictor_q=wq[:, :, :2], predictor_k=wk), "predictor_k"),
          (lambda: OP(q, k, v, predictor_q=wq, predictor_k=wk, rank=2), "rank"),
          (lambda: OP(q, k, v, predictor_q=wq, predictor_k=wk, topk=0), "topk"),
          (lambda: OP(q, k, v, predictor_q=wq, predictor_k=wk, density=1.5), "density")]


@pytest.mark.parametrize("case", range(6))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
