"""`bottleneck` (bottleneck tokens: gather, self-attend, broadcast) against a float64
reference that runs its three attentions one by one and never calls `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
_qkv = functools.partial(ref.qkv, t=15)


def _bottleneck_ref(q, k, v, bq, mask):
  """gather Z = softmax(B Kᵀ s) V, then Z' = softmax(Z Zᵀ s) Z, then softmax(Q Z'ᵀ s) Z'."""
  q, k, v, bq = ref.f64(q, k, v, bq)
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  scale = 1.0 / np.sqrt(q.shape[-1])

  def attend(a, b, c, m):
    logits = jnp.einsum("btnd,bsnd->bnts", a, b) * scale
    return jnp.einsum("bnts,bsnd->btnd", ref.masked_softmax(logits, m), c)

  every = np.ones((1, 1, 1, 1), bool)
  z = attend(bq, k, v, every if mask is None else mask)
  z = attend(z, z, z, every)
  return attend(q, z, z, every)


def _segment_means(q, num):
  """Means of `num` contiguous segments, summed token by token."""
  seg = q.shape[1] // num
  return jnp.stack([sum(q[:, p * seg + i] for i in range(seg)) / seg for p in range(num)], 1)


@pytest.mark.parametrize("t,s,kv_heads,masked", [(9, 13, 2, True)])
def test_bottleneck_pooled_matches_reference(t, s, kv_heads, masked):
  q, k, v = _qkv(t=t, s=s, k=kv_heads)
  mask = ref.key_padding(2, s, first_valid=True, invalid=1) if masked else None
  op = functools.partial(ops.get("bottleneck"), num_tokens=3, mask=mask)
  out = ref.assert_matches(op, lambda q, k, v: _bottleneck_ref(q, k, v, _segment_means(q, 3),
                                                               mask), (q, k, v))
  if masked:
    assert np.all(out[1] == 0.0)


def test_bottleneck_given_queries_matches_reference():
  q, k, v = _qkv(t=11, s=7, k=2)
  bq = ref.normal(9, (1, 4, 4, 8))
  op = ops.get("bottleneck")
  ref.assert_matches(lambda q, k, v, b: op(q, k, v, bottleneck_queries=b),
                     lambda q, k, v, b: _bottleneck_ref(q, k, v, jnp.broadcast_to(
                         b, (2,) + b.shape[1:]), None), (q, k, v, bq))
  op = jax.jit(op)
  low = op(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bottleneck_queries=bq)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), op(q, k, v, bottleneck_queries=bq),
                             **BF16_TOL)


@pytest.mark.parametrize("args,match,error", [
    (dict(num_tokens=2.0), "num_tokens", ValueError),
    (dict(num_tokens=5), "num_tokens", ValueError),
    (dict(num_tokens=0), "num_tokens", ValueError),
    (dict(bottleneck_queries=jnp.zeros((2, 3, 4, 4))), "bottleneck_queries", ValueError),
    (dict(num_tokens=2, bottleneck_queries=jnp.zeros((2, 3, 4, 8))), "bottleneck_queries",
     ValueError),
    (dict(num_tokens=3, mask=jnp.ones((2, 1, 12, 12), bool)), "key-padding", ValueError),
    (dict(num_tokens=3, is_causal=True), "causal", NotImplementedError),
])
def test_bottleneck_bad_args(args, match, error):
  q, k, v = _qkv(t=12)
  with pytest.raises(error, match=match):
    ops.get("bottleneck")(q, k, v, **args)
  with pytest.raises(ValueError, match="value"):
    ops.get("bottleneck")(q, k, v[..., :4], num_tokens=3)


def test_bottleneck_layer():
  x = ref.normal(0, (2, 12, 32))
  layer = layers.Attention(num_heads=4, op="bottleneck", op_args=dict(num_tokens=4))
  out = jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.key(0), x), x)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
