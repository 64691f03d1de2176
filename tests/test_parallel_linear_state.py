"""The recurrent state form of the causal linear ops (`ops.recurrent`): sequence parallelism
(`parallel.linear_state`, LASP) and decoding equal the single-device causal op, forward and
gradient (w.r.t. q, k, v and the op's weights), on 4 simulated CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_attn import compat, ops
from big_attn.ops import recurrent
from big_attn.parallel import linear_state

# 12 tokens on 4 shards of 3; chunks of 2 when decoding 3 tokens (a full chunk and the rest);
# GQA (4 query heads, 2 kv heads); a DWC window (5 - 1 values) longer than a shard.
B, T, H, KH, D, SHARDS = 2, 12, 4, 2, 4, 4


def _case(name):
  """(differentiable op weights, other op arguments) of `name`."""
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  decays = jnp.asarray([0.9, 0.6, 0.99, 0.75], jnp.float32)
  return {
      "lightning": (dict(decay=decays), dict(block_size=2, output_norm=True)),
      "performer": (dict(features=normal(6, D)), dict(chunk_size=2)),
      "focused_linear": (dict(feature_scale=0.5 + jnp.abs(normal(KH, D)),
                              dwc_kernel=normal(5, KH, D), dwc_bias=normal(KH, D)),
                         dict(chunk_size=2)),
      "lognormal_linear": ({}, dict(chunk_size=2)),
      "fast": ({}, dict(chunk_size=2, scale=1.5)),
      "retention": (dict(gamma=decays), dict(chunk_size=2)),
      "latte": (dict(latents=normal(H, 3, D)), dict(chunk_size=2)),
  }[name]


def _inputs():
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.float32) for n in (H, KH, KH))


def _loss_and_out(attend):
  def loss(q, k, v, weights):
    out = attend(q, k, v, weights)
    return jnp.sum(jnp.sin(out) * jnp.arange(1, out.size + 1).reshape(out.shape) / out.size), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@functools.cache
def _reference(name):
  """Output and gradients of the single-device causal op."""
  _, static = _case(name)
  attend = lambda q, k, v, w: ops.get(name)(q, k, v, is_causal=True, **w, **static)  # noqa: E731
  (_, out), grads = _loss_and_out(attend)(*_inputs(), _case(name)[0])
  return out, grads


def _assert_close(got, want, what):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4,
                             atol=2e-4 * max(1.0, float(np.max(np.abs(want)))), err_msg=what)


def _mesh(explicit):
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  return jax.make_mesh((SHARDS,), ("seq",), axis_types=(kind,), devices=jax.devices()[:SHARDS])


@pytest.mark.parametrize("name", sorted(recurrent.STATE_FORMS))
def test_sequence_parallel_matches_op(name):
  """LASP over 4 contiguous shards: output and gradients w.r.t. q, k, v and the weights (one
  chunk per shard: the uneven chunks of `append` are the decoding test's)."""
  weights, static = _case(name)
  static = {arg: 3 if arg in ("chunk_size", "block_size") else x for arg, x in static.items()}
  spec = P(None, "seq")

  def attend(q, k, v, w):
    per_shard = lambda q, k, v, w: linear_state.linear_state_attention(  # noqa: E731
        q, k, v, op=name, axis_name="seq", **w, **static)
    return compat.shard_map(per_shard, mesh=_mesh(explicit=False),
                            in_specs=(spec, spec, spec, P()), out_specs=spec)(q, k, v, w)

  (_, out), grads = _loss_and_out(attend)(*_inputs(), weights)
  want_out, want_grads = _reference(name)
  _assert_close(out, want_out, f"{name} output")
  for arg, got, want in zip(("query", "key", "value"), grads[:3], want_grads[:3]):
    _assert_close(got, want, f"{name} d{arg}")
  assert set(grads[3]) == set(weights)
  for weight in weights:
    _assert_close(grads[3][weight], want_grads[3][weight], f"{name} d{weight}")


# Packed rows on 4 shards of 3: runs that cross shards, one that starts at a shard boundary,
# one that starts inside a shard, a whole shard continuing a run, one-token runs.
SEGMENTS = np.array([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]])
# lightning (the cheapest) and lognormal_linear (its runs inside a shard read the earlier
# shards' moment sums) by default, the other ops extended (focused_linear: its DWC window
# crosses shards; latte: its recurrence resets at runs itself, also in the layer's test).
PACKED = [name if name in ("lightning", "lognormal_linear")
          else pytest.param(name, marks=pytest.mark.extended)
          for name in sorted(set(recurrent.STATE_FORMS) - set(linear_state.PACKED_REFUSALS))]


