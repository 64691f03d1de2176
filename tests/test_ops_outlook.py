"""`outlook_attention` (VOLO) against a float64 reference that writes unfold, pooling and fold
as matrices built by loops over window positions."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _unfold_and_pool(grid, kernel, stride):
  """`U [centres, K², t]`: U[c, m, i] = 1 when slot m of the window around centre c is token i
  (zero-padded outside); `P [centres, t]`: the average over the centre's stride cell."""
  h, w = grid
  rows, cols = -(-h // stride), -(-w // stride)
  unfold = np.zeros((rows * cols, kernel * kernel, h * w))
  pool = np.zeros((rows * cols, h * w))
  for r in range(rows):
    for c in range(cols):
      centre = r * cols + c
      for a in range(kernel):
        for b in range(kernel):
          y, x = r * stride + a - kernel // 2, c * stride + b - kernel // 2
          if 0 <= y < h and 0 <= x < w:
            unfold[centre, a * kernel + b, y * w + x] = 1
      cell = [y * w + x for y in range(r * stride, min(h, (r + 1) * stride))
              for x in range(c * stride, min(w, (c + 1) * stride))]
      pool[centre, cell] = 1 / len(cell)
  return unfold, pool


def _reference(q, v, kernel_w, bias, *, grid, kernel, stride):
  q, v, kernel_w, bias = ref.f64(q, v, kernel_w, bias)
  unfold, pool = _unfold_and_pool(grid, kernel, stride)
  v = ref.repeat_kv(v, q.shape[2])
  x = jnp.einsum("ct,btnd->bcnd", pool, q)
  logits = (jnp.einsum("bcnd,nde->bcne", x, kernel_w) + bias) / np.sqrt(q.shape[-1])
  a = _softmax(logits.reshape(*logits.shape[:3], kernel ** 2, kernel ** 2))
  windows = jnp.einsum("cmt,btnd->bcnmd", unfold, v)
  y = jnp.einsum("bcnml,bcnld->bcnmd", a, windows)
  return jnp.einsum("cmt,bcnmd->btnd", unfold, y)


def _softmax(x):
  e = jnp.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("grid,kernel,stride", [((3, 4), 3, 1), ((5, 3), 3, 2)])
def test_outlook_attention_matches_reference(grid, kernel, stride):
  t = grid[0] * grid[1]
  q, k, v = ref.qkv(t=t, n=4, k=2, d=8)
  weight = ref.normal(3, (4, 8, kernel ** 4), std=0.3)
  bias = ref.normal(4, (4, kernel ** 4), std=0.3)

  def op(q, v, weight, bias):
    return ops.get("outlook_attention")(q, k, v, grid=grid, outlook_kernel=weight,
                                        outlook_bias=bias, kernel_size=kernel, stride=stride)

  ref.assert_matches(op, functools.partial(_reference, grid=grid, kernel=kernel, stride=stride),
                     [q, v, weight, bias])


def test_layer_runs():
  op_checks.assert_layer_runs("outlook_attention", dict(grid=(3, 4)),
                              {"outlook_kernel": (4, 4, 81), "outlook_bias": (4, 81)},
                              length=12, is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=2, k=2, d=8)
  w = ref.normal(0, (2, 8, 81))
  op = functools.partial(ops.get("outlook_attention"), q, k, v, grid=(3, 4))
  return [(lambda: op(outlook_kernel=w, mask=jnp.ones((1, 1, 1, 12), bool)), "mask"),
          (lambda: op(outlook_kernel=w[..., :16]), "outlook_kernel"),
          (lambda: op(outlook_kernel=ref.normal(0, (2, 8, 16)), kernel_size=2), "kernel_size"),
          (lambda: op(outlook_kernel=w, stride=0), "stride"),
          (lambda: op(outlook_kernel=w, outlook_bias=w[0]), "outlook_bias")]


@pytest.mark.parametrize("case", range(5))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
