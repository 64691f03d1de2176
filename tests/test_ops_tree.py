"""`tree_cross_attention` (Tree Cross Attention) against a float64 reference that builds the
tree recursively over token ranges, descends it per query and attends over what it kept."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

OP = ops.get("tree_cross_attention")


def retrieved_sets(q, k, valid, leaf_size):
  """`A [b, n, t, m, s]` (row r averages the tokens of retrieved item r) and `keep [b, n, t,
  m]`: per query the sibling subtrees passed on the way down and the reached leaf's tokens."""
  b, t, n, d = q.shape
  s = k.shape[1]
  k = np.asarray(ref.repeat_kv(k, n))
  leaves = max(-(-s // leaf_size), 1)
  size = leaf_size * 2 ** int(np.ceil(np.log2(leaves)))
  depth = int(np.log2(size // leaf_size))
  m = depth + leaf_size
  a, keep = np.zeros((b, n, t, m, s)), np.zeros((b, n, t, m), bool)

  def members(e, lo, hi):
    return [j for j in range(lo, min(hi, s)) if valid[e, j]]

  for e in range(b):
    for h in range(n):
      for i in range(t):
        lo, hi, r = 0, size, 0
        while hi - lo > leaf_size:
          mid = (lo + hi) // 2
          halves = [(lo, mid), (mid, hi)]
          tokens = [members(e, *half) for half in halves]
          scores = [q[e, i, h] @ k[e, tok, h].mean(0) if tok else -np.inf for tok in tokens]
          pick = 1 if scores[1] > scores[0] else 0
          other = tokens[1 - pick]
          if other:
            a[e, h, i, r, other] = 1.0 / len(other)
            keep[e, h, i, r] = True
          lo, hi = halves[pick]
          r += 1
        for j in range(lo, lo + leaf_size):
          if j < s and valid[e, j]:
            a[e, h, i, depth + j - lo, j] = 1.0
            keep[e, h, i, depth + j - lo] = True
  return a, keep


def tree_reference(q, k, v, a, keep):
  n = q.shape[2]
  ks = jnp.einsum("bntms,bsnd->bntmd", a, ref.repeat_kv(k, n))
  vs = jnp.einsum("bntms,bsnd->bntmd", a, ref.repeat_kv(v, n))
  logits = jnp.einsum("btnd,bntmd->bntm", q, ks) / np.sqrt(q.shape[-1])
  return jnp.einsum("bntm,bntmd->btnd", ref.masked_softmax(logits, keep), vs)


@pytest.mark.parametrize("t,s,leaf_size", [(5, 11, 2), (4, 8, 1), (3, 6, 8)])
def test_matches_tree_reference(t, s, leaf_size):
  """GQA; 11 keys in leaves of 2 (padded to 16), 8 single-token leaves, one leaf holding all
  keys (= softmax attention); key padding, example 1 of the second case without keys."""
  q, k, v = ref.qkv(t=t, s=s, n=4, k=2, d=4, seed=s)
  valid = np.random.default_rng(s).random((2, s)) > 0.3
  valid[0, 0] = True
  if leaf_size == 1:
    valid[1] = False
  with ref.x64():
    a, keep = retrieved_sets(*ref.f64(q, k), valid, leaf_size)
  assert keep.sum(-1).max() <= np.log2(16) + leaf_size
  op = functools.partial(OP, mask=valid[:, None, None, :], leaf_size=leaf_size)
  out = ref.assert_matches(op, lambda q, k, v: tree_reference(q, k, v, a, keep), (q, k, v))
  if leaf_size == 1:
    assert np.all(out[1] == 0.0)
  if leaf_size == 8:
    np.testing.assert_allclose(out, ref.softmax_attention(q, k, v, mask=valid[:, None, None]),
                               **ref.F32_TOL)


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=3, s=4, n=2, k=2, d=4)
  return [(lambda: OP(q, k, v, leaf_size=0), "leaf_size"),
          (lambda: OP(q, k, v, mask=jnp.ones((1, 1, 3, 4), bool)), "mask")]


@pytest.mark.parametrize("case", range(2))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


def test_no_causal_form():
  op_checks.assert_no_causal_form("tree_cross_attention", *ref.qkv(b=1, t=4, n=2, k=2, d=4))