@pytest.mark.parametrize("name", PACKED)
def test_sequence_parallel_on_packed_rows(name):
  """LASP with segment_ids: the state resets at each run's start, as the single-device op with
  the same segment ids; output and gradients (w.r.t. q, k, v and the weights)."""
  weights, static = _case(name)
  static = {arg: 3 if arg in ("chunk_size", "block_size") else x for arg, x in static.items()}
  segments = jnp.asarray(SEGMENTS, jnp.int32)
  spec = P(None, "seq")

  def reference(q, k, v, w):
    return ops.get(name)(q, k, v, is_causal=True, segment_ids=segments, **w, **static)

  def attend(q, k, v, w):
    per_shard = lambda q, k, v, s, w: linear_state.linear_state_attention(  # noqa: E731
        q, k, v, op=name, axis_name="seq", segment_ids=s, **w, **static)
    return compat.shard_map(per_shard, mesh=_mesh(explicit=False),
                            in_specs=(spec,) * 4 + (P(),), out_specs=spec)(q, k, v, segments, w)

  (_, want_out), want_grads = _loss_and_out(reference)(*_inputs(), weights)
  (_, out), grads = _loss_and_out(attend)(*_inputs(), weights)
  _assert_close(out, want_out, f"{name} output")
  for arg, got, want in zip(("query", "key", "value"), grads[:3], want_grads[:3]):
    _assert_close(got, want, f"{name} d{arg}")
  for weight in weights:
    _assert_close(grads[3][weight], want_grads[3][weight], f"{name} d{weight}")


@pytest.mark.parametrize("name", sorted(linear_state.PACKED_REFUSALS))
def test_packed_rows_refusal_states_the_reason(name):
  weights, static = _case(name)
  q, k, v = _inputs()
  with pytest.raises(ValueError, match=f"linear_state_attention\\('{name}'\\): packed rows"):
    linear_state.linear_state_attention(q, k, v, op=name, axis_name="seq",
                                        segment_ids=jnp.asarray(SEGMENTS), **weights, **static)


def test_sequence_parallel_on_explicit_mesh():
  """Inputs sharded over an Explicit mesh inside `jax.set_mesh` (retention: the output depends
  on the absolute position)."""
  weights, static = _case("retention")
  mesh = _mesh(explicit=True)
  spec = P(None, "seq")
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in _inputs()]
    out = jax.jit(jax.shard_map(
        lambda q, k, v: linear_state.linear_state_attention(
            q, k, v, op="retention", axis_name="seq", **weights, **static),
        mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))(*args)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "seq", None, None)), 4)
  _assert_close(out, _reference("retention")[0], "retention output")


@pytest.mark.parametrize("name", sorted(recurrent.STATE_FORMS))
def test_decoding_matches_full_forward(name):
  """Appending tokens one by one and three at a time gives the causal output at every position,
  with a state whose size does not grow."""
  weights, static = _case(name)
  q, k, v = _inputs()
  form = recurrent.state_form(name, q[:, :1], k[:, :1], v[:, :1], **weights, **static)
  append = jax.jit(form.append)
  shapes = jax.tree.map(jnp.shape, form.initial)
  for step in (1, 3):
    state, outs = form.initial, []
    for start in range(0, T, step):
      out, state = append(state, q[:, start:start + step], k[:, start:start + step],
                          v[:, start:start + step])
      outs.append(out)
    assert jax.tree.map(jnp.shape, state) == shapes
    assert int(state.position) == T
    _assert_close(jnp.concatenate(outs, axis=1), _reference(name)[0], f"{name} step {step}")


def test_refusals_name_the_op():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="'softmax' has no recurrent state form"):
    recurrent.state_form("softmax", q, k, v)
  with pytest.raises(ValueError, match="'sigmoid' has no recurrent state form"):
    linear_state.linear_state_attention(q, k, v, op="sigmoid", axis_name="seq")
  with pytest.raises(KeyError, match="unknown attention op 'nope'"):
    recurrent.state_form("nope", q, k, v)
  with pytest.raises(ValueError, match="performer state form: mask"):
    recurrent.state_form("performer", q, k, v, feature_key=0, mask=jnp.ones((1, 1, 1, T), bool))
  with pytest.raises(ValueError, match="latte state form: segment_ids"):
    recurrent.state_form("latte", q, k, v, latents=_case("latte")[0]["latents"],
                         segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="token_order must be 'contiguous', got 'striped'"):
    linear_state.linear_state_attention(q, k, v, op="lightning", axis_name="seq",
                                        token_order="striped")
  with pytest.raises(ValueError, match="is_causal must be True"):
    linear_state.linear_state_attention(q, k, v, op="lightning", axis_name="seq",
                                        is_causal=False)
  with pytest.raises(ValueError, match="retention state form: is_causal must be True"):
    recurrent.state_form("retention", q, k, v, is_causal=False)
  with pytest.raises(ValueError, match="axis_name 'seq' is not a bound mesh axis"):
    linear_state.linear_state_attention(q, k, v, op="lightning", axis_name="seq")
  # The op's own argument checks apply.
  with pytest.raises(ValueError, match="decay must be in"):
    recurrent.state_form("lightning", q, k, v, decay=1.5)
  with pytest.raises(ValueError, match="append takes n >= 1 new tokens with as many keys"):
    form = recurrent.state_form("lightning", q, k, v)
    form.append(form.initial, q[:, :2], k[:, :3], v[:, :3])
