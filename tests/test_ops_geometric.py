"""`gta_attention` (GTA: geometry-aware attention) against a float64 reference that builds
ρ(g_i g_j⁻¹) as explicit block rotation matrices per token pair, the paper's first form; with
SE(3) cameras, ρ(g_i) ρ(g_j)⁻¹ from the full per-token matrices and a general inverse."""
import functools

import jax
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


def _rho_with_cameras(cameras, coords, width):
  """`[b, t, width, width]`: ρ(g) = E ⊕ … ⊕ E (width/8 copies of the token's 4x4 camera E)
  ⊕ the SO(2) blocks of `_rho` on the other width/2 channels."""
  b, t = cameras.shape[:2]
  copies = width // 8
  camera_blocks = jnp.einsum("ac,btij->btaicj", jnp.eye(copies),
                             cameras).reshape(b, t, width // 2, width // 2)
  rho = jnp.zeros((b, t, width, width), cameras.dtype)
  rho = rho.at[:, :, :width // 2, :width // 2].set(camera_blocks)
  return rho.at[:, :, width // 2:, width // 2:].set(_rho(coords, width // 2)[None])


def _camera_reference(q, k, v, cameras, *, grid, mask):
  """out_i = Σ_j softmax_j(s·q_iᵀ ρ_i ρ_j⁻¹ k_j) ρ_i ρ_j⁻¹ v_j, ρ with the cameras."""
  t = q.shape[1]
  in_view = np.arange(t) % (grid[0] * grid[1]) if grid else None
  coords = (np.stack([in_view // grid[1], in_view % grid[1]], -1) if grid
            else np.arange(t)[:, None])
  q, k, v = ref.f64(q, k, v)
  k, v = ref.repeat_kv(k, q.shape[2]), ref.repeat_kv(v, q.shape[2])
  rq, rv = _rho_with_cameras(cameras, coords, q.shape[-1]), _rho_with_cameras(
      cameras, coords, v.shape[-1])
  rel_q = jnp.einsum("bixy,bjyz->bijxz", rq, jnp.linalg.inv(rq))  # ρ_i ρ_j⁻¹
  rel_v = jnp.einsum("bixy,bjyz->bijxz", rv, jnp.linalg.inv(rv))
  logits = jnp.einsum("bind,bijde,bjne->bnij", q, rel_q, k) / np.sqrt(q.shape[-1])
  p = ref.masked_softmax(logits, mask)
  return jnp.einsum("bnij,bijde,bjne->bind", p, rel_v, v)


@pytest.mark.parametrize("grid,is_causal", [((2, 2), True), (None, False)])
def test_gta_cameras_match_reference(grid, is_causal):
  """Three views of a 2x2 grid (or 1-D positions), each token with its view's extrinsic:
  output and gradients wrt q, k, v and the cameras."""
  q, k, v = ref.qkv(t=12, n=4, k=2, d=8, dv=16)
  cameras = jnp.asarray(np.repeat(ref.rigid_transforms(1, (2, 3)), 4, axis=1), jnp.float32)
  valid = ref.key_padding(2, 12, first_valid=True)
  mask = ref.full_mask(2, 4, 12, 12, mask=valid, is_causal=is_causal)
  op = functools.partial(ops.get("gta_attention"), grid=grid, is_causal=is_causal,
                         mask=jnp.asarray(valid))
  ref.assert_matches(lambda q, k, v, c: op(q, k, v, cameras=c),
                     functools.partial(_camera_reference, grid=grid, mask=mask),
                     [q, k, v, cameras])


def test_gta_cameras_invariant_to_the_world_frame():
  """Every extrinsic E_i ↦ E_i T (one change of world frame T) leaves the output unchanged;
  a change of one view's camera does not."""
  q, k, v = ref.qkv(t=12, n=2, k=2, d=8, seed=3)
  cameras = np.repeat(ref.rigid_transforms(2, (2, 3)), 4, axis=1)
  op = jax.jit(functools.partial(ops.get("gta_attention"), grid=(2, 2), is_causal=True))
  out = np.asarray(op(q, k, v, cameras=jnp.asarray(cameras, jnp.float32)))
  world = ref.rigid_transforms(3, ())
  moved = np.asarray(op(q, k, v, cameras=jnp.asarray(cameras @ world, jnp.float32)))
  np.testing.assert_allclose(moved, out, atol=2e-5, rtol=2e-5)
  one_view = cameras.copy()
  one_view[:, 8:] = one_view[:, 8:] @ ref.rigid_transforms(4, ())
  changed = np.asarray(op(q, k, v, cameras=jnp.asarray(one_view, jnp.float32)))
  assert np.abs(changed - out).max() > 1e-2


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=2, k=2, d=6)
  q8, k8, v8 = ref.qkv(t=12, n=2, k=2, d=8)
  cameras = jnp.asarray(np.repeat(ref.rigid_transforms(1, (2, 1)), 12, axis=1), jnp.float32)
  op = ops.get("gta_attention")
  return [(lambda: op(q, k, v, grid=(3, 4)), "head_dim"),
          (lambda: op(q, k, v, grid=(3, 5)), "grid"),
          (lambda: op(q, k, v, base=0.0), "base"),
          (lambda: op(q8, k8, v8, cameras=cameras[:, :6]), "cameras"),
          (lambda: op(q8, k8, v8, cameras=cameras[..., :3]), "cameras"),
          (lambda: op(q, k, v, cameras=cameras), "head_dim"),
          (lambda: op(q8, k8, v8[..., :4], cameras=cameras), "value_dim"),
          (lambda: op(q8, k8, v8, cameras=cameras, grid=(1, 5)), "grid"),
          (lambda: op(q8, k8[:, :6], v8[:, :6], cameras=cameras), "kv_len")]


@pytest.mark.parametrize("case", range(9))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


def test_integer_cameras_raise_type_error():
  q, k, v = ref.qkv(t=4, n=2, k=2, d=8)
  with pytest.raises(TypeError, match="cameras"):
    ops.get("gta_attention")(q, k, v, cameras=jnp.zeros((2, 4, 4, 4), jnp.int32))
