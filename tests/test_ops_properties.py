"""Properties every registered op must have, checked over the whole registry.

- causal: with `is_causal=True` the output at t depends on nothing after t (statistics,
  normalisers and quantisation scales included);
- batch: examples are independent (changing example 0 leaves example 1 bit-identical);
- NaN: a NaN query, key or value gives NaN in the rows it reaches (never a finite result);
- zero length: an empty sequence gives the empty result or a clear ValueError;
- `jax.debug_infs`: masked and causal calls outside `jit` raise no FloatingPointError;
- the registry holds every op family's names.

Inputs are tiny (batch 2, 12 tokens = a 2×6 grid, 2 heads, head_dim 8), with block and chunk
sizes that do not divide the length. `_op_args` is the one table of per-op arguments: weights
are fixed, arrays laid out `[batch, seq, ...]` are per-token inputs and change with q, k, v.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops

B, T, N, D = 2, 12, 2, 8
WIDTH = 6  # Tokens are also a (T / WIDTH) × WIDTH grid for the 2-D ops.
CUT = 7  # The causal test changes tokens CUT.. and compares the outputs before CUT.


def _op_args(name, t, weight, token):
  """Arguments of op `name` beyond q, k, v for length t; `weight(shape, std)` draws a fixed
  array, `token(shape, std)` a per-token input `[batch, t, ...]`."""
  grid = (t // WIDTH, WIDTH)
  table = {
      "agent": lambda: dict(num_agents=4),
      "bilevel_routing": lambda: dict(grid=grid, num_regions=(1, 2), topk=1),
      "bottleneck": lambda: dict(num_tokens=3),
      "cascaded_group_attention": lambda: dict(
          grid=grid, query_conv=weight((3, 3, N, D), 0.3), cascade_query=weight((N - 1, D, D), 0.3),
          cascade_key=weight((N - 1, D, D), 0.3), cascade_value=weight((N - 1, D, D), 0.3)),
      "combiner": lambda: dict(block_size=5),
      "deformable_attention": lambda: dict(
          grid=grid, offset_dw_kernel=weight((3, 3, D), 0.3), offset_pw_kernel=weight((D, 2)),
          rpb=weight((N, max(2 * grid[0] - 1, 0), 2 * WIDTH - 1))),
      "decomposed_relpos": lambda: dict(grid=grid, rel_h=weight((max(2 * grid[0] - 1, 0), D)),
                                         rel_w=weight((2 * WIDTH - 1, D))),
      "focused_linear": lambda: dict(chunk_size=5),
      "gated_attention": lambda: dict(gate_logits=token((B, t, N))),
      "gatv2": lambda: dict(attn_vec=weight((N, D))),
      "gin_attention": lambda: dict(gin_eps=weight((N,), 0.3), mlp_w1=weight((N, D, 5), 0.3),
                                    mlp_b1=weight((N, 5), 0.3), mlp_w2=weight((N, 5, D), 0.3),
                                    mlp_b2=weight((N, D), 0.3)),
      "gpsa": lambda: dict(grid=grid, pos_proj=weight((N, 3)), gating=weight((N,))),
      "grid": lambda: dict(grid=grid, grid_size=(1, 3)),
      "hyena": lambda: dict(filters=weight((2, max(2 * t - 1, 0), N, D), 0.3)),
      "kernelized_rpe": lambda: dict(rpe_bias=weight((N, max(2 * t - 1, 0))), feature_key=0,
                                     num_features=8),
      "latte": lambda: dict(latents=weight((N, 3, D)), chunk_size=5),
      "lean_decode": lambda: dict(block_size=5),
      "levit_bias": lambda: dict(grid=grid, attention_bias=weight((N,) + grid)),
      "lightning": lambda: dict(block_size=5),
      "lognormal_linear": lambda: dict(chunk_size=5),
      "mask_reweighted": lambda: dict(grid=grid, gmm_amplitude=weight((N, 3)),
                                      gmm_sigma=weight((N, 3), 3.0)),
      "mixture_of_heads": lambda: dict(router_logits=token((B, t, N)), topk=1),
      "neighborhood": lambda: dict(kernel_size=3),
      "neural_attention": lambda: dict(w1=weight((N, 2 * D, 5), 0.3), b1=weight((N, 5), 0.3),
                                       w2=weight((N, 5), 0.5)),
      "outlook_attention": lambda: dict(grid=grid, outlook_kernel=weight((N, D, 81), 0.3)),
      "performer": lambda: dict(features=weight((16, D)), chunk_size=5),
      "probabilistic_attention": lambda: dict(log_prior=token((B, t, N))),
      "quadtree": lambda: dict(grid=grid, levels=2, topk=2),
      "relational_attention": lambda: dict(rel_query=token((B, t, 3, 4)),
                                           rel_key=token((B, t, 3, 4)),
                                           rel_out=weight((N, 3, D), 0.5)),
      "reversed_attention": lambda: dict(message=token((B, t, N))),
      "sage_int8": lambda: dict(block_q=5, block_k=3),
      "skim_attention": lambda: dict(grid=grid, layout_query=token((B, t, N, 4)),
                                     layout_key=token((B, t, N, 4)), top_k=5),
      "sparse_blocks": lambda: dict(block_q=5, block_k=2, cdf_threshold=0.3),
      "sparge_attention": lambda: dict(block_q=5, block_k=2, cdf_threshold=0.3,
                                       pv_threshold=-1.0),
      "sdm": lambda: dict(radius=3),
      "serialized_patch_attention": lambda: dict(grid=grid, patch_size=5, order="hilbert"),
      "sparsifiner": lambda: dict(predictor_q=weight((N, D, 2)), predictor_k=weight((N, D, 2)),
                                  topk=3),
      "spatial_reduction": lambda: dict(grid=grid, reduction=2),
      "super_attention": lambda: dict(alignment=weight((t, t), 0.5)),
      "switchhead": lambda: dict(value_experts=token((B, t, N, 3, D)),
                                 router_logits_v=token((B, t, N, 3)),
                                 router_logits_o=token((B, t, N, 3)),
                                 out_experts=weight((N, 3, D, D), 0.4)),
      "gta_attention": lambda: dict(grid=grid),
      "urpe": lambda: dict(rpe_multiplier=weight((N, max(2 * t - 1, 0))),
                           rpe_bias=weight((N, max(2 * t - 1, 0)))),
      "variational_attention": lambda: dict(posterior_query=token((B, t, N, D))),
      "window": lambda: dict(grid=grid, window_size=(1, 3)),
  }
  return table.get(name, dict)()


def _inputs(name, seed, t=T, std=1.0):
  """`[q, k, v]` and the op's arguments; everything per token is drawn from `seed`."""
  tokens, weights = np.random.default_rng(seed), np.random.default_rng(1234)
  weight = lambda shape, s=1.0: jnp.asarray(weights.normal(size=shape) * s, jnp.float32)
  token = lambda shape, s=1.0: jnp.asarray(tokens.normal(size=shape) * s * std, jnp.float32)
  return [token((B, t, N, D)) for _ in range(3)], _op_args(name, t, weight, token)


