"""`serialized_patch_attention` (Point Transformer V3) against a float64 reference whose curve
orders are built independently: the Hilbert curve by recursive construction of its path, the
Z-order by interleaving binary digit strings."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _hilbert_path(order):
  """The cells `(x, y)` of the 2^order x 2^order Hilbert curve in visiting order (its first
  step along x), built from four transformed copies of the curve one order lower."""
  if order == 0:
    return [(0, 0)]
  half = 1 << (order - 1)
  lower = _hilbert_path(order - 1)
  return ([(y, x) for x, y in lower] + [(x, y + half) for x, y in lower]
          + [(x + half, y + half) for x, y in lower]
          + [(2 * half - 1 - y, half - 1 - x) for x, y in lower])


def _z_code(y, x, bits=8):
  by, bx = format(y, f"0{bits}b"), format(x, f"0{bits}b")
  return int("".join(a + b for a, b in zip(by, bx)), 2)


def _curve(grid, order):
  """Row-major tokens of `grid` in the order of the curve."""
  h, w = grid
  cells = [(y, x) for y in range(h) for x in range(w)]
  if order.endswith("-trans"):
    key_of = lambda y, x: (x, y)  # pylint: disable=unnecessary-lambda-assignment
  else:
    key_of = lambda y, x: (y, x)  # pylint: disable=unnecessary-lambda-assignment
  if order.startswith("z"):
    rank = {c: _z_code(*key_of(*c)) for c in cells}
  else:
    side = max(h, w)
    path = _hilbert_path(int(np.ceil(np.log2(side))) if side > 1 else 0)
    where = {(y, x): i for i, (x, y) in enumerate(path)}
    rank = {c: where[key_of(*c)] for c in cells}
  return sorted(range(h * w), key=lambda i: rank[cells[i]])


def test_hilbert_curve_steps_to_a_neighbour():
  for order in ("hilbert", "hilbert-trans"):
    tokens = ops.serialized.serialization((8, 8), order)
    y, x = tokens // 8, tokens % 8
    assert np.all(np.abs(np.diff(y)) + np.abs(np.diff(x)) == 1)
    assert tokens.tolist() == _curve((8, 8), order)


@pytest.mark.parametrize("order,grid,patch", [("z", (3, 5), 4), ("hilbert-trans", (5, 3), 6)])
def test_serialized_patch_attention_matches_reference(order, grid, patch):
  t = grid[0] * grid[1]
  q, k, v = ref.qkv(t=t, n=4, k=2, d=8)
  valid = ref.key_padding(2, t)
  position = np.empty(t, int)
  position[_curve(grid, order)] = np.arange(t)
  same_patch = position[:, None] // patch == position[None, :] // patch
  mask = ref.full_mask(2, 4, t, t, mask=valid) & same_patch
  op = functools.partial(ops.get("serialized_patch_attention"), grid=grid, patch_size=patch,
                         order=order, mask=jnp.asarray(valid))
  ref.assert_matches(op, functools.partial(ref.softmax_attention, mask=mask), [q, k, v])


def test_layer_runs():
  op_checks.assert_layer_runs("serialized_patch_attention", dict(grid=(3, 4), patch_size=5),
                              length=12, is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=12, n=2, k=2, d=8)
  op = functools.partial(ops.get("serialized_patch_attention"), q)
  return [(lambda: op(k, v, grid=(3, 4), order="peano"), "order"),
          (lambda: op(k, v, grid=(3, 4), patch_size=0), "patch_size"),
          (lambda: op(k, v), "grid"),
          (lambda: op(k[:, :6], v[:, :6], grid=(2, 3)), "q_len")]


@pytest.mark.parametrize("case", range(4))
def test_bad_args_raise_value_error_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


def test_no_causal_form():
  op_checks.assert_no_causal_form("serialized_patch_attention", *ref.qkv(t=12), grid=(3, 4))
