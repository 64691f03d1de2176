"""Sequence parallelism of `cascaded_group_attention` (`big_attn.parallel.cascade`,
`SeqParallel.cascade`) on 8 simulated CPU devices: ring, striped and all_gather, the query
convolution 1-D (its taps reaching into the previous shard) and 2-D on a grid, GQA, packed rows;
output and gradients of q, k, v and every weight equal the single-device op's (float64 inputs,
float32 softmax inside; the op itself is checked against its formula in its own tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops, parallel
from big_attn.models import lm
from tests import reference
from tests.test_lm import SMALL, _packed_batch, assert_sequence_parallel_equals_single_device
from tests.test_parallel_convolution import SEGMENTS  # 16 tokens, runs across shards

B, SHARDS, LOCAL, N, K, D = 2, 8, 2, 3, 1, 4
S = SHARDS * LOCAL


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((SHARDS,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:SHARDS])


CASES = [  # (strategy, grid, packed)
    ("ring", None, True), ("striped", (4, 4), False),
    *(pytest.param(*case, marks=pytest.mark.extended) for case in [
        ("striped", None, True), ("all_gather", None, False), ("ring", (4, 4), True),
        ("all_gather", (4, 4), True)]),
]


@pytest.mark.parametrize("strategy,grid,packed", CASES)
def test_cascade_equals_single_device(mesh, strategy, grid, packed):
  with reference.x64():
    normal = lambda seed, shape, std=1.0: reference.f64(  # noqa: E731
        reference.normal(seed, shape, std=std))
    q, k, v = normal(0, (B, S, N, D)), normal(1, (B, S, K, D)), normal(2, (B, S, K, D))
    kernel = (3, 3) if grid else (3,)
    weights = dict(cascade_query=normal(3, (N - 1, D, D), 0.5),
                   cascade_key=normal(4, (N - 1, D, D), 0.5),
                   cascade_value=normal(5, (N - 1, D, D), 0.5),
                   query_conv=normal(6, (*kernel, N, D), 0.5))
    segments = jnp.asarray(SEGMENTS) if packed else None

    def whole(q, k, v, w):
      mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
      return ops.get("cascaded_group_attention")(q, k, v, is_causal=True, mask=mask, grid=grid,
                                                 **w)

    striped = strategy == "striped"
    order = (lambda x: parallel.stripe(x, SHARDS)) if striped else (lambda x: x)
    unorder = (lambda x: parallel.unstripe(x, SHARDS)) if striped else (lambda x: x)
    sp = parallel.SeqParallel(mesh, "seq", strategy)

    def sharded(q, k, v, w):
      return unorder(sp.cascade("cascaded_group_attention", order(q), order(k), order(v),
                                is_causal=True, grid=grid,
                                segment_ids=None if segments is None else order(segments), **w))

    (want, want_grads), (got, got_grads) = (
        reference.out_and_grads(fn, (q, k, v, weights)) for fn in (whole, sharded))
    assert np.abs(want).max() > 0.1
    # Each head's softmax runs in float32 (on one device as one pass, split: merged blocks).
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, want, **tol, err_msg="output")
    assert len(jax.tree.leaves(want_grads)) == 7
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                            jax.tree.leaves(got_grads)):
      np.testing.assert_allclose(g, w, **tol, err_msg=f"gradient {jax.tree_util.keystr(path)}")


def test_refusals(mesh):
  q, k, v = reference.qkv(b=1, t=S, n=N, k=K, d=D)
  sp = parallel.SeqParallel(mesh, "seq", "ring")
  with pytest.raises(ValueError, match="'softmax' has no cascade form"):
    sp.cascade("softmax", q, k, v)
  with pytest.raises(ValueError, match="cascade_query .* is required"):
    sp.cascade("cascaded_group_attention", q, k, v)
  assert all(ops.sequence_parallel_form(n) is not None for n in ops.names()
             if ops.spec(n).causal)


@pytest.mark.extended
def test_lm_striped_equals_single_device():
  """The LM with `attention="cascaded_group_attention"` on packed rows, striped over 4
  sequence shards (batch over 2): loss and gradients."""
  assert_sequence_parallel_equals_single_device(
      lm.Model(**SMALL, attention="cascaded_group_attention", tie_embeddings=False),
      _packed_batch(4, 16), "striped", [("data", 2), ("seq", 4)])
