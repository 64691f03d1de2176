"""The registry as a whole: every op runs by name with its paper defaults (forward and
gradient), parameter modules live with their ops, and the shared argument checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers  # noqa: F401  pylint: disable=unused-import  (hyena's parameters)
from big_attn import ops
from big_attn.ops import checks
from big_attn.ops import registry
from tests import reference as ref

B, T, H, D = 2, 16, 4, 8
GRID = (4, 4)


def _weights(name, op_args, q):
  """The op's learned weights as its parameter module initialises them (none without one)."""
  module = ops.params_module(name)
  if module is None:
    return {}
  x = ref.normal(5, (q.shape[0], q.shape[1], H * D))
  weights, _ = module(num_heads=H, num_kv_heads=H, head_dim=D, op_args=op_args).init_with_output(
      jax.random.key(1), x, q, q, q)
  return weights


@pytest.mark.parametrize("name", ops.names())
def test_every_op_runs_with_its_defaults_only(name):
  q, k, v = (ref.normal(i, (B, T, H, D)) for i in range(3))
  op_args = {}
  try:  # Tracing only: a 2-D image op says that it needs the token grid.
    weights = _weights(name, op_args, q)
    jax.eval_shape(lambda w: ops.get(name)(q, k, v, **w), weights)
  except ValueError as e:
    if "grid=(height, width) is required" not in str(e):
      raise
    op_args = {"grid": GRID}
    weights = _weights(name, op_args, q)

  @jax.jit
  def loss_and_grads(q, k, v, weights):
    def loss(q, k, v, weights):
      out = ops.get(name)(q, k, v, **op_args, **weights)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, weights)

  (_, out), grads = loss_and_grads(q, k, v, weights)
  assert out.shape == (B, T, H, D) and out.dtype == q.dtype
  assert np.all(np.isfinite(np.asarray(out)))
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in leaves[:3]), "no gradient reaches query, key or value"


# Each default against the documented value given explicitly, at a size where the paper's value
# fits (64 tokens on an 8 x 8 grid: a side of 8 clips a 7-partition to 4, its largest divisor).
_LONG = (1, 64, H, D)
_DEFAULTS = [
    ("agent", {}, dict(num_agents=49)),
    ("agent", dict(grid=(8, 8)), dict(num_agents=(7, 7))),
    ("window", dict(grid=(8, 8)), dict(window_size=(4, 4))),
    ("grid", dict(grid=(8, 8)), dict(grid_size=4)),
    ("bilevel_routing", dict(grid=(8, 8)), dict(num_regions=4, topk=4)),
    ("spatial_reduction", dict(grid=(8, 8)), dict(reduction=4)),
    ("spatial_reduction", dict(grid=(2, 32)), dict(reduction=(1, 8))),
    ("quadtree", dict(grid=(8, 8)), dict(levels=3, topk=4)),
    ("combiner", {}, dict(block_size=8)),
    ("bottleneck", {}, dict(num_tokens=32)),
    ("clipped_softmax", {}, dict(alpha=0.5)),
    ("mixture_of_heads", dict(router_logits=ref.normal(9, (1, 64, H))), dict(topk=3)),
]


@pytest.mark.parametrize("name,common_args,documented", _DEFAULTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_DEFAULTS)])
def test_defaults_are_the_documented_values(name, common_args, documented):
  q, k, v = (ref.normal(10 + i, _LONG) for i in range(3))
  op = ops.get(name)
  by_default, given = jax.jit(lambda q, k, v: (op(q, k, v, **common_args),
                                                 op(q, k, v, **common_args, **documented)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(by_default), np.asarray(given))


def test_window_default_in_the_layer_matches_the_op():
  x = ref.normal(0, (1, 64, H * D))
  layer = ops.params_module("window")(num_heads=H, num_kv_heads=H, head_dim=D,
                                      op_args=dict(grid=(8, 8)))
  q = ref.normal(1, _LONG)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x, q, q, q)["params"]
  assert shapes["rpb"].value.shape == (H, 7, 7)  # 2·4 − 1 for the default 4 x 4 windows


def test_partition_default_is_the_largest_divisor_up_to_the_papers_size():
  for side, want in ((56, 7), (14, 7), (8, 4), (6, 6), (10, 5), (1, 1)):
    assert ops.windowed.check_partition("window_size", None, (side, side), 7) == (want, want)
  assert ops.common.largest_divisor(0, 49) == 1  # an empty sequence: one (empty) group


@pytest.mark.parametrize("kv_len", [2, 5, 128])
def test_clipped_softmax_default_has_gradient_at_uniform_attention(kv_len):
  # q = 0 gives exactly uniform attention, the state at initialisation; the paper's tuned
  # alpha = 4 clips every weight to zero with few keys (CvT's 5 reduced keys), the default
  # must keep a gradient for any number of keys.
  op = ops.get("clipped_softmax")
  q = jnp.zeros((1, 3, 2, 4))
  k, v = ref.normal(1, (1, kv_len, 2, 4)), ref.normal(2, (1, kv_len, 2, 4))

  def grad(**kw):
    return jax.grad(lambda q, k, v: jnp.sum(op(q, k, v, **kw) ** 2), argnums=(0, 1, 2))(q, k, v)

  dq, _, dv = grad()  # (dk is 0 at q = 0 whatever the weights: logits are q·k)
  assert np.any(np.asarray(dq) != 0) and np.any(np.asarray(dv) != 0)
  if kv_len == 5:
    assert all(np.all(np.asarray(g) == 0) for g in grad(alpha=4.0))


