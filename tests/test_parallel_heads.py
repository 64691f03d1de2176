"""Head-parallel sequence parallelism (`big_attn.parallel.heads`, `SeqParallel.heads`) of the
causal ops whose heads are independent but whose weights need the whole row (skim_attention,
sparsifiner, sparse_blocks, sparge_attention, combiner, sage_int8, sdm, super_attention,
variational_attention without rng) or the whole image grid (gpsa, levit_bias, decomposed_relpos:
packed rows as a mask), on 8 simulated CPU devices: ring (contiguous) and striped token orders,
GQA with fewer key/value heads than devices (repeated per query head) and with as many, packed
rows; output and gradients of queries, keys, values and the op's per-head arguments equal the
single-device op's (float64 inputs, float32 inside the ops). The op itself is checked against
its formula in its own test file; here the split must not change a number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops, parallel
from big_attn.models import lm
from big_attn.parallel.heads import head_parallel_attention
from tests import reference
from tests.test_lm import SMALL, _packed_batch, assert_sequence_parallel_equals_single_device
from tests.test_parallel_convolution import SEGMENTS  # 16 tokens, runs across shards

B, SHARDS, LOCAL, N, D = 2, 8, 2, 8, 8
S = SHARDS * LOCAL
GRID = (4, 4)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((SHARDS,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:SHARDS])


def _op_args(op, num_kv_heads):
  """The op's per-head arrays (float64) and its static arguments for a 16-token row."""
  normal = lambda seed, shape: reference.f64(reference.normal(seed, shape))  # noqa: E731
  if op == "skim_attention":
    return dict(layout_query=normal(3, (B, S, N, 3)),
                layout_key=normal(4, (B, S, num_kv_heads, 3))), dict(top_k=5)
  if op == "sparsifiner":
    return dict(predictor_q=normal(3, (N, D, 2)),
                predictor_k=normal(4, (num_kv_heads, D, 2))), dict(topk=5)
  if op == "sparse_blocks":
    return {}, dict(block_q=4, block_k=4, cdf_threshold=0.6)
  if op == "sage_int8":
    return {}, dict(block_q=4, block_k=4, pv_dtype=jnp.float32)
  if op == "gpsa":
    return dict(pos_proj=normal(3, (N, 3)), gating=normal(4, (N,))), dict(grid=GRID)
  if op == "levit_bias":
    return dict(attention_bias=normal(3, (N, *GRID))), dict(grid=GRID)
  if op == "super_attention":
    return dict(alignment=normal(3, (S, S))), {}
  if op == "sparge_attention":
    return {}, dict(block_q=4, block_k=4, cdf_threshold=0.6, pv_threshold=-2.0)
  if op == "variational_attention":
    return dict(posterior_query=normal(3, (B, S, N, D))), {}
  if op == "decomposed_relpos":
    return dict(rel_h=normal(3, (7, D)), rel_w=normal(4, (7, D))), dict(grid=GRID)
  return {}, {}


CASES = [  # (op, strategy, num_kv_heads, packed)
    ("skim_attention", "striped", 2, True), ("sparsifiner", "ring", 2, False),
    ("sparse_blocks", "ring", 8, True), ("combiner", "striped", 1, False),
    ("sage_int8", "ring", 2, True), ("gpsa", "striped", 8, True), ("levit_bias", "ring", 2, False),
    ("decomposed_relpos", "ring", 1, True), ("super_attention", "striped", 2, True),
    ("sdm", "ring", 2, False), ("variational_attention", "striped", 2, True),
    *(pytest.param(*case, marks=pytest.mark.extended) for case in [
        ("gpsa", "ring", 2, False), ("levit_bias", "striped", 8, True),
        ("decomposed_relpos", "striped", 2, False), ("sparge_attention", "ring", 2, True),
        ("sparge_attention", "striped", 8, False), ("sdm", "striped", 8, True),
        ("super_attention", "ring", 8, False),
        ("skim_attention", "ring", 8, False), ("sparsifiner", "striped", 8, True),
        ("sparse_blocks", "striped", 2, False), ("combiner", "ring", 2, True),
        ("sage_int8", "striped", 8, False)]),
]


