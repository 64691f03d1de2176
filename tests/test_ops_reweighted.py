"""`urpe` (Your Transformer May Not be as Powerful as You Expect) and `mask_reweighted`
(Toward a Deeper Understanding: RetNet Viewed through Convolution) against float64 references.

The references build the Toeplitz matrices and the Gaussian mixture masks entry by entry with
loops over token pairs, then (softmax ⊙ M) V; they never call `big_attn`.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _toeplitz(table, t, s):
  table = np.asarray(table)
  out = np.zeros((table.shape[0], t, s), table.dtype)
  for i in range(t):
    for j in range(s):
      out[:, i, j] = table[:, i - j + s - 1]
  return out


def _reweighted_ref(q, k, v, multiplier, full, bias=None):
  logits = ref.attention_logits(q, k)
  if bias is not None:
    logits = logits + bias[None]
  weights = ref.masked_softmax(logits, full) * multiplier[None]
  return jnp.einsum("bnts,bsnd->btnd", weights, ref.repeat_kv(ref.f64(v), q.shape[2]))


@pytest.mark.parametrize("t,s,is_causal,masked", [(9, 9, True, False), (7, 10, False, True)])
def test_urpe_matches_reference(t, s, is_causal, masked):
  q, k, v = ref.qkv(t=t, s=s, dv=6)
  mult, bias = ref.normal(3, (4, t + s - 1)), ref.normal(4, (4, t + s - 1))
  mask = ref.key_padding(2, s, first_valid=True, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=is_causal)

  def ref_fn(q, k, v, c, b):
    return _reweighted_ref(q, k, v, _toeplitz_jnp(c, t, s), full, _toeplitz_jnp(b, t, s))

  def op_fn(q, k, v, c, b):
    return ops.get("urpe")(q, k, v, rpe_multiplier=c, rpe_bias=b, is_causal=is_causal,
                           mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, mult, bias))
  if masked:
    assert np.all(out[1] == 0.0)


def _toeplitz_jnp(table, t, s):
  """`_toeplitz` as a gather with the loop-built index (differentiable in the table)."""
  index = _toeplitz(np.arange(t + s - 1)[None], t, s)[0]
  return table[:, index]


def test_urpe_with_unit_multiplier_is_softmax():
  q, k, v = ref.qkv(t=8)
  out = ops.get("urpe")(q, k, v, rpe_multiplier=jnp.ones((4, 15)))
  with ref.x64():
    np.testing.assert_allclose(out, np.asarray(ref.softmax_attention(q, k, v)), **ref.F32_TOL)


def _gmm_mask(amplitude, sigma, positions):
  t = len(positions)
  d2 = np.zeros((t, t))
  for i in range(t):
    for j in range(t):
      d2[i, j] = np.sum((positions[i] - positions[j]) ** 2)
  return jnp.sum(amplitude[:, :, None, None]
                 * jnp.exp(-d2[None, None] / (2 * sigma[:, :, None, None] ** 2)), axis=1)


@pytest.mark.parametrize("grid,is_causal", [((3, 4), False), (None, True)])
def test_gmm_mask_matches_reference(grid, is_causal):
  t = 12
  q, k, v = ref.qkv(t=t)
  amplitude, sigma = ref.normal(5, (4, 3)), ref.normal(6, (4, 3)) + 3.0
  positions = (np.array([(y, x) for y in range(grid[0]) for x in range(grid[1])])
               if grid else np.arange(t)[:, None])
  mask = ref.key_padding(2, t, first_valid=True)
  full = ref.full_mask(2, 4, t, t, mask=mask, is_causal=is_causal)
  ref_fn = lambda q, k, v, a, sg: _reweighted_ref(q, k, v, _gmm_mask(a, sg, positions), full)
  op_fn = lambda q, k, v, a, sg: ops.get("mask_reweighted")(
      q, k, v, gmm_amplitude=a, gmm_sigma=sg, grid=grid, is_causal=is_causal,
      mask=jnp.asarray(mask))
  ref.assert_matches(op_fn, ref_fn, (q, k, v, amplitude, sigma))


def test_elm_mask_matches_reference():
  q, k, v = ref.qkv(t=6, s=11, n=2, k=1)
  elm = ref.normal(7, (2, 6, 11))
  full = ref.full_mask(2, 2, 6, 11)
  op_fn = lambda q, k, v, m: ops.get("mask_reweighted")(q, k, v, form="elm", elm_mask=m)
  ref.assert_matches(op_fn, lambda q, k, v, m: _reweighted_ref(q, k, v, m, full),
                     (q, k, v, elm))


@pytest.mark.parametrize("name,op_args,param_shapes", [
    ("urpe", None, dict(rpe_multiplier=(4, 17), rpe_bias=(4, 17))),
    ("mask_reweighted", dict(num_components=2), dict(gmm_amplitude=(4, 2), gmm_sigma=(4, 2))),
    ("mask_reweighted", dict(form="elm"), dict(elm_mask=(4, 9, 9)))])
def test_layer_runs(name, op_args, param_shapes):
  op_checks.assert_layer_runs(name, op_args, param_shapes)


def _bad_calls():
  q, k, v = ref.qkv(t=6)
  urpe, mask_rw = ops.get("urpe"), ops.get("mask_reweighted")
  gmm = dict(gmm_amplitude=jnp.ones((4, 2)), gmm_sigma=jnp.ones((4, 2)))
  return [(lambda: urpe(q, k, v), "rpe_multiplier"),
          (lambda: urpe(q, k, v, rpe_multiplier=jnp.ones((4, 12))), "rpe_multiplier"),
          (lambda: urpe(q, k, v, rpe_multiplier=jnp.ones((4, 11)),
                        rpe_bias=jnp.ones((2, 11))), "rpe_bias"),
          (lambda: mask_rw(q, k, v, form="box", **gmm), "form"),
          (lambda: mask_rw(q, k, v, gmm_amplitude=jnp.ones((4, 2)),
                           gmm_sigma=jnp.ones((4, 3))), "gmm_sigma"),
          (lambda: mask_rw(q, k, v, grid=(2, 2), **gmm), "grid"),
          (lambda: mask_rw(q, k, v, num_components=3, **gmm), "num_components"),
          (lambda: mask_rw(q, k, v, form="elm", elm_mask=jnp.ones((4, 6, 5))), "elm_mask")]


@pytest.mark.parametrize("case", range(8))
def test_bad_arguments(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
