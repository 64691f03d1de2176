"""The op registry, `as_attention_fn` inside Flax, and the Linen `Attention` layer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools
import inspect
import warnings

from big_attn import ops, parallel
from big_attn.layers import Attention
from big_attn.ops import registry
from big_attn.parallel import linear_state
from tests import reference as ref

CORE_OPS = ("softmax", "sigmoid", "clipped_softmax", "gated_attention", "cog", "performer",
            "focused_linear", "lognormal_linear", "lightning", "agent", "latte",
            "neighborhood", "retention", "normalized")


def test_core_ops_are_registered():
  missing = set(CORE_OPS) - set(ops.names())
  assert not missing, f"unregistered: {missing}"
  assert ops.names() == sorted(ops.names())


def test_unknown_name_lists_known_ops():
  with pytest.raises(KeyError, match="unknown attention op 'nope'.*softmax"):
    ops.get("nope")


def test_duplicate_registration_raises():
  with pytest.raises(ValueError, match="already registered"):
    ops.register("softmax")(lambda q, k, v: q)
  name = "test_only_identity"
  try:
    ops.register(name)(lambda q, k, v, **_: v)
    assert ops.get(name) is not None
    with pytest.raises(ValueError, match="already registered"):
      ops.register(name)(lambda q, k, v, **_: q)
  finally:
    registry._OPS.pop(name, None)  # pylint: disable=protected-access


def test_every_op_has_the_common_signature_and_a_docstring():
  for name in ops.names():
    fn = ops.get(name)
    params = inspect.signature(fn).parameters
    assert list(params)[:3] == ["query", "key", "value"], name
    for kw in ("mask", "is_causal", "scale"):
      assert kw in params and params[kw].kind == inspect.Parameter.KEYWORD_ONLY, (name, kw)
    assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name


def test_op_spec_declarations_match_the_op_signatures():
  """The flags of `ops.register` are declared by hand: this is the check that they are right."""
  for name in ops.names():
    spec = ops.spec(name)
    params = inspect.signature(spec.fn).parameters
    assert spec.name == name and spec.fn is ops.get(name)
    for flag in ("segment_ids", "implementation", "bias", "grid"):
      assert getattr(spec, flag) == (flag in params), (name, flag)
  assert sorted(n for n in ops.names() if ops.spec(n).softmax_form) == ["ngpt", "softmax"]
  with pytest.raises(TypeError, match="segment_ids must be a bool"):
    ops.register("test_only_flag", segment_ids="yes")


@pytest.mark.parametrize("name", ["softmax", "ngpt"])
def test_softmax_form_is_the_op(name):
  """op(q, k, v, **args) = softmax(scale'·q'k'ᵀ, causal) v with (q', k', scale') its softmax
  form, the float64 reference."""
  q, k, v = (ref.normal(i, (2, 5, 4, 8)) for i in range(3))
  args = {"s_qk": ref.normal(3, (4, 8)) + 2.0} if name == "ngpt" else {}
  spec = ops.spec(name)
  out = spec.fn(q, k, v, is_causal=True, **args)
  q2, k2, scale = spec.softmax_form(q, k, None, **args)
  with ref.x64():
    want = ref.softmax_attention(q2, k2, v, scale=scale,
                                 mask=ref.full_mask(2, 4, 5, 5, is_causal=True))
  np.testing.assert_allclose(out, want, **ref.F32_TOL)
  if name == "softmax":
    with pytest.raises(ValueError, match="take no op arguments"):
      spec.softmax_form(q, k, None, logits_soft_cap=1.0)


def test_as_attention_fn_in_flax_multihead_attention():
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  mask = nn.make_causal_mask(jnp.ones((2, 6)))
  ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=ops.as_attention_fn("softmax"))
  theirs = nn.MultiHeadDotProductAttention(num_heads=4)
  params = theirs.init(jax.random.key(1), x, mask=mask)
  np.testing.assert_allclose(ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask),
                             atol=1e-5, rtol=1e-5)


def test_as_attention_fn_binds_mechanism_args():
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  layer = nn.MultiHeadDotProductAttention(
      num_heads=2, attention_fn=ops.as_attention_fn("softmax", logits_soft_cap=1.0))
  params = layer.init(jax.random.key(1), x)
  plain = nn.MultiHeadDotProductAttention(num_heads=2).apply(params, x)
  capped = layer.apply(params, x)
  assert capped.shape == plain.shape and not np.allclose(capped, plain)


@pytest.mark.parametrize("batch_shape", [(), (3, 2)])
def test_as_attention_fn_is_flax_default_attention(batch_shape):
  """Unbatched and several batch axes, attention dropout and `sow_weights`: the softmax op
  gives what Flax's default `attention_fn` gives (outputs, sown weights, gradients)."""
  x = jax.random.normal(jax.random.key(0), batch_shape + (6, 16))
  mask = nn.make_causal_mask(jnp.ones(batch_shape + (6,)))
  ours, theirs = (nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.3, **fn)
                  for fn in (dict(attention_fn=ops.as_attention_fn("softmax")), {}))
  params = theirs.init(jax.random.key(1), x, mask=mask, deterministic=True)

  def run(layer):  # Output, sown weights and parameter gradients in one compiled call.
    def loss(p):
      out, sown = layer.apply(p, x, mask=mask, deterministic=False, sow_weights=True,
                              rngs={"dropout": jax.random.key(2)}, mutable=["intermediates"])
      return jnp.sum(out ** 2), (out, sown["intermediates"]["attention_weights"][0])
    (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return aux, grads

  ((out, weights), grads), ((want, want_weights), want_grads) = run(ours), run(theirs)
  assert out.shape == batch_shape + (6, 16)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert weights.shape == batch_shape + (4, 6, 6)
  np.testing.assert_allclose(weights, want_weights, atol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_as_attention_fn_bad_dtypes_and_missing_dropout_rng():
  fn = ops.as_attention_fn("softmax")
  q = jnp.ones((2, 5, 2, 4))
  with pytest.raises(TypeError, match="dtype must be floating"):
    fn(q, q, q, dtype=jnp.int32)
  with pytest.raises(TypeError, match="query must have a floating dtype"):
    fn(q.astype(jnp.int32), q, q)
  with pytest.raises(ValueError, match="dropout_rng"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False)


def _layer_reference(params, x, context, num_heads, num_kv_heads, mask):
  """The layer's forward written out: projections, repeated kv heads, softmax, output."""
  p = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params["params"],
                   is_leaf=lambda a: hasattr(a, "value"))
  q = jnp.einsum("btf,fnd->btnd", x, p["query"]["kernel"])
  k = jnp.einsum("bsf,fnd->bsnd", context, p["key"]["kernel"])
  v = jnp.einsum("bsf,fnd->bsnd", context, p["value"]["kernel"])
  out = ref.softmax_attention(q, k, v, mask=mask)
  del num_heads, num_kv_heads
  return jnp.einsum("btnd,ndf->btf", out, ref.f64(p["out"]["kernel"]))


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_attention_layer_self_and_cross(num_kv_heads):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  ctx = jax.random.normal(jax.random.key(1), (2, 9, 16))
  layer = Attention(num_heads=4, num_kv_heads=num_kv_heads)
  params = layer.init(jax.random.key(2), x)
  kv = num_kv_heads or 4
  assert params["params"]["key"]["kernel"].value.shape == (16, kv, 4)
  assert params["params"]["query"]["kernel"].names == ("embed", "heads", "head_dim")
  out = layer.apply(params, x, is_causal=True)
  cross = layer.apply(params, x, ctx)
  with ref.x64():
    causal = ref.full_mask(2, 4, 5, 5, is_causal=True)
    expected = _layer_reference(params, ref.f64(x), ref.f64(x), 4, kv, causal)
    expected_cross = _layer_reference(params, ref.f64(x), ref.f64(ctx), 4, kv, None)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cross, expected_cross, atol=1e-5, rtol=1e-5)


