"""`big_attn.ops.dot_product_attention` against float64 references and `jax.nn`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import reference as ref


def _qkv(b=2, t=7, s=11, n=4, k=2, d=8, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, t, n, d), dtype)
  kk = jax.random.normal(keys[1], (b, s, k, d), dtype)
  v = jax.random.normal(keys[2], (b, s, k, d), dtype)
  return q, kk, v


def _segments(b, t, seed=1):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window_int": dict(local_window_size=2),
    "window_pair": dict(local_window_size=(3, 1)),
    "segments": dict(segments=True),
    "soft_cap": dict(logits_soft_cap=2.0),
    "bias": dict(bias=True),
    "mask": dict(mask=True),
    "all": dict(is_causal=True, local_window_size=(4, 0), segments=True, logits_soft_cap=3.0,
                bias=True, mask=True),
}


def _build(case, q, k):
  b, t, n, _ = q.shape
  s = k.shape[1]
  rng = np.random.default_rng(3)
  args, ref_mask = {}, dict(window=None)
  if case.get("is_causal"):
    args["is_causal"] = ref_mask["is_causal"] = True
  if "local_window_size" in case:
    args["local_window_size"] = ref_mask["window"] = case["local_window_size"]
  if case.get("segments"):
    if t == s:
      seg = _segments(b, t)
      args["segment_ids"] = ref_mask["segment_ids"] = seg
    else:
      pair = (_segments(b, t), _segments(b, s, seed=2))
      args["segment_ids"] = ref_mask["segment_ids"] = pair
  if case.get("mask"):
    m = jnp.asarray(rng.random((b, 1, t, s)) > 0.3)
    args["mask"] = ref_mask["mask"] = m
  if case.get("bias"):
    args["bias"] = jnp.asarray(rng.normal(size=(1, n, t, s)), jnp.float32)
  if "logits_soft_cap" in case:
    args["logits_soft_cap"] = case["logits_soft_cap"]
  return args, ref_mask


def _reference(q, k, v, args, ref_mask):
  b, t, n, _ = q.shape
  full = ref.full_mask(b, n, t, k.shape[1], **ref_mask)
  return ref.softmax_attention(q, k, v, bias=args.get("bias"), mask=full,
                               scale=args.get("scale"), soft_cap=args.get("logits_soft_cap"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [dict(t=7, s=11, k=2), dict(t=9, s=9, k=1),
                                   dict(t=9, s=9, k=4)])
def test_forward_and_grad_match_float64_reference(case, shape):
  q, k, v = _qkv(**shape)
  args, ref_mask = _build(CASES[case], q, k)

  def loss(q, k, v, bias, impl):
    a = dict(args, bias=bias) if bias is not None else args
    out = impl(q, k, v, a)
    return jnp.sum(jnp.sin(out) * out)

  ours = lambda q, k, v, a: ops.dot_product_attention(q, k, v, **a)
  out = ours(q, k, v, args)
  argnums = (0, 1, 2, 3) if "bias" in args else (0, 1, 2)
  grads = jax.grad(loss, argnums)(q, k, v, args.get("bias"), ours)
  with ref.x64():
    theirs = lambda q, k, v, a: _reference(q, k, v, a, ref_mask)
    expected = _reference(q, k, v, args, ref_mask)
    expected_grads = jax.grad(loss, argnums)(*ref.f64(q, k, v), ref.f64(args.get("bias"))
                                             if "bias" in args else None, theirs)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
  for g, e in zip(grads, expected_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True), dict(local_window_size=(2, 3)),
                                    dict(mask=True), dict(bias=True),
                                    dict(is_causal=True, mask=True)])
def test_matches_jax_nn_dot_product_attention(kwargs):
  q, k, v = _qkv(t=10, s=10, k=2)
  rng = np.random.default_rng(0)
  if kwargs.get("mask"):
    kwargs = dict(kwargs, mask=jnp.asarray(rng.random((2, 4, 10, 10)) > 0.2)
                  | jnp.eye(10, dtype=bool))
  if kwargs.get("bias"):
    kwargs = dict(kwargs, bias=jnp.asarray(rng.normal(size=(2, 4, 10, 10)), jnp.float32))
  out = ops.dot_product_attention(q, k, v, **kwargs)
  expected = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def _with_cotangents(fn, *arrays):
  """`fn(*arrays)` (an output or (output, residual)) and the gradients of Σ out·c wrt arrays."""
  def loss(*a):
    result = fn(*a)
    out = result[0] if isinstance(result, tuple) else result
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), result
  (_, result), grads = jax.value_and_grad(loss, range(len(arrays)), has_aux=True)(*arrays)
  return result, grads


@pytest.mark.parametrize("case", ["unbatched_rank3_mask", "seq_lengths_rank3_bias",
                                  "residual_gqa", "residual_unbatched_window"])
def test_drop_in_for_jax_nn_dot_product_attention(case):
  """What `jax.nn.dot_product_attention` accepts gives its result, forward and gradient."""
  q, k, v = _qkv(t=6, s=9, k=2)
  rng = np.random.default_rng(3)
  mask = jnp.asarray(rng.random((4, 6, 9)) > 0.3) | jnp.eye(6, 9, dtype=bool)  # [n, t, s]
  bias = jnp.asarray(rng.normal(size=(4, 6, 9)), jnp.float32)
  lengths = dict(query_seq_lengths=jnp.array([6, 4], jnp.int32),
                 key_value_seq_lengths=jnp.array([9, 5], jnp.int32))
  arrays, kwargs = (q, k, v), {}
  if case == "unbatched_rank3_mask":
    arrays, kwargs = (q[1], k[1], v[1]), dict(mask=mask, is_causal=True)
  elif case == "seq_lengths_rank3_bias":
    arrays, kwargs = (q, k, v, bias), dict(lengths, is_causal=True)
  elif case == "residual_gqa":
    kwargs = dict(mask=mask, return_residual=True)
  else:
    arrays, kwargs = (q[0], k[0], v[0], bias), dict(return_residual=True, local_window_size=2)
  ours, our_grads = _with_cotangents(
      lambda *a: ops.dot_product_attention(*a, **kwargs), *arrays)
  theirs, their_grads = _with_cotangents(
      lambda *a: jax.nn.dot_product_attention(*a, **kwargs), *arrays)
  for got, want in zip(jax.tree.leaves((ours, our_grads)), jax.tree.leaves((theirs, their_grads))):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if kwargs.get("return_residual"):  # The log-sum-exp of the attended logits.
    out, lse = ours
    assert lse.shape == out.shape[:-1]


def test_seq_lengths_errors_like_jax_nn():
  q, k, v = _qkv(t=6, s=9)
  for bad in (dict(query_seq_lengths=jnp.array([6.0, 4.0])),
              dict(key_value_seq_lengths=jnp.array([9, 5, 1], jnp.int32))):
    with pytest.raises(ValueError):
      jax.nn.dot_product_attention(q, k, v, **bad)
    with pytest.raises(ValueError, match="seq_lengths must"):
      ops.dot_product_attention(q, k, v, **bad)


def test_fully_masked_rows_give_zeros_and_finite_grads():
  q, k, v = _qkv(t=6, s=6, k=4)
  mask = np.ones((2, 1, 6, 6), bool)
  mask[0, :, 2] = False  # Row 2 of batch 0 sees nothing.
  mask = jnp.asarray(mask)
  out = ops.dot_product_attention(q, k, v, mask=mask)
  assert np.all(np.asarray(out[0, 2]) == 0.0)
  assert np.all(np.abs(np.asarray(out[1, 2])) > 0)
  # Segments with disjoint q/kv ids also leave rows empty.
  seg = (jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))
  assert np.all(np.asarray(ops.dot_product_attention(q, k, v, segment_ids=seg)) == 0.0)
  grads = jax.grad(lambda q, k, v: ops.dot_product_attention(q, k, v, mask=mask).sum(),
                   (0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  assert np.all(np.asarray(grads[0][0, 2]) == 0.0)



def test_masked_softmax_broadcasts_logits_and_mask():
  # The softmax runs on [rows, kv] rows: logits and mask broadcast against each other first,
  # rows with nothing to attend to stay zero, the gradient flows through the broadcast.
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(1, 3, 1, 5, 6)), jnp.float32)
  mask = rng.random((2, 1, 1, 5, 6)) > 0.4
  mask[1, 0, 0, 2] = False
  mask = jnp.asarray(mask)
  cot = jnp.asarray(rng.normal(size=(2, 3, 1, 5, 6)), jnp.float32)

  @jax.jit
  def run(x):
    softmax = ops.common.masked_softmax if x.dtype == jnp.float32 else ref.masked_softmax
    return jax.vjp(lambda x: softmax(x, mask), x)[1](cot.astype(x.dtype))[0], softmax(x, mask)

  grad, probs = run(logits)
  with ref.x64():
    want_grad, want_probs = run(ref.f64(logits))
  assert probs.shape == (2, 3, 1, 5, 6) and probs.dtype == jnp.float32
  assert np.all(np.asarray(probs[1, :, 0, 2]) == 0.0)
  np.testing.assert_allclose(probs, want_probs, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_masked_softmax_row_of_minus_inf_logits_gives_zeros():
  # A row whose visible logits are all -inf (a -inf bias) has no key to attend to: zeros, not
  # a uniform row over its masked keys.
  logits = jnp.asarray([[0.0, 1.0, 2.0], [-jnp.inf, -jnp.inf, 5.0]], jnp.float32)
  mask = jnp.asarray([[True, True, False], [True, True, False]])
  probs = ops.common.masked_softmax(logits, mask)
  np.testing.assert_allclose(probs[0], [np.exp(-1) / (1 + np.exp(-1)), 1 / (1 + np.exp(-1)), 0],
                             rtol=1e-6)
  np.testing.assert_array_equal(probs[1], [0.0, 0.0, 0.0])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
@pytest.mark.parametrize("length", [256, 512])
@pytest.mark.parametrize("case", ["plain", "causal", "mask", "window", "gqa_causal"])
def test_xla_path_compiles_to_no_more_than_jax_nn(case, length):
  # The masked softmax is one pass whose empty-row zeros cost no extra pass (no flag beside it,
  # no clamp between the max and the exp), and the backward keeps one [.., t, s] residual: no
  # more fusions than jax.nn's program, forward and forward+backward, and no more temporary
  # memory. Compiled only, never run.
  q, k, v = _qkv(b=1, t=length, s=length, n=8, k=2 if case == "gqa_causal" else 8, d=64)
  kwargs = {"plain": {}, "causal": dict(is_causal=True), "gqa_causal": dict(is_causal=True),
            "mask": dict(mask=jnp.asarray(
                np.random.default_rng(0).random((1, 1, length, length)) > 0.3)),
            "window": dict(local_window_size=(64, 0))}[case]

  def compiled(attn, grad):
    fn = jax.grad(lambda *a: jnp.sum(attn(*a) ** 2), (0, 1, 2)) if grad else attn
    out = jax.jit(fn).lower(q, k, v).compile()
    text = out.as_text()
    return text[text.index("ENTRY"):].count(" fusion("), out.memory_analysis().temp_size_in_bytes

  ours = lambda q, k, v: ops.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  for grad in (False, True):
    (our_fusions, our_bytes), (their_fusions, their_bytes) = (
        compiled(ours, grad), compiled(theirs, grad))
    assert our_fusions <= their_fusions, (grad, our_fusions, their_fusions)
    assert our_bytes <= their_bytes, (grad, our_bytes, their_bytes)


def test_bf16_uses_float32_statistics():
  q, k, v = _qkv(t=33, s=33, k=2, dtype=jnp.bfloat16)
  out = ops.dot_product_attention(q, k, v, is_causal=True)
  assert out.dtype == jnp.bfloat16
  with ref.x64():
    expected = ref.softmax_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32),
                                     mask=ref.full_mask(2, 4, 33, 33, is_causal=True))
  np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=2e-2, rtol=2e-2)


def test_causal_outputs_ignore_future():
  q, k, v = _qkv(t=9, s=9, k=2)
  out = ops.dot_product_attention(q, k, v, is_causal=True)
  k2 = k.at[:, 5:].set(7.0)
  v2 = v.at[:, 5:].set(-3.0)
  out2 = ops.dot_product_attention(q, k2, v2, is_causal=True)
  np.testing.assert_array_equal(out[:, :5], out2[:, :5])
  assert not np.allclose(out[:, 5:], out2[:, 5:])


def test_scale_argument():
  q, k, v = _qkv(t=5, s=5, k=4)
  out = ops.dot_product_attention(q, k, v, scale=0.3)
  with ref.x64():
    expected = ref.softmax_attention(q, k, v, scale=0.3)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q[0], k, v), "query must have rank 4"),
    (lambda q, k, v: (q, k[..., :4], v), "key head_dim"),
    (lambda q, k, v: (q[:, :, :3], k, v), "divisible"),
    (lambda q, k, v: (q, k, v[:, :3]), "sequence length"),
    (lambda q, k, v: (q, k[:1], v[:1]), "batch size"),
])
def test_bad_shapes_raise_value_error(make, match):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    ops.dot_product_attention(*make(q, k, v))


def test_bad_arguments_raise_naming_them():
  q, k, v = _qkv(t=7, s=11)
  with pytest.raises(TypeError, match="query must have a floating dtype"):
    ops.dot_product_attention(q.astype(jnp.int32), k, v)
  with pytest.raises(ValueError, match="mask of shape"):
    ops.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 7, 10), bool))
  with pytest.raises(TypeError, match="mask must be boolean"):
    ops.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 7, 11)))
  with pytest.raises(ValueError, match="bias must have rank 4"):
    ops.dot_product_attention(q, k, v, bias=jnp.ones((1, 2, 4, 7, 11)))
  with pytest.raises(ValueError, match="bias of shape"):
    ops.dot_product_attention(q, k, v, bias=jnp.ones((7, 10)))
  with pytest.raises(ValueError, match="q_segment_ids must have shape"):
    ops.dot_product_attention(q, k, v, segment_ids=jnp.zeros((2, 11), jnp.int32))
  with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
    ops.dot_product_attention(q, k, v, segment_ids=(jnp.zeros((2, 7)), jnp.zeros((2, 11))))
  with pytest.raises(ValueError, match="local_window_size"):
    ops.dot_product_attention(q, k, v, local_window_size=(1, 2, 3))
  with pytest.raises(ValueError, match="implementation must be one of"):
    ops.dot_product_attention(q, k, v, implementation="triton")
  with pytest.raises(ValueError, match="logits_soft_cap must be a positive number"):
    ops.dot_product_attention(q, k, v, logits_soft_cap=0.0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on GPUs")
def test_cudnn_off_gpu_raises_clearly():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
    ops.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.gpu_only
def test_cudnn_matches_xla_on_gpu():
  q, k, v = _qkv(t=128, s=128, k=2, d=64, dtype=jnp.bfloat16)
  out = ops.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  expected = ops.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(out.astype(jnp.float32), expected.astype(jnp.float32),
                             atol=2e-2, rtol=2e-2)
