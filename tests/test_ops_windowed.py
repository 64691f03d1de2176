"""`window` (Swin Transformer: shifted windows) and `grid` (MaxViT: grid attention) against
float64 references.

The references build the allowed pairs and relative offsets by loops over token positions
(the rolled image of a shifted window written out) and evaluate full `[q, kv]` matrices in
float64; they never call `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (6, 8)
_qkv = functools.partial(ref.qkv, t=48)


def _tokens(h, w, where):
  return [y * w + x for y in range(h) for x in range(w) if where(y, x)]


# ----------------------------------------------------------------------------------------------
# Window (plain and shifted) and grid attention: masks and biases built by loops over positions.
# ----------------------------------------------------------------------------------------------
def _window_pattern(grid, size, shift=(0, 0)):
  """Allowed pairs `[t, t]` and relative offsets `[t, t, 2]` of (shifted) window attention.

  A token at (y, x) sits at ((y − sy) mod h, (x − sx) mod w) of the rolled image; two tokens
  interact when they share a window of the rolled image and are both wrapped around or both
  not, per axis (a row y < sy wraps to the bottom).
  """
  (h, w), (a, c), (sy, sx) = grid, size, shift
  t = h * w
  allowed = np.zeros((t, t), bool)
  offset = np.zeros((t, t, 2), int)
  for i in range(t):
    yi, xi = divmod(i, w)
    ryi, rxi = (yi - sy) % h, (xi - sx) % w
    for j in range(t):
      yj, xj = divmod(j, w)
      ryj, rxj = (yj - sy) % h, (xj - sx) % w
      same_window = ryi // a == ryj // a and rxi // c == rxj // c
      same_side = (yi < sy) == (yj < sy) and (xi < sx) == (xj < sx)
      allowed[i, j] = same_window and same_side
      offset[i, j] = (ryi % a - ryj % a, rxi % c - rxj % c)
  return allowed, offset


def _grid_pattern(grid, size):
  """Grid attention: tokens at the same offset in their `(h/a, w/c)` cells; offsets between
  the cells' indices."""
  (h, w), (a, c) = grid, size
  ch, cw = h // a, w // c
  t = h * w
  allowed = np.zeros((t, t), bool)
  offset = np.zeros((t, t, 2), int)
  for i in range(t):
    yi, xi = divmod(i, w)
    for j in range(t):
      yj, xj = divmod(j, w)
      allowed[i, j] = yi % ch == yj % ch and xi % cw == xj % cw
      offset[i, j] = (yi // ch - yj // ch, xi // cw - xj // cw)
  return allowed, offset


def _pattern_ref(q, k, v, allowed, offset, size, rpb=None, mask=None):
  bias = None
  if rpb is not None:
    a, c = size
    bias = rpb[:, offset[..., 0] + a - 1, offset[..., 1] + c - 1][None]  # [1, n, t, t]
  full = allowed[None, None] if mask is None else allowed[None, None] & np.asarray(mask)
  return ref.softmax_attention(q, k, v, bias=bias, mask=full)


@pytest.mark.parametrize("size,shift,kv_heads", [((3, 4), (0, 0), 2), ((3, 4), (1, 2), 1),
                                                 ((2, 2), (1, 1), 4), ((2, 2), (0, 1), 2)])
def test_window_matches_reference(size, shift, kv_heads):
  q, k, v = _qkv(k=kv_heads, dv=6)
  rpb = ref.normal(3, (4, 2 * size[0] - 1, 2 * size[1] - 1), std=0.5)
  allowed, offset = _window_pattern(GRID, size, shift)
  op = functools.partial(ops.get("window"), grid=GRID, window_size=size, shift=shift)
  ref.assert_matches(lambda q, k, v, r: op(q, k, v, rpb=r),
                  lambda q, k, v, r: _pattern_ref(q, k, v, allowed, offset, size, r),
                  (q, k, v, rpb))


def test_window_shift_mask_separates_wrapped_tokens():
  """With a shift, tokens wrapped around by the roll never see their new neighbours, and the
  output differs from unshifted windows."""
  q, k, v = _qkv()
  op = jax.jit(ops.get("window"), static_argnames=("grid", "window_size", "shift"))
  shifted = op(q, k, v, grid=GRID, window_size=(3, 4), shift=(1, 2))
  plain = op(q, k, v, grid=GRID, window_size=(3, 4), shift=(0, 0))
  assert not np.allclose(shifted, plain, atol=1e-3)
  allowed, _ = _window_pattern(GRID, (3, 4), (1, 2))
  # Token (0, 0) wraps to the bottom-right window: it sees only the 2 tokens wrapped with it
  # in both axes ((0, 0), (0, 1)), not the bottom-right tokens it now sits beside.
  assert set(np.flatnonzero(allowed[0])) == {0, 1}
  v_probe = jnp.zeros_like(v).at[:, 47].set(100.0)  # bottom-right token, same rolled window
  out = op(q, k, v_probe, grid=GRID, window_size=(3, 4), shift=(1, 2))
  assert np.all(np.asarray(out[:, 0]) == 0.0)


@pytest.mark.parametrize("size,kv_heads", [((2, 2), 2), ((3, 4), 1), ((6, 2), 4)])
def test_grid_matches_reference(size, kv_heads):
  q, k, v = _qkv(k=kv_heads)
  rpb = ref.normal(3, (4, 2 * size[0] - 1, 2 * size[1] - 1), std=0.5)
  allowed, offset = _grid_pattern(GRID, size)
  op = functools.partial(ops.get("grid"), grid=GRID, grid_size=size)
  ref.assert_matches(lambda q, k, v, r: op(q, k, v, rpb=r),
                  lambda q, k, v, r: _pattern_ref(q, k, v, allowed, offset, size, r),
                  (q, k, v, rpb))


@pytest.mark.parametrize("name", ["window", "grid"])
def test_window_grid_key_padding_and_empty_rows(name):
  """A key-padding mask; in batch 0 a whole 2x2 window (or grid group) has no valid key, so
  its queries return zeros."""
  q, k, v = _qkv()
  if name == "window":
    args, pattern = dict(window_size=(2, 2), shift=(1, 1)), _window_pattern(GRID, (2, 2), (1, 1))
    empty = _tokens(6, 8, lambda y, x: (y < 1 or y == 5) and (x < 1 or x == 7))
  else:
    empty = _tokens(6, 8, lambda y, x: y % 3 == 0 and x % 4 == 0)
    args, pattern = dict(grid_size=(2, 2)), _grid_pattern(GRID, (2, 2))
  mask = ref.key_padding(2, 48, invalid=(0, empty))
  op = functools.partial(ops.get(name), grid=GRID, mask=mask, **args)
  out = ref.assert_matches(op, lambda q, k, v: _pattern_ref(q, k, v, *pattern, (2, 2), mask=mask),
                        (q, k, v))
  assert np.all(out[0, empty] == 0.0)
  has_key = (pattern[0][None] & mask[:, 0]).any(-1)  # [b, t]
  assert np.all(out[~has_key] == 0.0) and np.all(np.abs(out[has_key]).sum(-1) > 0)


@pytest.mark.parametrize("op,op_args", [
    ("window", dict(grid=(3, 4), window_size=(3, 2), shift=1)),
    ("grid", dict(grid=(3, 4), grid_size=(3, 2)))])
def test_layers_run(op, op_args):
  op_checks.assert_layer_runs(op, op_args, length=12, is_causal=False)


@pytest.mark.parametrize("name", ["window", "grid"])
def test_bfloat16_inputs(name):
  q, k, v = _qkv(dtype=jnp.bfloat16, seed=4)
  cases = {
      "window": (dict(grid=GRID, window_size=(3, 4), shift=(1, 2)),
                 lambda q, k, v: _pattern_ref(q, k, v, *_window_pattern(GRID, (3, 4), (1, 2)),
                                              (3, 4))),
      "grid": (dict(grid=GRID, grid_size=(2, 2)),
               lambda q, k, v: _pattern_ref(q, k, v, *_grid_pattern(GRID, (2, 2)), (2, 2))),
  }
  args, ref_fn = cases[name]
  ref.assert_matches(functools.partial(ops.get(name), **args), ref_fn, (q, k, v), tol=BF16_TOL)


def _bad_calls():
  q, k, v = _qkv(t=12, n=4, k=2)
  g = dict(grid=(3, 4))
  window, grid_op = ops.get("window"), ops.get("grid")
  return [
      (lambda: window(q, k, v, window_size=2), "grid"),
      (lambda: window(q, k, v, grid=(4, 4), window_size=2), "grid"),
      (lambda: window(q, k, v, window_size=0, **g), "window_size"),
      (lambda: window(q, k, v, window_size=(2, 3), **g), "window_size"),
      (lambda: window(q, k, v, window_size=(3, 2), shift=(0, 2), **g), "shift"),
      (lambda: window(q, k, v, window_size=(3, 2), shift=-1, **g), "shift"),
      (lambda: window(q, k, v, window_size=(3, 2), rpb=jnp.zeros((4, 3, 3)), **g), "rpb"),
      (lambda: window(q, k[:, :6], v[:, :6], window_size=(3, 2), **g), "q_len"),
      (lambda: grid_op(q, k, v, grid_size=(2, 2), **g), "grid_size"),
      (lambda: grid_op(q, k, v, grid_size=0, **g), "grid_size"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


@pytest.mark.parametrize("name,args", [
    ("window", dict(grid=(3, 4), window_size=1)), ("grid", dict(grid=(3, 4), grid_size=1))])
def test_no_causal_form(name, args):
  op_checks.assert_no_causal_form(name, *_qkv(t=12), **args)