def test_attention_layer_segments_qk_norm_and_bf16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2]] * 2)
  layer = Attention(num_heads=4, head_dim=16, qk_norm=True, use_bias=True, dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(1), x)
  assert "query_norm" in params["params"] and params["params"]["out"]["bias"].names == ("embed",)
  out = layer.apply(params, x, segment_ids=seg)
  assert out.shape == (2, 8, 32) and out.dtype == jnp.bfloat16
  # Tokens of segment 0 are blind to the other segments.
  x2 = x.at[:, 3:].set(5.0)
  out2 = layer.apply(params, x2, segment_ids=seg)
  np.testing.assert_array_equal(out[:, :3], out2[:, :3])


def test_attention_layer_gradients_flow():
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  layer = Attention(num_heads=2, qk_norm=True)
  params = layer.init(jax.random.key(1), x)
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x, is_causal=True) ** 2))(params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_attention_layer_bad_config():
  x = jnp.ones((2, 6, 16))
  with pytest.raises(ValueError, match="num_heads .* divisible by num_kv_heads"):
    Attention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="features .* divisible by num_heads"):
    Attention(num_heads=5).init(jax.random.key(0), x)
  with pytest.raises(KeyError, match="unknown attention op"):
    Attention(num_heads=4, op="nope").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="inputs_q must be"):
    Attention(num_heads=4).init(jax.random.key(0), x[0])


