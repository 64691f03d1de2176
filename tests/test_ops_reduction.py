"""`spatial_reduction` (Pyramid Vision Transformer: spatial-reduction attention) and
`channel_attention` (XCiT: cross-covariance attention) against float64 references.

The references pool the key/value image patch by patch from explicit tap lists and evaluate
the attention (over tokens, or over channels) in float64; they never call `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (6, 8)
_qkv = functools.partial(ref.qkv, t=48)


def _reduce_ref(x, grid, size, kernel=None):
  """Patch-wise mean, or kernel-weighted sum, of `[b, h·w, k, c]`: the tokens of every patch
  listed by loops, then combined with the taps' weights."""
  (h, w), (rh, rw) = grid, size
  taps = np.array([[(py * rh + i) * w + px * rw + j for i in range(rh) for j in range(rw)]
                   for py in range(h // rh) for px in range(w // rw)])  # [patches, rh·rw]
  patches = x[:, taps]  # [b, P, rh·rw, k, c]
  if kernel is None:
    return patches.sum(2) / (rh * rw)
  weights = kernel.reshape(rh * rw, -1, kernel.shape[-1])  # [rh·rw, k|1, c]
  return jnp.einsum("bpokc,okc->bpkc", patches, weights)


@pytest.mark.parametrize("t,size,kv_heads,per_head", [(48, (2, 2), 2, False),
                                                      (13, (3, 4), 1, True),
                                                      (48, (2, 4), 4, False)])
def test_spatial_reduction_conv_matches_reference(t, size, kv_heads, per_head):
  """Strided depthwise reduction; q_len may differ from the key/value image (13 queries)."""
  q, k, v = _qkv(t=t, s=48, k=kv_heads, dv=6)
  head_shape = (kv_heads,) if per_head else ()
  wk = ref.normal(11, size + head_shape + (8,), std=0.5)
  wv = ref.normal(12, size + head_shape + (6,), std=0.5)
  op = functools.partial(ops.get("spatial_reduction"), grid=GRID, reduction=size,
                         method="conv")
  ref.assert_matches(
      lambda q, k, v, wk, wv: op(q, k, v, sr_key_kernel=wk, sr_value_kernel=wv),
      lambda q, k, v, wk, wv: ref.softmax_attention(
          q, _reduce_ref(k, GRID, size, wk), _reduce_ref(v, GRID, size, wv)),
      (q, k, v, wk, wv))


def test_spatial_reduction_avg_with_mask_matches_reference():
  """Average pooling (an int ratio); the mask acts on the 12 reduced keys, one query row of
  batch 0 has none left."""
  q, k, v = _qkv(t=10, s=48)
  kvalid = np.random.default_rng(3).random((2, 12)) > 0.3
  qvalid = np.ones((2, 10), bool)
  qvalid[0, 4] = False
  mask = qvalid[:, None, :, None] & kvalid[:, None, None, :]
  op = functools.partial(ops.get("spatial_reduction"), grid=GRID, reduction=2, mask=mask)
  out = ref.assert_matches(
      op, lambda q, k, v: ref.softmax_attention(
          q, _reduce_ref(k, GRID, (2, 2)), _reduce_ref(v, GRID, (2, 2)), mask=mask),
      (q, k, v))
  assert np.all(out[0, 4] == 0.0)


def _channel_ref(q, k, v, mask=None):
  """A = softmax_{c'}(s·Σ_t Q_{t,c} K_{t,c'}) per head; out = V Aᵀ; padded tokens dropped."""
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  if mask is not None:
    used = np.broadcast_to(np.asarray(mask), (q.shape[0], n, q.shape[1], k.shape[1])).any(2)
    k = k * np.moveaxis(used, 1, 2)[..., None]
  attn = jax.nn.softmax(jnp.einsum("btnc,btne->bnce", q, k) / np.sqrt(q.shape[-1]), axis=-1)
  out = jnp.einsum("bnce,btne->btnc", attn, v)
  if mask is not None:
    rows = np.broadcast_to(np.asarray(mask), (q.shape[0], n, q.shape[1], k.shape[1])).any(-1)
    out = out * np.moveaxis(rows, 1, 2)[..., None]
  return out


@pytest.mark.parametrize("t,kv_heads,with_mask", [(17, 2, False), (48, 1, True),
                                                  (9, 4, True)])
def test_channel_attention_matches_reference(t, kv_heads, with_mask):
  q, k, v = _qkv(t=t, k=kv_heads)
  mask = None
  if with_mask:
    kvalid = np.random.default_rng(2).random((2, t)) > 0.3
    qvalid = np.ones((2, t), bool)
    qvalid[1, 3] = False
    mask = qvalid[:, None, :, None] & kvalid[:, None, None, :]
  op = functools.partial(ops.get("channel_attention"), mask=mask)
  out = ref.assert_matches(op, lambda q, k, v: _channel_ref(q, k, v, mask), (q, k, v))
  if with_mask:
    assert np.all(out[1, 3] == 0.0)


@pytest.mark.parametrize("op,op_args", [
    ("spatial_reduction", dict(grid=(3, 4), reduction=(1, 2), method="conv")),
    ("channel_attention", None)])
def test_layers_run(op, op_args):
  op_checks.assert_layer_runs(op, op_args, length=12, is_causal=False)


def test_spatial_reduction_conv_params_start_as_average_pooling():
  x = ref.normal(0, (2, 12, 16))
  conv = layers.Attention(num_heads=4, op="spatial_reduction",
                          op_args=dict(grid=(3, 4), reduction=(1, 2), method="conv"))
  avg = layers.Attention(num_heads=4, op="spatial_reduction",
                         op_args=dict(grid=(3, 4), reduction=(1, 2)))
  params = conv.init(jax.random.key(0), x)
  plain = {"params": {k: v for k, v in params["params"].items() if k != "op_params"}}
  np.testing.assert_allclose(conv.apply(params, x), avg.apply(plain, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["spatial_reduction", "channel_attention"])
def test_bfloat16_inputs(name):
  q, k, v = _qkv(dtype=jnp.bfloat16, seed=4)
  cases = {
      "spatial_reduction": (dict(grid=GRID, reduction=2), lambda q, k, v: ref.softmax_attention(
          q, _reduce_ref(k, GRID, (2, 2)), _reduce_ref(v, GRID, (2, 2)))),
      "channel_attention": ({}, _channel_ref),
  }
  args, ref_fn = cases[name]
  ref.assert_matches(functools.partial(ops.get(name), **args), ref_fn, (q, k, v), tol=BF16_TOL)


def _bad_calls():
  q, k, v = _qkv(t=12, n=4, k=2)
  g = dict(grid=(3, 4))
  sr, ch = ops.get("spatial_reduction"), ops.get("channel_attention")
  return [
      (lambda: sr(q, k, v, reduction=(2, 3), **g), "reduction"),
      (lambda: sr(q, k, v, reduction=1, method="max", **g), "method"),
      (lambda: sr(q, k, v, reduction=(1, 2), method="conv", **g), "sr_key_kernel"),
      (lambda: sr(q, k, v, reduction=(1, 2), method="conv", sr_key_kernel=jnp.zeros((1, 2, 8)),
                  sr_value_kernel=jnp.zeros((2, 1, 8)), **g), "sr_value_kernel"),
      (lambda: sr(q, k, v, reduction=2, sr_key_kernel=jnp.zeros((2, 2, 8)), grid=(2, 6)),
       "sr_key_kernel"),
      (lambda: ch(q, k[:, :6], v[:, :6]), "q_len"),
      (lambda: ch(q, k, v[..., :4]), "value head_dim"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


@pytest.mark.parametrize("name,args", [
    ("spatial_reduction", dict(grid=(3, 4), reduction=1)), ("channel_attention", {})])
def test_no_causal_form(name, args):
  op_checks.assert_no_causal_form(name, *_qkv(t=12), **args)