def _is_token_input(x):
  return isinstance(x, jax.Array) and x.shape[:2] == (B, T)


def _splice(base, other, select):
  """`base` with the entries where `select[batch, token]` is True taken from `other`, in q, k,
  v and every per-token argument."""
  (arrays, args), (other_arrays, other_args) = base, other

  def pick(x, y):
    where = select.reshape(select.shape + (1,) * (x.ndim - 2))
    return jnp.where(where, y, x)

  return ([pick(x, y) for x, y in zip(arrays, other_arrays)],
          {n: pick(a, other_args[n]) if _is_token_input(a) else a for n, a in args.items()})


def _call(name, inputs, **kwargs):
  arrays, args = inputs
  return np.asarray(ops.get(name)(*arrays, **args, **kwargs))


def _causal_form_or_skip(name, inputs):
  """The causal output of an op the registry says has a causal form; for the others, checks
  that `is_causal=True` raises, then skips."""
  if ops.has_causal_form(name):
    return _call(name, inputs, is_causal=True)
  with pytest.raises(NotImplementedError, match="no causal form"):
    _call(name, inputs, is_causal=True)
  pytest.skip(f"{name} has no causal form (registered with causal=False)")


@pytest.mark.parametrize("name", ops.names())
def test_causal_output_ignores_later_tokens(name):
  base = _inputs(name, 0)
  out = _causal_form_or_skip(name, base)
  later = np.broadcast_to(np.arange(T) >= CUT, (B, T))
  changed = _call(name, _splice(base, _inputs(name, 1, std=30.0), later), is_causal=True)
  # Float32 FFT convolutions (hyena, kernelized_rpe) mix every token into every output at
  # round-off level, relative to the largest output; int8 rounding, a statistic or an
  # exponent stabiliser that sees the (30 times larger) future moves far more.
  atol = 1e-6 * max(1.0, np.abs(changed).max())
  np.testing.assert_allclose(changed[:, :CUT], out[:, :CUT], rtol=1e-5, atol=atol)
  assert not np.allclose(changed[:, CUT:], out[:, CUT:], atol=1e-3)