def test_attention_layer_params_shard_by_logical_axes_under_a_mesh():
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None))
  layer = Attention(num_heads=4, num_kv_heads=2, use_bias=True)
  x = jnp.ones((2, 6, 16))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    params = jax.jit(layer.init, out_shardings=shardings)(jax.random.key(0), x)
    out = jax.jit(layer.apply)(params, x)
  spec = params["params"]["query"]["kernel"].value.sharding.spec
  assert tuple(spec) == ("fsdp", "tensor", None)
  assert tuple(params["params"]["out"]["kernel"].value.sharding.spec) == ("tensor", None, "fsdp")
  np.testing.assert_allclose(out, layer.apply(jax.device_get(params), x), atol=1e-5)


def test_attention_context_and_deprecated_inputs_kv():
  x, ctx = ref.normal(0, (2, 5, 16)), ref.normal(1, (2, 7, 16))
  layer = Attention(num_heads=4)
  params = layer.init(jax.random.key(0), x, context=ctx)
  want = layer.apply(params, x, context=ctx)
  with pytest.warns(DeprecationWarning, match="inputs_kv"):
    got = layer.apply(params, x, inputs_kv=ctx)
  np.testing.assert_array_equal(got, want)
  with warnings.catch_warnings(), pytest.raises(ValueError, match="not both"):
    warnings.simplefilter("ignore", DeprecationWarning)
    layer.apply(params, x, ctx, inputs_kv=ctx)


def test_attention_refuses_undeclared_arguments_and_forms():
  x = jnp.ones((1, 4, 8))
  init = lambda **kw: jax.eval_shape(  # pylint: disable=unnecessary-lambda-assignment
      Attention(num_heads=2, **kw).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="op 'clipped_softmax' takes no `implementation` argument"):
    init(op="clipped_softmax", implementation="xla")
  with pytest.raises(ValueError, match="op 'lightning' takes no `bias` argument"):
    init(op="lightning", op_args={"bias": jnp.zeros((1, 1, 4, 4))})
  with pytest.raises(ValueError, match="op 'agent' has no decoding form"):
    init(op="agent", decode=True, cache_len=4)
  sp = parallel.SeqParallel(jax.make_mesh((4,), ("seq",)), "seq", "ring")
  with pytest.raises(ValueError, match="op 'agent' has no sequence-parallel form"):
    init(op="agent", seq_parallel=sp)
  with pytest.raises(ValueError, match="exclusive"):
    init(decode=True, cache_len=4, seq_parallel=sp)
  with pytest.raises(ValueError, match="strategy must be one of"):
    parallel.SeqParallel(sp.mesh, "seq", "zigzag")


