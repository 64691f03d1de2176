"""Checks that several op test files share: causality, bfloat16 against float32, the layer.

They compare an op with itself (changed inputs, another dtype); the float64 references are in
`tests/reference.py`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref


def assert_causal_ignores_future(op, arrays, cut):
  """Replacing every array's tokens from `cut` on keeps `op`'s outputs before `cut` and changes
  those after it."""
  out = op(*arrays)
  changed = op(*(x.at[:, cut:].set(ref.normal(20 + i, x[:, cut:].shape))
                 for i, x in enumerate(arrays)))
  np.testing.assert_allclose(np.asarray(out[:, :cut]), np.asarray(changed[:, :cut]), rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(np.asarray(out[:, cut:]), np.asarray(changed[:, cut:]))


def assert_causal_exact_before_later_tokens(op, arrays, cut):
  """Replacing every array's tokens from `cut` on by values of std 30, by NaN and by inf leaves
  `op`'s outputs before `cut` bitwise unchanged (no later token enters them, even at
  round-off)."""
  out = np.asarray(op(*arrays))
  for i, fill in enumerate((None, jnp.nan, jnp.inf)):
    changed = op(*(x.at[:, cut:].set(ref.normal(20 + i + j, x[:, cut:].shape, std=30.0)
                                     if fill is None else fill)
                   for j, x in enumerate(arrays)))
    np.testing.assert_array_equal(np.asarray(changed)[:, :cut], out[:, :cut],
                                  err_msg=f"later tokens replaced by {fill or 'std 30'}")


def assert_causal_ignores_future_keys(op, q, k, v, cut):
  """Shifting the keys and values from `cut` on keeps the outputs of the queries before it."""
  k2 = k.at[:, cut:].add(5.0)
  v2 = v.at[:, cut:].add(-3.0)
  np.testing.assert_allclose(op(q, k, v)[:, :cut], op(q, k2, v2)[:, :cut], rtol=1e-6,
                             atol=1e-6)


def assert_bfloat16_close_to_float32(op, q, k, v):
  """`op` on bfloat16 inputs returns bfloat16 within `ref.BF16_TOL` of its float32 output.

  `op` runs jitted: one compile per dtype costs less than running its primitives one by one.
  """
  op = jax.jit(op)
  out = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), op(q, k, v), **ref.BF16_TOL)


def assert_layer_runs(name, op_args, param_shapes=None, *, length=9, is_causal=True):
  """`layers.Attention` with op `name` (4 heads, 2 K/V heads, width 16) runs on `length` tokens
  with finite outputs; where `param_shapes` is given, the op's parameters have those shapes and
  all receive gradient."""
  model = layers.Attention(num_heads=4, num_kv_heads=2, op=name, op_args=op_args)
  x = ref.normal(0, (2, length, 16))
  params = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(functools.partial(model.apply, is_causal=is_causal))(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  if param_shapes is not None:
    shapes = jax.tree.map(jnp.shape, params["params"]["op_params"])
    assert {n: s.value for n, s in shapes.items()} == param_shapes
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, is_causal=is_causal) ** 2)))(
        params)
    for g in jax.tree.leaves(grads["params"]["op_params"]):
      assert np.abs(np.asarray(g)).sum() > 0


def assert_bad_call_raises(bad_calls, case):
  """Case `case` of `bad_calls()` (pairs `(call, argument)`) raises a ValueError naming the
  argument."""
  call, name = bad_calls()[case]
  with pytest.raises(ValueError, match=name):
    call()


def assert_no_causal_form(name, q, k, v, **args):
  """Op `name` raises a NotImplementedError naming itself for `is_causal=True`."""
  with pytest.raises(NotImplementedError, match=name):
    ops.get(name)(q, k, v, is_causal=True, **args)


def assert_packed_rows_match_segments(op, row_args, segment_args, *, is_causal,
                                      lengths=(3, 5, 4), atol=1e-5):
  """`op` on rows packed with segments of `lengths` (`segment_ids`, arguments `row_args`)
  equals `op` run on each segment alone (arguments `segment_args(length)`), forward and
  gradients wrt q, k, v (to `atol`, float32); GQA heads (4 query, 2 key/value)."""
  bounds = np.cumsum((0,) + tuple(lengths))
  q, k, v = ref.qkv(t=int(bounds[-1]))
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(len(lengths)), np.asarray(lengths)),
                         q.shape[:2])

  def packed(q, k, v):
    return op(q, k, v, is_causal=is_causal, segment_ids=seg, **row_args)

  def separate(q, k, v):
    return jnp.concatenate(
        [op(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=is_causal, **segment_args(int(b - a)))
         for a, b in zip(bounds[:-1], bounds[1:])], axis=1)

  out, grads = ref.out_and_grads(packed, (q, k, v))
  want, want_grads = ref.out_and_grads(separate, (q, k, v))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=atol)
  for name, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=f"d{name}")