def test_performer_default_features_are_drawn_from_a_fixed_seed():
  q, k, v = (ref.normal(i, (1, 8, 2, 4)) for i in range(3))
  op = ops.get("performer")
  by_default, given = jax.jit(lambda q, k, v: (
      op(q, k, v), op(q, k, v, feature_key=ops.linear.DEFAULT_FEATURE_SEED)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(by_default), np.asarray(given))


# ------------------------------------------------------------------------------------------
# Parameter modules.
# ------------------------------------------------------------------------------------------
def test_parameter_modules_live_in_their_ops_file():
  with_params = [n for n in ops.names() if ops.params_module(n) is not None]
  assert len(with_params) >= 17
  for name in with_params:
    module = ops.params_module(name)
    assert issubclass(module, ops.OpParams)
    if name != "hyena":  # Its gates are `layers.Projection`s: `big_attn.layers.hyena`.
      assert module.__module__ == ops.get(name).__module__, name
  assert ops.params_module("softmax") is None


def test_register_params_refuses_a_second_module():
  with pytest.raises(ValueError, match="parameters for op 'gatv2' are already registered"):
    ops.register_params("gatv2")(ops.OpParams)
  name = "test_only_params"
  try:
    assert ops.register_params(name)(ops.OpParams) is ops.OpParams
    assert ops.params_module(name) is ops.OpParams
  finally:
    registry._PARAMS.pop(name, None)  # pylint: disable=protected-access


def test_layers_op_params_is_a_deprecated_alias():
  from big_attn.layers import op_params  # pylint: disable=import-outside-toplevel
  for name, want in (("params_module", ops.params_module), ("OpParams", ops.OpParams),
                     ("register_params", ops.register_params),
                     ("GPSAParams", ops.positional.GPSAParams)):
    with pytest.warns(DeprecationWarning, match=f"op_params.{name} is deprecated"):
      assert getattr(op_params, name) is want
  with pytest.raises(AttributeError, match="no attribute 'Nope'"):
    op_params.Nope  # pylint: disable=pointless-statement


# ------------------------------------------------------------------------------------------
# Argument checks.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check,args,value,want", [
    (checks.positive_int, (), 3, 3),
    (checks.positive_int, (), np.int32(2), 2),
    (checks.positive_int, (), None, None),  # with optional=True below
    (checks.int_in_range, (0, 4), 0, 0),
    (checks.int_in_range, (2,), 10 ** 6, 10 ** 6),
    (checks.positive_float, (), 2, 2.0),
    (checks.positive_float, (), np.float32(0.5), 0.5),
    (checks.non_negative_float, (), 0.0, 0.0),
    (checks.unit_interval, (), 1.0, 1.0),
    (checks.int_tuple, (), 3, (3, 3)),
    (checks.int_tuple, (), (2, np.int64(5)), (2, 5)),
    (checks.int_tuple, (3,), [1, 2, 3], (1, 2, 3)),
])
def test_checks_return_the_value(check, args, value, want):
  kwargs = dict(optional=True) if value is None else {}
  got = check("x", value, *args, **kwargs)
  assert got == want and type(got) is type(want)


@pytest.mark.parametrize("check,args,kwargs,value,message", [
    (checks.positive_int, (), {}, 0, "x must be a positive int, got 0"),
    (checks.positive_int, (), {}, True, "x must be a positive int, got True"),
    (checks.positive_int, (), {}, 2.0, "x must be a positive int, got 2.0"),
    (checks.positive_int, (), {}, None, "x must be a positive int, got None"),
    (checks.positive_int, (), dict(optional=True), -1, "x must be a positive int or None"),
    (checks.int_in_range, (1, 4), {}, 5, r"x must be an int in \[1, 4\], got 5"),
    (checks.int_in_range, (2,), {}, 1, "x must be an int >= 2, got 1"),
    (checks.positive_float, (), {}, 0.0, "x must be a positive number, got 0.0"),
    (checks.positive_float, (), {}, float("nan"), "x must be a positive number, got nan"),
    (checks.positive_float, (), {}, "1", "x must be a positive number, got '1'"),
    (checks.non_negative_float, (), {}, -1e-9, "x must be a non-negative number"),
    (checks.unit_interval, (), {}, 0.0, r"x must be in \(0, 1\], got 0.0"),
    (checks.unit_interval, (), dict(include_one=False), 1.0, r"x must be in \(0, 1\), got 1.0"),
    (checks.int_tuple, (), {}, (2, 0), "x must be a positive int or a 2-tuple of them"),
    (checks.int_tuple, (), {}, (2, 2, 2), "x must be a positive int or a 2-tuple of them"),
    (checks.int_tuple, (), dict(allow_int=False), 2, "x must be a pair of positive ints, got 2"),
    (checks.int_tuple, (1,), {}, "a", "x must be a positive int, got 'a'"),
])
def test_checks_name_the_argument_and_the_expectation(check, args, kwargs, value, message):
  with pytest.raises(ValueError, match=message):
    check("x", value, *args, **kwargs)


def test_ops_report_bad_hyper_parameters_through_the_checks():
  q = ref.normal(0, (1, 16, 2, 4))
  for name, bad, message in (
      ("combiner", dict(block_size=0), "block_size must be a positive int"),
      ("lightning", dict(decay=1.5, is_causal=True), r"decay must be in \(0, 1\]"),
      ("window", dict(grid=GRID, window_size=(4, 0)), "window_size must be a positive int or"),
      ("quadtree", dict(grid=GRID, levels=0), "levels must be an int >= 1"),
      ("sparse_blocks", dict(cdf_threshold=0.0), r"cdf_threshold must be in \(0, 1\]")):
    with pytest.raises(ValueError, match=message):
      ops.get(name)(q, q, q, **bad)