def test_attention_sequence_parallel_and_cached_equal_plain():
  """`seq_parallel` (ring over 4 shards, with segments) and `decode` (prefill 5 tokens, then 1)
  give the plain layer's outputs and gradients, for ngpt (a softmax form that transforms the
  queries and keys; the LM tests cover softmax)."""
  x = ref.normal(0, (2, 8, 16))
  seg = jnp.array([[0] * 3 + [1] * 5, [0] * 8])
  layer = Attention(num_heads=4, num_kv_heads=2, op="ngpt", rope_base=100.)
  params = layer.init(jax.random.key(1), x)
  sp = parallel.SeqParallel(jax.make_mesh((4,), ("seq",)), "seq", "ring")

  @jax.jit
  def outputs(params):
    loss = lambda p, lay: jnp.sum(  # pylint: disable=g-long-lambda
        lay.apply(p, x, is_causal=True, segment_ids=seg) ** 2)
    grads = [jax.value_and_grad(loss)(params, lay) for lay in (layer, layer.clone(
        seq_parallel=sp))]
    decoder, positions = layer.clone(decode=True, cache_len=8), jnp.arange(8)
    prefill, cache = decoder.apply(params, x[:, :5], is_causal=True, positions=positions[:5],
                                   mutable=["cache"])
    step, cache = decoder.apply({**params, **cache}, x[:, 5:6], is_causal=True,
                                positions=positions[5:6], mutable=["cache"])
    full = layer.apply(params, x, is_causal=True)
    return grads, (prefill, step, full), cache["cache"]["cache"]["index"]

  ((value, grads), (sp_value, sp_grads)), (prefill, step, full), index = outputs(params)
  np.testing.assert_allclose(sp_value, value, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(sp_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(prefill, full[:, :5], **ref.F32_TOL)
  np.testing.assert_allclose(step, full[:, 5:6], **ref.F32_TOL)
  assert index == 6


@pytest.mark.parametrize("op", ["latte", "retention"])
def test_attention_recurrent_ops_run_sequence_parallel_and_cached(op):
  """Ops with a recurrent state form: `seq_parallel` (LASP over 4 contiguous shards) gives the
  plain layer's outputs and gradients (latte's latents included), and `decode` (prefill 5
  tokens, then 1, then 2) the full causal forward; striped order and packed rows in decoding
  are refused, packed rows sequence-parallel give the plain layer's (or are refused with the
  op's reason)."""
  x = ref.normal(0, (2, 8, 16))
  layer = Attention(num_heads=4, num_kv_heads=2, op=op)
  params = layer.init(jax.random.key(1), x)
  sp = parallel.SeqParallel(jax.make_mesh((4,), ("seq",)), "seq", "ring")

  @jax.jit
  def outputs(params):
    loss = lambda p, lay: jnp.sum(lay.apply(p, x, is_causal=True) ** 2)  # noqa: E731
    grads = [jax.value_and_grad(loss)(params, lay) for lay in (layer, layer.clone(
        seq_parallel=sp))]
    decoder = layer.clone(decode=True)
    outs, cache = [], {}
    for lo, hi in ((0, 5), (5, 6), (6, 8)):
      out, cache = decoder.apply({**params, **cache}, x[:, lo:hi], is_causal=True,
                                 mutable=["cache"])
      outs.append(out)
    return grads, jnp.concatenate(outs, axis=1), layer.apply(params, x, is_causal=True)

  ((value, grads), (sp_value, sp_grads)), decoded, full = outputs(params)
  np.testing.assert_allclose(sp_value, value, rtol=1e-4)
  for g, w in zip(jax.tree.leaves(sp_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=f"{op}.*'striped'"):
    layer.clone(seq_parallel=parallel.SeqParallel(sp.mesh, "seq", "striped")).apply(params, x)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]], jnp.int32)
  packed = lambda lay: jax.jit(functools.partial(  # noqa: E731
      lay.apply, is_causal=True, segment_ids=seg))(params, x)
  if op in linear_state.PACKED_REFUSALS:
    with pytest.raises(ValueError, match=f"'{op}'\\): packed rows"):
      packed(layer.clone(seq_parallel=sp))
  else:  # packed rows: the state resets at each run, on every shard
    np.testing.assert_allclose(packed(layer.clone(seq_parallel=sp)), packed(layer),
                               rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="packed sequences"):
    layer.clone(decode=True).apply(params, x, is_causal=True, segment_ids=seg,
                                   mutable=["cache"])
