"""`deformable_attention` (DAT++ / DAT) against a float64 reference: the offset network with
the depthwise convolution as a sum of shifted copies, and bilinear sampling written as the
tent kernel max(0, 1 − |Δy|)·max(0, 1 − |Δx|) summed over every cell of the map."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

GRID = (4, 5)
T = GRID[0] * GRID[1]


def _tent_sample(values, height, width, py, px):
  """Σ_cells max(0, 1−|py−y|)·max(0, 1−|px−x|)·values[cell]; values `[..., cells, c]` with the
  cells row-major, py/px `[..., M]` -> `[..., M, c]`."""
  ys, xs = np.divmod(np.arange(height * width), width)
  weight = (jnp.maximum(0, 1 - jnp.abs(py[..., None] - ys))
            * jnp.maximum(0, 1 - jnp.abs(px[..., None] - xs)))  # [..., M, cells]
  return jnp.einsum("...mc,...cd->...md", weight, values)


def _reference(q, k, v, dw, pw, rpb, *, stride, offset_range, offset_groups, dw_bias=0.0,
               norm_scale=1.0, norm_bias=0.0, clamp=False):
  """The op's formula on the `GRID` image; `dw_bias`, `norm_scale`, `norm_bias`: the offset
  network's convolution bias and LayerNorm affine parameters."""
  q, k, v, dw, pw, rpb, dw_bias, norm_scale, norm_bias = ref.f64(
      q, k, v, dw, pw, rpb, dw_bias, norm_scale, norm_bias)
  (h, w), (b, t, n, d), kv = GRID, q.shape, k.shape[2]
  g = n // kv
  size = dw.shape[0]
  rows, cols = -(-h // stride), -(-w // stride)
  x = q.reshape(b, h, w, offset_groups, n // offset_groups * d)
  xp = jnp.pad(x, ((0, 0), (size // 2,) * 2, (size // 2,) * 2, (0, 0), (0, 0)))
  conv = sum(dw[a, c] * xp[:, a:a + (rows - 1) * stride + 1:stride,
                           c:c + (cols - 1) * stride + 1:stride]
             for a in range(size) for c in range(size))  # [b, rows, cols, kv, g·d]
  conv = conv + dw_bias
  conv = (conv - conv.mean(-1, keepdims=True)) / jnp.sqrt(conv.var(-1, keepdims=True) + 1e-5)
  conv = conv * norm_scale + norm_bias
  offsets = jnp.einsum("bhwkc,co->bkhwo", jax.nn.gelu(conv, approximate=False), pw)
  if offset_range is not None:
    offsets = offset_range * stride / 2 * jnp.tanh(offsets)
  centre = lambda i, side: min(i * stride + (stride - 1) / 2, side - 1)  # pylint: disable=unnecessary-lambda-assignment
  reference = np.array([[(centre(r, h), centre(c, w)) for c in range(cols)] for r in range(rows)])
  points = (reference + offsets).reshape(b, offset_groups, rows * cols, 2)
  points = jnp.repeat(points, kv // offset_groups, axis=1)  # each key head at its group's
  if clamp:
    points = jnp.stack([jnp.clip(points[..., 0], 0, h - 1), jnp.clip(points[..., 1], 0, w - 1)],
                       axis=-1)
  py, px = points[..., 0], points[..., 1]  # [b, kv, M]
  keys = _tent_sample(jnp.moveaxis(k, 2, 1), h, w, py, px)  # [b, kv, M, d]
  values = _tent_sample(jnp.moveaxis(v, 2, 1), h, w, py, px)
  qy, qx = np.divmod(np.arange(t), w)
  rel_y = qy[None, None, :, None] - py[:, :, None, :] + h - 1  # [b, kv, t, M]
  rel_x = qx[None, None, :, None] - px[:, :, None, :] + w - 1
  ty, tx = np.divmod(np.arange((2 * h - 1) * (2 * w - 1)), 2 * w - 1)
  tent = (jnp.maximum(0, 1 - jnp.abs(rel_y[..., None] - ty))
          * jnp.maximum(0, 1 - jnp.abs(rel_x[..., None] - tx)))  # [b, kv, t, M, cells]
  bias = jnp.einsum("bktmc,kgc->bkgtm", tent, rpb.reshape(kv, g, -1)).reshape(b, n, t, -1)
  logits = jnp.einsum("btkgd,bkmd->bkgtm", q.reshape(b, t, kv, g, d), keys).reshape(b, n, t, -1)
  p = jax.nn.softmax(logits / np.sqrt(d) + bias, axis=-1).reshape(b, kv, g, t, -1)
  return jnp.einsum("bkgtm,bkmd->btkgd", p, values).reshape(b, t, n, -1)


@pytest.mark.parametrize("stride,kernel,kv_heads,offset_groups,offset_range,clamp", [
    (1, 3, 2, None, 2.0, False), (2, 5, 2, None, 2.0, False), (2, 3, 4, 2, None, True),
    pytest.param(1, 3, 4, 1, 2.0, False, marks=pytest.mark.extended),
    pytest.param(1, 3, 2, None, None, False, marks=pytest.mark.extended)])
def test_deformable_attention_matches_reference(stride, kernel, kv_heads, offset_groups,
                                                offset_range, clamp):
  """Offsets of a few tokens (std 1 logits, range s = 2, or unbounded) move points across
  cells and off the image (or, clamped, onto its border); the gradients reach the offset
  network through the bilinear weights. With `offset_groups` below the key/value heads (DAT's
  groups), the heads of a group share its points."""
  groups = offset_groups or kv_heads
  q, k, v = ref.qkv(t=T, n=4, k=kv_heads, d=4)
  channels = 4 // groups * 4
  dw = ref.normal(3, (kernel, kernel, channels), std=0.5)
  pw = ref.normal(4, (channels, 2))
  rpb = ref.normal(5, (4, 2 * GRID[0] - 1, 2 * GRID[1] - 1))

  def op(q, k, v, dw, pw, rpb):
    return ops.get("deformable_attention")(q, k, v, grid=GRID, offset_dw_kernel=dw,
                                           offset_pw_kernel=pw, rpb=rpb, stride=stride,
                                           offset_range=offset_range,
                                           offset_groups=offset_groups, clamp=clamp)

  ref.assert_matches(op, functools.partial(_reference, stride=stride, offset_range=offset_range,
                                           offset_groups=groups, clamp=clamp),
                     [q, k, v, dw, pw, rpb])


def test_layer_runs():
  op_checks.assert_layer_runs(
      "deformable_attention", dict(grid=(3, 4), kernel_size=3),
      {"offset_dw_kernel": (3, 3, 8), "offset_dw_bias": (8,), "offset_norm_scale": (8,),
       "offset_norm_bias": (8,), "offset_pw_kernel": (8, 2), "rpb": (4, 5, 7)},
      length=12, is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=2, k=2, d=8)
  op = functools.partial(ops.get("deformable_attention"), q, k, v, grid=(3, 4))
  dw, pw = ref.normal(0, (3, 3, 8)), ref.normal(1, (8, 2))
  return [(lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw,
                      mask=jnp.ones((1, 1, 1, 12), bool)), "mask"),
          (lambda: op(offset_dw_kernel=dw[:2, :2], offset_pw_kernel=pw), "offset_dw_kernel"),
          (lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw[:, :1]), "offset_pw_kernel"),
          (lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw, rpb=dw), "rpb"),
          (lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw, offset_range=-1.0),
           "offset_range"),
          (lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw, offset_groups=3),
           "offset_groups"),
          (lambda: op(offset_dw_kernel=dw, offset_pw_kernel=pw, clamp=1), "clamp")]


@pytest.mark.parametrize("case", range(7))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
