"""Sequence parallelism of `hyena` (`big_attn.parallel.convolution`) on 8 simulated CPU devices:
the ring, striped and all_gather strategies, causal and not, on packed rows, forward and
gradients (queries, keys, values, the long and short filters, the skip terms, the gates) in
float64, against the direct O(L²) convolution of `tests.test_ops_hyena.hyena_ref` (whole rows)
or the single-device op (packed rows, itself checked against each segment run alone); the
`Attention` layer and the LM reaching it by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops, parallel
from big_attn.models import lm
from big_attn.parallel.convolution import hyena_shard_attention
from tests import reference
from tests.test_lm import SMALL, _packed_batch, assert_sequence_parallel_equals_single_device
from tests.test_ops_hyena import hyena_ref

# 8 shards of 2 tokens: the short filters' 2 earlier taps reach across a whole shard; GQA (2
# query heads sharing 1 key/value head); order 3 has one gate.
B, SHARDS, LOCAL, N, K, D, ORDER = 2, 8, 2, 2, 1, 3, 3
S = SHARDS * LOCAL
# Runs that cross shards, one inside a shard, one-token runs.
SEGMENTS = np.array([[0] * 5 + [1] * 8 + [2, 3, 3], [0] * 2 + [1] + [2] * 13], np.int32)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((SHARDS,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:SHARDS])


def _arrays(is_causal):
  """float64 q, k, v and the op's weights (long filters in the centred layout; causal taps
  when causal)."""
  normal = lambda seed, shape, std=1.0: reference.f64(  # noqa: E731
      reference.normal(seed, shape, std=std))
  taps = S if is_causal else 2 * S - 1
  return (normal(0, (B, S, N, D)), normal(1, (B, S, K, D)), normal(2, (B, S, K, D)),
          dict(filters=normal(3, (ORDER, taps, N, D), 0.3), filter_bias=normal(4, (ORDER, N, D)),
               short_filters=normal(5, (ORDER + 1, 3, N, D), 0.5),
               gates=normal(6, (ORDER - 2, B, S, N, D))))


def _grads(attend, q, k, v, weights):
  def loss(q, k, v, w):
    out = attend(q, k, v, w)
    return jnp.sum(jnp.sin(out) * jnp.arange(1, out.size + 1).reshape(out.shape) / out.size), out
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, weights)


CASES = [  # (strategy, is_causal, packed)
    ("ring", True, True), ("striped", True, False), ("all_gather", False, True),
    *(pytest.param(*case, marks=pytest.mark.extended) for case in [
        ("ring", True, False), ("ring", False, False), ("ring", False, True),
        ("striped", True, True), ("striped", False, False), ("striped", False, True),
        ("all_gather", True, False), ("all_gather", True, True), ("all_gather", False, False)]),
]


@pytest.mark.parametrize("strategy,is_causal,packed", CASES)
def test_sequence_parallel_hyena_matches_whole_sequence(mesh, strategy, is_causal, packed):
  """`SeqParallel.convolution` (arrays in the strategy's order: striped tokens, gates and
  segment ids for "striped") equals Hyena over the whole sequence, output and gradients."""
  with reference.x64():
    q, k, v, weights = _arrays(is_causal)
    segments = jnp.asarray(SEGMENTS) if packed else None

    def whole(q, k, v, w):
      if packed:
        return ops.get("hyena")(q, k, v, is_causal=is_causal, segment_ids=segments, **w)
      k, v = reference.repeat_kv(k, N), reference.repeat_kv(v, N)
      return hyena_ref(q, k, v, w["filters"], bias=w["filter_bias"], short=w["short_filters"],
                       gates=list(w["gates"]), spatial=(S,), is_causal=is_causal)

    order = ((lambda x, axis=1: parallel.stripe(x, SHARDS, axis=axis)) if strategy == "striped"
             else (lambda x, axis=1: x))
    unorder = ((lambda x: parallel.unstripe(x, SHARDS)) if strategy == "striped"
               else (lambda x: x))
    sp = parallel.SeqParallel(mesh, "seq", strategy)

    def sharded(q, k, v, w):
      w = dict(w, gates=order(w["gates"], 2))
      return unorder(sp.convolution(
          "hyena", order(q), order(k), order(v), is_causal=is_causal,
          segment_ids=None if segments is None else order(segments), **w))

    want_grads, want = _grads(whole, q, k, v, weights)
    got_grads, got = _grads(sharded, q, k, v, weights)
    tol = dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got, want, **tol, err_msg="output")
    for name, g, w in zip(("query", "key", "value"), got_grads[:3], want_grads[:3]):
      np.testing.assert_allclose(g, w, **tol, err_msg=f"d{name}")
    assert set(got_grads[3]) == set(weights)
    for name in weights:
      np.testing.assert_allclose(got_grads[3][name], want_grads[3][name], **tol,
                                 err_msg=f"d{name}")


def test_bad_arguments_are_refused_up_front(mesh):
  with reference.x64():
    q, k, v, weights = _arrays(True)
    sp = parallel.SeqParallel(mesh, "seq", "ring")
    with pytest.raises(ValueError, match="filters must have shape"):
      sp.convolution("hyena", q, k, v, **dict(weights, filters=weights["filters"][:, :-1]))
    with pytest.raises(ValueError, match="mask is not supported"):
      sp.convolution("hyena", q, k, v, mask=jnp.ones((B, 1, 1, S), bool), **weights)
    with pytest.raises(ValueError, match="'softmax' has no convolution form"):
      sp.convolution("softmax", q, k, v)
    with pytest.raises(ValueError, match="axis_name 'seq' is not a bound mesh axis"):
      hyena_shard_attention(q, k, v, axis_name="seq", **weights)
    with pytest.raises(ValueError, match="passing its convolutions' inputs: call "
                       "SeqParallel.convolution"):
      parallel.sequence_parallel_attention(q, k, v, mesh=mesh, op="hyena", **weights)
    assert ops.sequence_parallel_form("hyena") == "convolution"


@pytest.mark.extended
def test_attention_layer_by_name(mesh):
  """`Attention(op="hyena", seq_parallel=...)` over 8 contiguous shards (ring) with packed rows
  equals the plain layer: output and every gradient (filter network, skip terms, gates)."""
  plain = layers.Attention(num_heads=N, num_kv_heads=K, op="hyena", op_args=dict(order=3))
  x, seg = reference.normal(7, (B, S, 8)), jnp.asarray(SEGMENTS)
  params = nn.unbox(plain.init(jax.random.key(0), x)["params"])

  def grads(module):
    def loss(p):
      out = module.apply({"params": p}, x, is_causal=True, segment_ids=seg)
      return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  want_grads, want = grads(plain)
  got_grads, got = grads(plain.clone(seq_parallel=parallel.SeqParallel(mesh, "seq", "ring")))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert {"implicit_filter", "filter_bias", "short_filters", "gates"} <= set(
      want_grads["op_params"])
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                          jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=str(path))


@pytest.mark.slow
def test_lm_striped_equals_single_device():
  """The LM with `attention="hyena"` on packed rows, striped over 4 sequence shards (batch over
  2): loss and gradients."""
  assert_sequence_parallel_equals_single_device(
      lm.Model(**SMALL, attention="hyena", tie_embeddings=False), _packed_batch(4, 16), "striped",
      [("data", 2), ("seq", 4)])