@pytest.mark.parametrize("op,strategy,num_kv_heads,packed", CASES)
def test_head_parallel_equals_single_device(mesh, op, strategy, num_kv_heads, packed):
  """`SeqParallel.heads` (arrays in the strategy's order) equals the op on one device:
  output and the gradients of q, k, v and the op's per-head arguments."""
  assert ops.sequence_parallel_form(op) == "heads"
  with reference.x64():
    q, k, v = (reference.f64(reference.normal(i, (B, S, n, D)))
               for i, n in enumerate((N, num_kv_heads, num_kv_heads)))
    arrays, static = _op_args(op, num_kv_heads)
    segments = jnp.asarray(SEGMENTS) if packed else None
    per_token = {name for name, arg in ops.spec(op).head_args.items() if arg.per_token}

    packing = {}
    if packed and ops.spec(op).segment_ids:
      packing = dict(segment_ids=segments)
    elif packed:
      packing = dict(mask=(segments[:, :, None] == segments[:, None, :])[:, None])

    def whole(q, k, v, w):
      return ops.get(op)(q, k, v, is_causal=True, **packing, **w, **static)

    striped = strategy == "striped"
    order = (lambda x: parallel.stripe(x, SHARDS)) if striped else (lambda x: x)
    unorder = (lambda x: parallel.unstripe(x, SHARDS)) if striped else (lambda x: x)
    sp = parallel.SeqParallel(mesh, "seq", strategy)

    def sharded(q, k, v, w):
      w = {name: order(x) if name in per_token else x for name, x in w.items()}
      return unorder(sp.heads(op, order(q), order(k), order(v), is_causal=True,
                              segment_ids=None if segments is None else order(segments),
                              **w, **static))

    (want, want_grads), (got, got_grads) = (
        reference.out_and_grads(fn, (q, k, v, arrays)) for fn in (whole, sharded))
    assert np.abs(want).max() > 0.1
    # The ops compute in float32 inside; repeated key/value heads sum their gradients in
    # another order, and weights sum theirs over the batch and tokens in float32.
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, want, **tol, err_msg="output")
    assert len(jax.tree.leaves(want_grads)) == 3 + len(arrays)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                            jax.tree.leaves(got_grads)):
      np.testing.assert_allclose(g, w, **tol, err_msg=f"gradient {jax.tree_util.keystr(path)}")


def test_refusals_name_the_op_and_the_reason(mesh):
  q, k, v = reference.qkv(b=1, t=S, n=6, k=2, d=4)
  sp = parallel.SeqParallel(mesh, "seq", "ring")
  with pytest.raises(ValueError, match="its 6 heads are not divisible by 8"):
    sp.heads("combiner", q, k, v)
  with pytest.raises(ValueError, match="'softmax' has no head-parallel form"):
    sp.heads("softmax", q, k, v)
  with pytest.raises(ValueError, match="'softmax' has no independent heads"):
    head_parallel_attention(q, k, v, op="softmax", axis_name="seq")
  with pytest.raises(ValueError, match="'variational_attention' draws its samples with keys"):
    sp.heads("variational_attention", q[:, :, :4], k, v, rng=jax.random.key(0),
             posterior_query=q[:, :, :4])
  with pytest.raises(ValueError, match="splitting its heads: call SeqParallel.heads"):
    parallel.sequence_parallel_attention(q, k, v, mesh=mesh, op="combiner")
  for bad in (dict(head_args={"w": 0}), dict(head_args={}, causal=False)):
    with pytest.raises(TypeError, match="head_args must map argument names to HeadArg"):
      ops.register("unregistered", **bad)


@pytest.mark.slow
def test_lm_striped_equals_single_device():
  """The LM with `attention="sparsifiner"` (its predictors are learned per head) on packed
  rows, striped over 4 sequence shards (batch over 2): loss and gradients."""
  assert_sequence_parallel_equals_single_device(
      lm.Model(**SMALL, attention="sparsifiner", tie_embeddings=False), _packed_batch(4, 16),
      "striped", [("data", 2), ("seq", 4)])
