"""`tree_cross_attention` (Tree Cross Attention) against a float64 reference that builds the
tree recursively over token ranges, descends it per query and attends over what it kept; the
learned aggregator and the REINFORCE-trained retrieval policy against a reference written from
their formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.ops import hard
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


def learned_tree_reference(q, k, v, weights, valid, leaf_size, choices, noise=None,
                           baseline="greedy"):
  """Tree Cross Attention from its definition, per query: node summaries built recursively
  (leaf: mean of its valid tokens; parent: the mean of its subtree's tokens when `weights` is
  None, else (2/m)·Σ_{nonempty c} x̄_c W_c), a descent choosing the child of larger
  s·q·k̄_c (+ noise[b, head, i, 2·level + c]) among the nonempty ones, attention over the
  passed siblings and the leaf's tokens; with `noise`, plus the REINFORCE surrogate
  (log π(path) − sg(log π(path)))·sg(out − b), π the softmax over the nonempty children and b
  the greedy output (`baseline="greedy"`) or 0. The descent's choices are made on concrete
  values: a first call outside jit records them in the dict `choices`, which later (traced)
  calls read."""
  b, t, n, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  group = n // num_kv
  leaves = max(-(-s // leaf_size), 1)
  size = leaf_size * 2 ** int(np.ceil(np.log2(leaves)))
  scale = 1 / np.sqrt(d)

  @functools.cache
  def summary(e, h, lo, hi):
    tokens = [j for j in range(lo, min(hi, s)) if valid[e, j]]
    if hi - lo == leaf_size or weights is None:
      if not tokens:
        return jnp.zeros(d), jnp.zeros(v.shape[-1]), False
      return k[e, tokens, h].mean(0), v[e, tokens, h].mean(0), True
    mid = (lo + hi) // 2
    kids = [summary(e, h, lo, mid), summary(e, h, mid, hi)]
    used = [c for c in range(2) if kids[c][2]]
    if not used:
      return jnp.zeros(d), jnp.zeros(v.shape[-1]), False
    ks = sum(kids[c][0] @ weights[0][h, c] for c in used) * 2 / len(used)
    vs = sum(kids[c][1] @ weights[1][h, c] for c in used) * 2 / len(used)
    return ks, vs, True

  def one_query(e, hq, i, noisy):
    h, lo, hi, level, log_pi = hq // group, 0, size, 0, 0.0
    items = []
    while hi - lo > leaf_size:
      mid = (lo + hi) // 2
      halves = [(lo, mid), (mid, hi)]
      kids = [summary(e, h, *half) for half in halves]
      logits = [scale * q[e, i, hq] @ kid[0] for kid in kids]
      ok = [kid[2] for kid in kids]
      step = (e, hq, i, level, noisy)
      if step not in choices:
        perturbed = [float(x) + (noise[e, hq, i, 2 * level + c] if noisy else 0.0)
                     for c, x in enumerate(logits)]
        choices[step] = 1 if ok[1] and (not ok[0] or perturbed[1] > perturbed[0]) else 0
      pick = choices[step]
      if noisy and all(ok):
        log_pi = log_pi + logits[pick] - jnp.logaddexp(logits[0], logits[1])
      if ok[1 - pick]:
        items.append(kids[1 - pick][:2])
      lo, hi = halves[pick]
      level += 1
    items += [(k[e, j, h], v[e, j, h]) for j in range(lo, min(lo + leaf_size, s)) if valid[e, j]]
    if not items:
      return jnp.zeros(v.shape[-1]), log_pi
    probs = jax.nn.softmax(jnp.stack([scale * q[e, i, hq] @ key for key, _ in items]))
    return probs @ jnp.stack([value for _, value in items]), log_pi

  rows = []
  for e in range(b):
    for i in range(t):
      for hq in range(n):
        out, log_pi = one_query(e, hq, i, noise is not None)
        if noise is not None:
          base = (jax.lax.stop_gradient(one_query(e, hq, i, False)[0])
                  if baseline == "greedy" else 0.0)
          out = out + (log_pi - jax.lax.stop_gradient(log_pi)) * jax.lax.stop_gradient(out - base)
        rows.append(out)
  return jnp.stack(rows).reshape(b, t, n, -1)


def _aggregator(seed, num_kv, d, dv):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(0.5 * np.eye(d) + 0.3 * rng.normal(size=(num_kv, 2, d, d)), jnp.float32),
          jnp.asarray(0.5 * np.eye(dv) + 0.3 * rng.normal(size=(num_kv, 2, dv, dv)),
                      jnp.float32))


@pytest.mark.parametrize("learned,sampled,baseline,leaf_size", [
    (True, False, "greedy", 1), (True, True, "greedy", 2),
    pytest.param(False, True, "none", 1, marks=pytest.mark.extended)])
def test_learned_aggregator_and_policy_match_reference(learned, sampled, baseline, leaf_size):
  """Forward and gradients (q, k, v and the aggregator weights; with sampling the pathwise and
  the score-function terms) against `learned_tree_reference`: 6 keys padded to 8 with one more
  masked (empty subtrees), GQA."""
  q, k, v = ref.qkv(b=1, t=2, s=6, n=2, k=1, d=4, seed=3)
  wk, wv = _aggregator(4, 1, 4, 4)
  valid = np.ones((1, 6), bool)
  valid[0, 4] = False
  rng = jax.random.key(11)
  depth = int(np.log2(8 // leaf_size))
  noise = None
  if sampled:
    noise = np.asarray(hard.pair_gumbel(hard.head_keys(rng, 2, 1), jnp.arange(2),
                                            jnp.arange(2 * depth)), np.float64)

  def op(q, k, v, wk, wv):
    return OP(q, k, v, mask=valid[:, None, None], leaf_size=leaf_size,
              aggregator={"key": wk, "value": wv} if learned else "mean",
              retrieval="policy" if sampled else "greedy", rng=rng if sampled else None,
              baseline=baseline)

  choices = {}

  def reference(q, k, v, wk, wv):
    return learned_tree_reference(q, k, v, (wk, wv) if learned else None, valid, leaf_size,
                                  choices, noise, baseline)

  with ref.x64():
    reference(*ref.f64(q, k, v, wk, wv))  # Records the descent's choices.

  out = ref.assert_matches(op, reference, (q, k, v, wk, wv))
  if sampled:
    greedy = OP(q, k, v, mask=valid[:, None, None], leaf_size=leaf_size,
                aggregator={"key": wk, "value": wv} if learned else "mean")
    assert not np.allclose(out, greedy), "the sampled paths should differ from the greedy ones"


def test_learned_aggregator_params():
  """`TreeCrossAttentionParams`: W = I/2 at initialisation (on 8 keys, every child full, the
  tree's summaries are the means), `rng` only for `retrieval="policy"` with a dropout stream."""
  q, k, v = ref.qkv(b=1, t=3, s=8, n=2, k=2, d=4)
  module = ops.params_module("tree_cross_attention")(
      num_heads=2, num_kv_heads=2, head_dim=4, op_args={"aggregator": "learned",
                                                         "retrieval": "policy"})
  variables = module.init(jax.random.key(0), None, q, k, v)
  args = module.apply(variables, None, q, k, v)
  assert set(args) == {"aggregator"}
  np.testing.assert_array_equal(args["aggregator"]["key"][1, 0], 0.5 * np.eye(4))
  np.testing.assert_allclose(OP(q, k, v, **args), OP(q, k, v), **ref.F32_TOL)
  args = module.apply(variables, None, q, k, v, rngs={"dropout": jax.random.key(1)})
  assert set(args) == {"aggregator", "rng"}
  plain = module.clone(op_args=None)
  assert plain.apply(plain.init(jax.random.key(0), None, q, k, v), None, q, k, v,
                     rngs={"dropout": jax.random.key(1)}) == {}


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=3, s=4, n=2, k=2, d=4)
  wk, wv = _aggregator(0, 2, 4, 4)
  return [(lambda: OP(q, k, v, leaf_size=0), "leaf_size"),
          (lambda: OP(q, k, v, mask=jnp.ones((1, 1, 3, 4), bool)), "mask"),
          (lambda: OP(q, k, v, aggregator="learned"), "aggregator"),
          (lambda: OP(q, k, v, aggregator={"key": wk, "value": wv[:1]}), "aggregator"),
          (lambda: OP(q, k, v, retrieval="sampled"), "retrieval"),
          (lambda: OP(q, k, v, retrieval="policy", baseline="mean"), "baseline"),
          (lambda: OP(q, k, v, rng=jax.random.key(0)), "rng")]


@pytest.mark.parametrize("case", range(7))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


def test_no_causal_form():
  op_checks.assert_no_causal_form("tree_cross_attention", *ref.qkv(b=1, t=4, n=2, k=2, d=4))
