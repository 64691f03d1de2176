"""Sequence parallelism on 8 simulated CPU devices: ring, striped and all-gather attention.

Every sharded result (forward and dQ, dK, dV) is compared with an independent float64 reference
of softmax attention (`tests.reference`) evaluated on the whole, unsharded sequence.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_attn import compat
from big_attn import parallel
from big_attn.parallel import blockwise
from tests import reference


def _inputs(b, s, n, k, d, dv, *, seed, segments):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, s, n, d)).astype(np.float32)
  kk = rng.normal(size=(b, s, k, d)).astype(np.float32)
  v = rng.normal(size=(b, s, k, dv)).astype(np.float32)
  ct = rng.normal(size=(b, s, n, dv)).astype(np.float32)
  seg = None
  if segments:  # packed documents of random lengths, different per batch row
    seg = np.sort(rng.integers(0, 4, size=(b, s)), axis=1).astype(np.int32)
  return q, kk, v, ct, seg


def _reference(q, k, v, ct, *, is_causal, segment_ids):
  """float64 output and (dq, dk, dv) of <softmax attention, ct> on the whole sequence."""
  b, s, n, _ = q.shape
  mask = reference.full_mask(b, n, s, k.shape[1], is_causal=is_causal, segment_ids=segment_ids)
  with reference.x64():
    def loss(q, k, v):
      out = reference.softmax_attention(q, k, v, mask=mask)
      return jnp.sum(out * reference.f64(ct)), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*reference.f64(q, k, v))
    return np.asarray(out), [np.asarray(g) for g in grads]


def _assert_close(got, want, name, tol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol, err_msg=name)


def _mesh(shape, names, explicit=True):
  if explicit:
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(names))
  devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names)


# (mesh shape, mesh axes, batch, global seq, heads, kv heads): local sequences are odd (5 or 7)
# and heads grouped (GQA / MQA).
MESHES = {
    "seq8": ((8,), ("seq",), 2, 40, 4, 2),
    "data2_seq4": ((2, 4), ("data", "seq"), 4, 28, 3, 1),
}


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
@pytest.mark.parametrize("mesh_name,is_causal", [
    ("seq8", True), ("seq8", False), ("data2_seq4", True)])
def test_matches_reference(strategy, mesh_name, is_causal):
  shape, names, b, s, n, k = MESHES[mesh_name]
  mesh = _mesh(shape, names)
  q, kk, v, ct, seg = _inputs(b, s, n, k, 8, 6, seed=len(strategy) + s, segments=True)

  def loss(q, kk, v):
    out = parallel.sequence_parallel_attention(
        q, kk, v, mesh=mesh, strategy=strategy, is_causal=is_causal, segment_ids=seg)
    return jnp.sum(out * ct), out

  (grads, out) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, kk, v)
  want_out, want_grads = _reference(q, kk, v, ct, is_causal=is_causal, segment_ids=seg)
  assert out.shape == (b, s, n, 6) and out.dtype == jnp.float32
  if "data" in names:  # the batch stays sharded over data, the sequence over seq
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "seq", None, None)), 4)
  _assert_close(out, want_out, "out")
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(got, want, name)


def _mesh_kinds_case(strategy, explicit, use_jit, set_mesh):
  """Forward and gradients through `sequence_parallel_attention` on a 2-device mesh built by
  `jax.make_mesh` (Explicit or Auto axes), jitted or eager, inside `jax.set_mesh` or not."""
  axis_type = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((2,), ("seq",), axis_types=(axis_type,), devices=jax.devices()[:2])
  q, kk, v, ct, _ = _inputs(1, 6, 2, 1, 8, 8, seed=3, segments=False)

  def loss(q, kk, v):
    out = parallel.sequence_parallel_attention(q, kk, v, mesh=mesh, strategy=strategy)
    return jnp.sum(out * ct), out

  grad_fn = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    grads, out = (jax.jit(grad_fn) if use_jit else grad_fn)(q, kk, v)
  want_out, want_grads = _reference(q, kk, v, ct, is_causal=True, segment_ids=None)
  _assert_close(out, want_out, "out")
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(got, want, name)
  # Laid out over the sequence axis; typed as sharded only where the caller's mesh context is
  # Explicit (elsewhere an Explicit type could not be used: no mesh to resolve it).
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "seq", None, None)), 4)
  assert (jax.typeof(out).sharding.spec[1] == "seq") == (explicit and set_mesh)


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
@pytest.mark.parametrize("set_mesh", [False, True], ids=["no_set_mesh", "set_mesh"])
def test_mesh_kinds_jit(strategy, explicit, set_mesh):
  _mesh_kinds_case(strategy, explicit, use_jit=True, set_mesh=set_mesh)


@pytest.mark.parametrize("strategy,explicit,set_mesh", [
    ("ring", True, False),  # the README's call: jax.make_mesh, no mesh context, jax.grad
    ("all_gather", True, False), ("all_gather", True, True), ("all_gather", False, False)])
def test_mesh_kinds_eager(strategy, explicit, set_mesh):
  """Without `jit` (each op dispatched on its own; ring eager is the slow one, ~15 s)."""
  _mesh_kinds_case(strategy, explicit, use_jit=False, set_mesh=set_mesh)


def test_explicitly_sharded_inputs_keep_their_type():
  """Inputs typed as sharded over an Explicit mesh (inside `jax.set_mesh`), with segments:
  the striped reshapes and their gradients stay on the Explicit path, gradients typed like
  the inputs."""
  mesh = jax.make_mesh((2, 2), ("data", "seq"), devices=jax.devices()[:4])
  q, kk, v, ct, seg = _inputs(2, 8, 2, 1, 8, 8, seed=11, segments=True)

  def loss(q, kk, v):
    out = parallel.sequence_parallel_attention(q, kk, v, mesh=mesh, segment_ids=seg)
    return jnp.sum(out * ct), out

  with jax.set_mesh(mesh):
    args = [jax.device_put(x, NamedSharding(mesh, P("data", "seq"))) for x in (q, kk, v)]
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
  want_out, want_grads = _reference(q, kk, v, ct, is_causal=True, segment_ids=seg)
  _assert_close(out, want_out, "out")
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(got, want, name)
    assert jax.typeof(got).sharding.spec[:2] == P("data", "seq")[:2], name


def test_unmatched_segments_give_zero_rows_and_grads():
  """Query tokens whose segment has no key anywhere get zeros, and no NaN gradients."""
  mesh = _mesh((8,), ("seq",))
  q, kk, v, ct, _ = _inputs(1, 16, 2, 2, 4, 4, seed=3, segments=False)
  q_seg = np.zeros((1, 16), np.int32)
  q_seg[0, 5:9] = 7  # segment 7 exists only among the queries
  kv_seg = np.zeros((1, 16), np.int32)
  for strategy in ("ring", "striped"):
    def loss(q, kk, v, strategy=strategy):
      out = parallel.sequence_parallel_attention(
          q, kk, v, mesh=mesh, strategy=strategy, is_causal=False, segment_ids=(q_seg, kv_seg))
      return jnp.sum(out * ct), out
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, kk, v)
    want_out, want_grads = _reference(q, kk, v, ct, is_causal=False,
                                      segment_ids=(q_seg, kv_seg))
    np.testing.assert_array_equal(np.asarray(out)[0, 5:9], 0.0)
    _assert_close(out, want_out, strategy)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
      assert np.isfinite(np.asarray(got)).all()
      _assert_close(got, want, f"{strategy} {name}")


def test_per_shard_functions_in_user_shard_map():
  """`ring_attention` / `striped_attention` inside the user's own shard_map (Auto mesh axes),
  the user striping the tokens; MQA and a scale."""
  mesh = _mesh((4,), ("sp",), explicit=False)
  q, kk, v, _, seg = _inputs(2, 24, 3, 1, 8, 8, seed=5, segments=True)
  mask = reference.full_mask(2, 3, 24, 24, is_causal=True, segment_ids=seg)
  with reference.x64():
    want = np.asarray(reference.softmax_attention(q, kk, v, mask=mask, scale=0.5))
  spec = P(None, "sp")
  identity = lambda x: x
  for attend, to_order, from_order in (
      (parallel.ring_attention, identity, identity),
      (parallel.striped_attention, functools.partial(parallel.stripe, num_shards=4),
       functools.partial(parallel.unstripe, num_shards=4))):
    fn = jax.jit(compat.shard_map(
        lambda q, k, v, s, attend=attend: attend(
            q, k, v, axis_name="sp", is_causal=True, segment_ids=s, scale=0.5),
        mesh=mesh, in_specs=(spec,) * 4, out_specs=spec))
    out = fn(*(to_order(jnp.asarray(x)) for x in (q, kk, v, seg)))
    _assert_close(from_order(out), want, attend.__name__)


def test_cross_attention_lengths():
  """Non-causal attention with q_len != kv_len, every strategy (forward), Auto mesh axes."""
  mesh = _mesh((8,), ("seq",), explicit=False)
  q, _, _, _, _ = _inputs(1, 16, 2, 2, 4, 4, seed=11, segments=False)
  _, kk, v, _, _ = _inputs(1, 24, 2, 2, 4, 4, seed=12, segments=False)
  with reference.x64():
    want = np.asarray(reference.softmax_attention(q, kk, v))
  for strategy in parallel.STRATEGIES:
    out = jax.jit(functools.partial(parallel.sequence_parallel_attention, mesh=mesh,
                                    strategy=strategy, is_causal=False))(q, kk, v)
    _assert_close(out, want, strategy)


def test_tensor_and_fsdp_axes_keep_their_sharding():
  mesh = _mesh((2, 2, 2), ("fsdp", "seq", "tensor"))
  q, kk, v, _, _ = _inputs(2, 12, 4, 2, 8, 8, seed=7, segments=False)
  out = jax.jit(functools.partial(parallel.sequence_parallel_attention, mesh=mesh))(q, kk, v)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "seq", "tensor", None)), 4)
  mask = reference.full_mask(2, 4, 12, 12, is_causal=True)
  with reference.x64():
    want = np.asarray(reference.softmax_attention(q, kk, v, mask=mask))
  _assert_close(out, want, "striped on fsdp x seq x tensor")


def test_bfloat16_striped_causal():
  """bfloat16 inputs: float32 statistics inside, outputs and gradients in bfloat16."""
  mesh = _mesh((8,), ("seq",))
  q, kk, v, ct, seg = _inputs(1, 32, 2, 1, 8, 8, seed=9, segments=True)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)

  def loss(q, kk, v):
    out = parallel.sequence_parallel_attention(q, kk, v, mesh=mesh, segment_ids=seg)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(bf16(q), bf16(kk),
                                                                        bf16(v))
  rounded = [np.asarray(bf16(x), np.float32) for x in (q, kk, v)]
  want_out, want_grads = _reference(*rounded, ct, is_causal=True, segment_ids=seg)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  _assert_close(out, want_out, "out", tol=3e-2)
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(got, want, name, tol=5e-2)


def test_stripe_layout_and_inverse():
  x = np.arange(2 * 12 * 3).reshape(2, 12, 3)
  striped = np.asarray(parallel.stripe(jnp.asarray(x), 4))
  # Contiguous shard j of the striped array holds tokens j, j+4, j+8.
  for j, shard in enumerate(np.split(striped, 4, axis=1)):
    np.testing.assert_array_equal(shard, x[:, j::4])
  np.testing.assert_array_equal(parallel.unstripe(jnp.asarray(striped), 4), x)
  np.testing.assert_array_equal(
      parallel.unstripe(parallel.stripe(jnp.asarray(x), 3, axis=-1), 3, axis=-1), x)
  np.testing.assert_array_equal(parallel.stripe(jnp.asarray(x), 1), x)


@pytest.mark.parametrize("schedule", blockwise.SCHEDULES)
def test_block_plan_is_the_causal_rule(schedule):
  """Per block, the plan admits exactly the (query, key) pairs of global causal attention."""
  shards, length = 4, 3
  for i in range(shards):
    for j in range(shards):
      kind, offset = blockwise.block_plan(schedule, True, i, j)
      a = np.arange(length)[:, None]
      b = np.arange(length)[None, :]
      if schedule == "ring":
        visible = b + j * length <= a + i * length
      else:
        visible = b * shards + j <= a * shards + i
      planned = {blockwise.SKIP: np.zeros_like(visible), blockwise.FULL: np.ones_like(visible),
                 blockwise.TRIANGLE: b <= a + (offset if offset is not None else 0)}[kind]
      np.testing.assert_array_equal(planned, visible, err_msg=f"{schedule} ({i}, {j})")
      assert blockwise.visible_pair_count(kind, offset, length) == visible.sum()
  kinds = {blockwise.block_plan(schedule, False, i, j) for i in range(3) for j in range(3)}
  assert kinds == {(blockwise.FULL, None)}


def test_striped_balances_causal_work():
  """At every ring step, ring leaves devices idle while striped keeps all of them busy."""
  shards, length = 8, 64
  per_step = {}
  for schedule in blockwise.SCHEDULES:
    work = np.array([[blockwise.block_score_count(
        blockwise.block_plan(schedule, True, i, (i - s) % shards)[0], length, length)
                      for i in range(shards)] for s in range(shards)])
    per_step[schedule] = work
  assert (per_step["ring"] == 0).any() and (per_step["striped"] > 0).all()
  critical = {k: w.max(axis=1).sum() for k, w in per_step.items()}
  assert critical["ring"] > 1.4 * critical["striped"]


@pytest.mark.parametrize("strategy", ["ring", "striped"])
def test_memory_stays_per_shard(strategy):
  """fwd+bwd temporaries per device for 8 x 1024 tokens stay far below one global score matrix."""
  mesh = _mesh((8,), ("seq",))
  s = 8 * 1024
  x = jax.ShapeDtypeStruct((1, s, 1, 16), jnp.float32)
  loss = lambda q, k, v: jnp.sum(parallel.sequence_parallel_attention(
      q, k, v, mesh=mesh, strategy=strategy, is_causal=True))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  full_scores = s * s * 4
  assert 0 < temp < full_scores / 8, (temp, full_scores)


def test_errors():
  mesh = _mesh((8,), ("seq",))
  q = jnp.zeros((1, 12, 2, 4))
  with pytest.raises(ValueError, match="not divisible by the size 8 of mesh axis 'seq'"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh)
  q = jnp.zeros((1, 16, 2, 4))
  with pytest.raises(ValueError, match="'sp' is not an axis of the mesh"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, seq_axis="sp")
  with pytest.raises(ValueError, match="strategy must be one of"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, strategy="ulysses")
  with pytest.raises(ValueError, match="'seq' is not a bound mesh axis"):
    parallel.ring_attention(q, q, q, axis_name="seq")
  with pytest.raises(ValueError, match="not a bound mesh axis"):
    parallel.striped_attention(q, q, q, axis_name="seq", is_causal=True)
  with pytest.raises(ValueError, match="not divisible by num_shards=5"):
    parallel.stripe(q, 5)
  with pytest.raises(ValueError, match="batch size 1 is not divisible"):
    parallel.sequence_parallel_attention(q, q, q, mesh=_mesh((2, 4), ("data", "seq")))
  with pytest.raises(ValueError, match="q_len == kv_len"):
    parallel.sequence_parallel_attention(q, q[:, :8], q[:, :8], mesh=mesh)
  with pytest.raises(ValueError, match="block_impl must be one of"):
    blockwise.get_block_impl("triton")


def test_block_impl_selection():
  """None takes the XLA blocks on CPU (the kernels would only interpret there)."""
  q = jnp.zeros((1, 8, 2, 16))
  assert blockwise.get_block_impl(None, q, q, q) is blockwise.XLA
  assert blockwise.get_block_impl("xla") is blockwise.XLA
  assert blockwise.get_block_impl("pallas") is blockwise.PALLAS
  assert blockwise.get_block_impl(blockwise.PALLAS) is blockwise.PALLAS


@pytest.mark.parametrize("schedule", blockwise.SCHEDULES)
def test_pallas_blocks_match_reference(schedule):
  """block_impl="pallas" (the flash kernels, interpreted on CPU): causal, packed segments and
  GQA, local shards of 7 tokens (not a multiple of the kernels' 16-row tiles); striped passes
  the traced diagonal offset (0 or -1) of its blocks to the kernels."""
  shards = 4
  mesh = _mesh((shards,), ("sp",), explicit=False)
  q, kk, v, ct, seg = _inputs(2, 7 * shards, 4, 2, 16, 16, seed=21, segments=True)
  attend = parallel.ring_attention if schedule == "ring" else parallel.striped_attention
  to_order = from_order = lambda x: x
  if schedule == "striped":
    to_order = functools.partial(parallel.stripe, num_shards=shards)
    from_order = functools.partial(parallel.unstripe, num_shards=shards)
  spec = P(None, "sp")
  sharded = compat.shard_map(
      lambda q, k, v, s: attend(q, k, v, axis_name="sp", is_causal=True, segment_ids=s,
                                block_impl="pallas"),
      mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)

  def loss(q, kk, v):
    out = from_order(sharded(*(to_order(x) for x in (q, kk, v, jnp.asarray(seg)))))
    return jnp.sum(out * ct), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, kk, v)
  want_out, want_grads = _reference(q, kk, v, ct, is_causal=True, segment_ids=seg)
  _assert_close(out, want_out, "out", tol=1e-4)
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(got, want, name, tol=1e-4)


def test_seq_parallel_layout_rule():
  """One rule: batch over data/fsdp, heads over tensor (size > 1, not the sequence axis); a size
  they do not divide raises with strict=True (the global function) and is replicated otherwise
  (a model initialised on one example)."""
  sp = parallel.SeqParallel(_mesh((2, 2, 2), ("data", "tensor", "seq")), "seq", "ring")
  assert sp.num_shards == 2
  assert sp.layout(4, 4, 2) == (("data",), "tensor")
  assert sp.layout(1, 3, 1) == (None, None)
  with pytest.raises(ValueError, match="batch size 3 is not divisible"):
    sp.layout(3, 4, 2, strict=True)
  with pytest.raises(ValueError, match=r"head counts \(4, 1\) must be divisible by the size 2"):
    sp.layout(2, 4, 1, strict=True)
  fsdp = parallel.SeqParallel(_mesh((2, 1, 4), ("fsdp", "data", "seq")), "seq", "striped")
  assert fsdp.layout(2, 1) == (("fsdp",), None)
  with pytest.raises(ValueError, match="'sp' is not an axis of the mesh"):
    parallel.SeqParallel(sp.mesh, "sp", "ring")