@pytest.mark.parametrize("name", ops.names())
def test_batch_examples_are_independent(name):
  base = _inputs(name, 0)
  out = _call(name, base)
  first = np.broadcast_to((np.arange(B) == 0)[:, None], (B, T))
  changed = _call(name, _splice(base, _inputs(name, 1, std=4.0), first))
  np.testing.assert_array_equal(changed[1:], out[1:])
  assert not np.allclose(changed[0], out[0], atol=1e-3)


@pytest.mark.parametrize("name", ops.names())
def test_nan_input_gives_nan_output(name):
  """A NaN at token CUT of example 0, in q, k, v or a per-token argument: each (row, head) of
  the output is all NaN or unchanged, never a finite change; the query's own row is NaN."""
  arrays, args = _inputs(name, 0)
  clean = _call(name, (arrays, args))
  sources = {"query": 0, "key": 1, "value": 2,
             **{n: n for n, a in args.items() if _is_token_input(a)}}
  for source, where in sources.items():
    poisoned_arrays, poisoned_args = list(arrays), dict(args)
    target = poisoned_arrays if isinstance(where, int) else poisoned_args
    target[where] = target[where].at[0, CUT].set(jnp.nan)
    out = _call(name, (poisoned_arrays, poisoned_args))
    nan = np.isnan(out).all(-1)
    same = (out == clean).all(-1)
    assert (nan | same).all(), f"a NaN {source} changed (row, head)s {np.argwhere(~nan & ~same)}"
    assert same[1].all(), f"a NaN {source} in example 0 reached example 1"
    if source == "query":
      assert nan[0, CUT].all(), "a NaN query must give NaN in its own row"


@pytest.mark.parametrize("name", ops.names())
def test_zero_length_is_empty_or_value_error(name):
  arrays, args = _inputs(name, 0, t=0)
  try:
    out = ops.get(name)(*arrays, **args)
  except ValueError as e:
    assert "0" in str(e) or "empty" in str(e), f"unclear error for a zero-length input: {e}"
    return
  assert out.shape == (B, 0, N, D)


@pytest.mark.parametrize("name", ops.names())
def test_masked_and_causal_calls_under_debug_infs(name):
  """Outside `jit`, `jax.debug_infs` checks every primitive: masking must not make an inf.
  The key-padding mask leaves example 1 no key at all (its rows are zeros); ops whose mask is
  not a `[batch, 1, 1, kv_len]` key mask reject it with a ValueError naming `mask`."""
  arrays, args = _inputs(name, 0)
  valid = np.ones((B, 1, 1, T), bool)
  valid[0, ..., CUT:] = False
  valid[1] = False
  with jax.debug_infs(True):
    try:
      ops.get(name)(*arrays, **args, is_causal=True)
    except NotImplementedError as e:
      assert "no causal form" in str(e)
    try:
      out = ops.get(name)(*arrays, **args, mask=jnp.asarray(valid))
    except ValueError as e:
      assert "mask" in str(e)
    else:
      np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


def test_registry_has_at_least_20_ops():
  names = ops.names()
  assert len(names) >= 20
  for name in ("window", "grid", "spatial_reduction", "channel_attention", "bilevel_routing",
               "mixture_of_heads"):
    assert name in names


def test_quantized_sparse_and_learned_scoring_ops_are_registered():
  assert {"sage_int8", "sparse_blocks", "neural_attention", "gatv2"} <= set(ops.names())


@pytest.mark.parametrize("name", ops.names())
def test_zero_query_and_key_have_finite_gradients(name):
  """A token whose query and key are exactly zero (a zero-initialised class token after a
  LayerNorm and a bias-free projection) gives finite gradients wrt q, k and v: no norm or
  square root of zero on the way (NaN = 0·∞)."""
  arrays, args = _inputs(name, 0)
  zero = np.broadcast_to(np.arange(T) == 0, (B, T))[..., None, None]
  q, k, v = (jnp.where(zero, 0.0, x) if i < 2 else x for i, x in enumerate(arrays))
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ops.get(name)(q, k, v, **args)[:, 0]),
                           argnums=(0, 1, 2)))(q, k, v)
  for which, g in zip("qkv", grads):
    assert np.isfinite(np.asarray(g)).all(), f"d{which} is not finite"
