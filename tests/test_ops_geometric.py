"""`gta_attention` (GTA: geometry-aware attention) against a float64 reference that builds
ρ(g_i g_j⁻¹) as explicit block rotation matrices per token pair, the paper's first form."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _rho(coords, width, base=100.0):
  """`[t, width, width]`: block rotations, pair (c, c + width/2) turned by coordinate axis
  ⌊c / F⌋ times base^(−(c mod F)/F), F = width / (2·axes)."""
  t, axes = coords.shape
  half, per_axis = width // 2, width // (2 * axes)
  rho = np.zeros((t, width, width))
  for i in range(t):
    for c in range(half):
      angle = coords[i, c // per_axis] * base ** (-(c % per_axis) / per_axis)
      rho[i, c, c] = rho[i, c + half, c + half] = np.cos(angle)
      rho[i, c, c + half], rho[i, c + half, c] = -np.sin(angle), np.sin(angle)
  return rho


def _reference(q, k, v, *, grid, mask):
  t = q.shape[1]
  coords = (np.stack([np.arange(t) // grid[1], np.arange(t) % grid[1]], -1) if grid
            else np.arange(t)[:, None])
  rq, rv = _rho(coords, q.shape[-1]), _rho(coords, v.shape[-1])
  rel_q = np.einsum("iab,jcb->ijac", rq, rq)  # ρ_i ρ_jᵀ
  rel_v = np.einsum("iab,jcb->ijac", rv, rv)
  q, k, v = ref.f64(q, k, v)
  k, v = ref.repeat_kv(k, q.shape[2]), ref.repeat_kv(v, q.shape[2])
  logits = jnp.einsum("bind,ijde,bjne->bnij", q, rel_q, k) / np.sqrt(q.shape[-1])
  p = ref.masked_softmax(logits, mask)
  return jnp.einsum("bnij,ijde,bjne->bind", p, rel_v, v)


@pytest.mark.parametrize("grid,is_causal", [((3, 4), True), (None, False)])
def test_gta_matches_reference(grid, is_causal):
  q, k, v = ref.qkv(t=12, n=4, k=2, d=8)
  valid = ref.key_padding(2, 12, first_valid=True)
  mask = ref.full_mask(2, 4, 12, 12, mask=valid, is_causal=is_causal)
  op = functools.partial(ops.get("gta_attention"), grid=grid, is_causal=is_causal,
                         mask=jnp.asarray(valid))
  ref.assert_matches(op, functools.partial(_reference, grid=grid, mask=mask), [q, k, v])


def test_gta_layer_runs():
  op_checks.assert_layer_runs("gta_attention", dict(grid=(3, 4)), length=12, is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=2, k=2, d=6)
  op = ops.get("gta_attention")
  return [(lambda: op(q, k, v, grid=(3, 4)), "head_dim"),
          (lambda: op(q, k, v, grid=(3, 5)), "grid"),
          (lambda: op(q, k, v, base=0.0), "base")]


@pytest.mark.parametrize("case", range(3))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
