"""`cascaded_group_attention` (EfficientViT) and `single_head_attention` (SHViT) against
float64 references: the cascade written head by head with the depthwise convolution as a sum
of shifted copies, and SHViT's split of the channels."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _depthwise(x, kernel, spatial, is_causal):
  """`x [b, *spatial, c]`, `kernel [*k, c]`: y_p = Σ_o w_o x_{p+o−pad}, zero outside;
  pad = k − 1 (causal) or ⌊k/2⌋ per axis."""
  k = kernel.shape[0]
  pad = k - 1 if is_causal else k // 2
  xp = jnp.pad(x, [(0, 0)] + [(pad, k - 1 - pad)] * len(spatial) + [(0, 0)])
  out = 0.0
  for offset in np.ndindex(*kernel.shape[:-1]):
    window = tuple(slice(o, o + n) for o, n in zip(offset, spatial))
    out = out + kernel[offset] * xp[(slice(None),) + window]
  return out


def _cascade_reference(q, k, v, cq, ck, cv, conv, *, grid, mask, is_causal):
  q, k, v, cq, ck, cv, conv = ref.f64(q, k, v, cq, ck, cv, conv)
  b, t, n, _ = q.shape
  groups = n // k.shape[2]
  spatial = grid or (t,)
  outs, prev = [], None
  for j in range(n):
    qj, kj, vj = q[:, :, j], k[:, :, j // groups], v[:, :, j // groups]
    if prev is not None:
      qj, kj, vj = qj + prev @ cq[j - 1], kj + prev @ ck[j - 1], vj + prev @ cv[j - 1]
    qj = _depthwise(qj.reshape(b, *spatial, -1), conv[..., j, :], spatial,
                    is_causal).reshape(b, t, -1)
    logits = jnp.einsum("btd,bsd->bts", qj, kj) / np.sqrt(qj.shape[-1])
    prev = jnp.einsum("bts,bsd->btd", ref.masked_softmax(logits, mask[:, j]), vj)
    outs.append(prev)
  return jnp.stack(outs, axis=2)


@pytest.mark.parametrize("grid,is_causal", [((3, 4), False), (None, True)])
def test_cascaded_group_attention_matches_reference(grid, is_causal):
  q, k, v = ref.qkv(t=12, n=4, k=2, d=8)
  weights = [ref.normal(10 + i, (3, 8, 8), std=0.3) for i in range(3)]
  conv = ref.normal(13, (3,) * (2 if grid else 1) + (4, 8), std=0.5)
  valid = ref.key_padding(2, 12, first_valid=True)
  mask = ref.full_mask(2, 4, 12, 12, mask=valid, is_causal=is_causal)

  def op(q, k, v, cq, ck, cv, conv):
    return ops.get("cascaded_group_attention")(
        q, k, v, cascade_query=cq, cascade_key=ck, cascade_value=cv, query_conv=conv, grid=grid,
        mask=jnp.asarray(valid), is_causal=is_causal)

  ref.assert_matches(op, functools.partial(_cascade_reference, grid=grid, mask=mask,
                                           is_causal=is_causal), [q, k, v, *weights, conv])


def _single_head_reference(q, k, v, *, heads, mask):
  q, k, v = ref.f64(q, k, v)
  b, t, n, d = q.shape
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  qp, kp, vp = (x[:, :, :heads].reshape(b, t, 1, heads * d) for x in (q, k, v))
  out = ref.softmax_attention(qp, kp, vp, mask=mask[:, :1])
  out = jnp.concatenate([out.reshape(b, t, heads, d), q[:, :, heads:]], axis=2)
  return jnp.where(mask[:, 0].any(-1)[:, :, None, None], out, 0.0)


@pytest.mark.parametrize("ratio,heads", [(None, 1), (0.5, 2)])
def test_single_head_attention_matches_reference(ratio, heads):
  """SHViT's ratio 1/4.67 of 4 heads attends with one head; a ratio of 1/2 with two."""
  q, k, v = ref.qkv(t=10, n=4, k=2, d=8)
  valid = ref.key_padding(2, 10, invalid=(1, slice(None)))  # example 1: no key at all
  mask = ref.full_mask(2, 4, 10, 10, mask=valid, is_causal=True)
  args = {} if ratio is None else dict(partial_ratio=ratio)
  op = functools.partial(ops.get("single_head_attention"), mask=jnp.asarray(valid),
                         is_causal=True, **args)
  out = ref.assert_matches(op, functools.partial(_single_head_reference, heads=heads,
                                                 mask=mask), [q, k, v])
  assert np.all(out[1] == 0) and np.any(out[0, :, heads:] != 0)


def test_layers_run():
  op_checks.assert_layer_runs(
      "cascaded_group_attention", dict(grid=(3, 4)),
      {"cascade_query": (3, 4, 4), "cascade_key": (3, 4, 4), "cascade_value": (3, 4, 4),
       "query_conv": (5, 5, 4, 4)}, length=12, is_causal=True)
  op_checks.assert_layer_runs("single_head_attention", None, length=12, is_causal=True)


def test_cascade_parameters_follow_wider_values():
  """With values wider than the heads (LeViT, EfficientViT), the cascade maps read value_dim
  channels: C^Q, C^K `[n − 1, dv, d]`, C^V `[n − 1, dv, dv]`, and the op runs on them."""
  q, k, v = ref.qkv(t=6, n=4, k=2, d=4, dv=8)
  module = ops.params_module("cascaded_group_attention")(num_heads=4, num_kv_heads=2,
                                                         head_dim=4)
  weights = module.apply(module.init(jax.random.key(0), None, q, k, v), None, q, k, v)
  assert {n: w.shape for n, w in weights.items()} == {
      "cascade_query": (3, 8, 4), "cascade_key": (3, 8, 4), "cascade_value": (3, 8, 8),
      "query_conv": (5, 4, 4)}
  out = ops.get("cascaded_group_attention")(q, k, v, is_causal=True, **weights)
  assert out.shape == (2, 6, 4, 8) and np.all(np.isfinite(out))


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=4, k=2, d=8)
  w = ref.normal(0, (3, 8, 8))
  cga = functools.partial(ops.get("cascaded_group_attention"), q, k, v, cascade_query=w,
                          cascade_key=w)
  shvit = ops.get("single_head_attention")
  return [(lambda: cga(cascade_value=w[:2]), "cascade_value"),
          (lambda: cga(cascade_value=w, query_conv=ref.normal(0, (3, 4, 4, 8)), grid=(3, 4)),
           "query_conv"),
          (lambda: cga(cascade_value=w, query_conv=ref.normal(0, (3, 4, 8)), kernel_size=5),
           "kernel_size"),
          (lambda: ops.get("cascaded_group_attention")(q, k[:, :6], v[:, :6], cascade_query=w,
                                                       cascade_key=w, cascade_value=w), "q_len"),
          (lambda: shvit(q, k, v, partial_ratio=0.0), "partial_ratio"),
          (lambda: shvit(q, k[:, :6], v[:, :6]), "q_len")]


@pytest.mark.parametrize("case", range(6))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
