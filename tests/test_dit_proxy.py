"""PT-DiT in the DiT family (Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy
Tokens for Text-to-Any-Task): proxy tokens sampled per window, the global proxy-token module and
the (shifted) window branch against float64 NumPy formulas, the `proxy_tokens` option of
`dit.Model` and of the digits config."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn.models import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=2)
GRID, WINDOW, HEADS, WIDTH = (4, 6), 2, 2, 8


def _random_params(module, *args, seed=1, std=0.3):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                      nn.meta.unbox(shapes))


def _mha(xq, xkv, p, mask=None, op="softmax"):
  """Multi-head softmax (or sigmoid, bias -log n) attention with biased projections, float64
  (one example)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  q, k, v = (np.einsum("nd,dhk->nhk", x, p[n]["kernel"]) + p[n]["bias"]
             for n, x in (("query", xq), ("key", xkv), ("value", xkv)))
  logits = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[None], logits, -np.inf)
  if op == "sigmoid":
    weights = 1 / (1 + np.exp(np.log(k.shape[0]) - logits))
  else:
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
  return np.einsum("hqs,shk,hkd->qd", weights, v, p["out"]["kernel"]) + p["out"]["bias"]


def _window_mask(grid, window, shift):
  """[N, N]: token j is in token i's window of the image cyclically rolled by -shift, and, when
  shifted, in the same one of Swin's three regions [0, L-w), [L-w, L-s), [L-s, L) per axis."""
  h, w = grid
  y, x = np.divmod(np.arange(h * w), w)
  keys = []
  for pos, length in ((y, h), (x, w)):
    rolled = (pos - shift) % length
    keys.append(rolled // window)
    if shift:
      keys.append(np.where(rolled < length - window, 0, np.where(rolled < length - shift, 1, 2)))
  return np.all([k[:, None] == k[None, :] for k in keys], axis=0)


def _pt_dit_reference(x, params, index):
  """out = CrossAttn(x, Attn(x[index])) + WindowAttn(x) + ShiftedWindowAttn(x), per example."""
  outs = []
  for xb, ib in zip(np.asarray(x, np.float64), np.asarray(index)):
    proxies = _mha(xb[ib], xb[ib], params["proxy"]["proxy_attn"])
    out = _mha(xb, proxies, params["proxy"]["proxy_cross_attn"])
    out += _mha(xb, xb, params["window_attn"], _window_mask(GRID, WINDOW, 0))
    out += _mha(xb, xb, params["shift_window_attn"], _window_mask(GRID, WINDOW, WINDOW // 2))
    outs.append(out)
  return np.stack(outs)


def test_proxies_attend_with_the_blocks_op():
  """The proxies' self-attention runs the given op (sigmoid here); the cross-attention back to
  all tokens stays softmax."""
  module = dit.ProxyTokenAttention(num_heads=HEADS, window=WINDOW, grid=GRID,
                                   attention="sigmoid")
  x = jax.random.normal(jax.random.key(2), (1, GRID[0] * GRID[1], WIDTH))
  params = _random_params(module, x)
  index = np.asarray(dit.proxy_token_indices(1, GRID, WINDOW))[0]
  xb = np.asarray(x[0], np.float64)
  proxies = _mha(xb[index], xb[index], params["proxy_attn"], op="sigmoid")
  want = _mha(xb, proxies, params["proxy_cross_attn"])
  np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x)[0], want, rtol=1e-4,
                             atol=1e-4)


def _window_of(index, grid, window):
  y, x = np.divmod(np.asarray(index), grid[1])
  return (y // window) * (grid[1] // window) + x // window


def test_pt_dit_attention_matches_numpy_reference():
  module = dit.PTDiTAttention(num_heads=HEADS, window=WINDOW, grid=GRID)
  x = jax.random.normal(jax.random.key(0), (2, GRID[0] * GRID[1], WIDTH))
  params = _random_params(module, x)
  # Evaluation: the centre token (row and column 1 of each 2x2 window) of the 2x3 windows.
  centre = np.array([(2 * i + 1) * GRID[1] + 2 * j + 1 for i in range(2) for j in range(3)])
  out = jax.jit(module.apply)({"params": params}, x)
  np.testing.assert_allclose(out, _pt_dit_reference(x, params, np.stack([centre] * 2)),
                             rtol=1e-4, atol=1e-4)
  # Training: the sampled proxies (sown) are those the output was computed from.
  sampled = jax.jit(lambda x: module.clone(sample=True).apply(
      {"params": params}, x, rngs={"dropout": jax.random.key(5)}, mutable=["intermediates"]))
  out, state = sampled(x)
  (index,) = state["intermediates"]["proxy"]["proxy_index"]
  assert index.shape == (2, 6) and np.any(np.asarray(index) != centre)
  np.testing.assert_allclose(out, _pt_dit_reference(x, params, index), rtol=1e-4, atol=1e-4)
  # The global branch reaches every token: a change at one token moves outputs in far windows.
  moved = sampled(x.at[:, index[0, 0]].add(3.0))[0]
  far = _window_of(np.arange(24), GRID, WINDOW) == 5
  assert np.abs(moved[0, far] - out[0, far]).max() > 1e-3


def test_proxy_sampling_one_token_per_window():
  grid, window = (4, 6), 2
  windows = np.arange(6)
  draws = [np.asarray(dit.proxy_token_indices(3, grid, window, jax.random.key(k)))
           for k in range(4)]
  for index in draws:
    assert index.shape == (3, 6)
    np.testing.assert_array_equal(_window_of(index, grid, window), np.broadcast_to(windows,
                                                                                    (3, 6)))
  assert any(np.any(a != b) for a, b in zip(draws, draws[1:]))  # different rngs, other tokens
  assert np.any(draws[0][0] != draws[0][1])                     # per example
  # Over many draws every token of every window is sampled, about uniformly (1/4 each).
  many = np.asarray(dit.proxy_token_indices(4000, grid, window, jax.random.key(9)))
  counts = np.bincount(many.reshape(-1), minlength=24) / 4000
  np.testing.assert_allclose(counts, 0.25, atol=0.03)
  fixed = np.asarray(dit.proxy_token_indices(2, (6, 6), 3))
  np.testing.assert_array_equal(fixed, [[7, 10, 25, 28]] * 2)   # centres of the 3x3 windows
  with pytest.raises(ValueError, match="proxy_tokens"):
    dit.proxy_token_indices(1, (4, 6), 4)


def _tiny_formula_count(d=16, m=32, depth=2, classes=10, p=2, c=1):
  """tests/test_dit.py's count of the tiny DiT (PT-DiT off)."""
  block = 4 * (d * d + d) + (2 * d * m + m + d) + (6 * d * d + 6 * d)
  t_embed = 256 * d + d + d * d + d
  final = (2 * d * d + 2 * d) + (d * p * p * 2 * c + p * p * 2 * c)
  return (p * p * c * d + d) + t_embed + (classes + 1) * d + depth * block + final


def test_option_off_unchanged_and_on_counts():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, labels = jnp.array([3, 700]), jnp.array([0, 4])
  plain = dit.Model(num_classes=10, **TINY)
  off = dit.Model(num_classes=10, proxy_tokens=None, **TINY)
  assert dit.count_params(plain, (8, 8, 1)) == dit.count_params(off, (8, 8, 1)) == \
      _tiny_formula_count() == 12904
  assert off == plain  # the same module, so the same parameters and outputs
  # PT-DiT: four attention layers (proxies, cross, window, shifted window) in place of one.
  on = dit.Model(num_classes=10, proxy_tokens=2, **TINY)
  assert dit.count_params(on, (8, 8, 1)) == 12904 + 2 * 3 * 4 * (16 * 16 + 16)
  params = _random_params(on, x)
  evaluate = jax.jit(lambda: on.apply({"params": params}, x, t, labels))
  train = jax.jit(lambda key: on.apply({"params": params}, x, t, labels, train=True,
                                       rngs={"dropout": key}))
  np.testing.assert_array_equal(evaluate(), evaluate())  # evaluation: fixed proxies
  a, b = (train(jax.random.key(k)) for k in (0, 1))
  assert np.all(np.isfinite(a)) and np.abs(a - b).max() > 1e-4


def test_train_steps_with_proxy_tokens():
  model = dit.Model(num_classes=10, proxy_tokens=2, learn_sigma=False, **dict(TINY, depth=1))
  x = jnp.clip(jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), -1, 1)
  batch = {"image": x, "labels": jax.nn.one_hot(jnp.arange(4), 10)}
  params = _random_params(model, x, std=0.1)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: dit.TASK.loss(model, p, batch,
                                                             jax.random.key(4)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state, new, losses = tx.init(params), params, []
  for _ in range(3):
    new, opt_state, loss, grads = step(new, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  pt = grads["block_0"]["pt_attn"]
  for branch in (pt["proxy"]["proxy_attn"], pt["proxy"]["proxy_cross_attn"], pt["window_attn"],
                 pt["shift_window_attn"]):
    assert np.abs(branch["query"]["kernel"]).max() > 0


def test_digits_config_proxy_tokens():
  spec = importlib.util.spec_from_file_location(
      "dit_digits", os.path.join(ROOT, "configs", "dit_digits.py"))
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  assert digits.get_config(None).model.proxy_tokens is None
  config = digits.get_config("proxy_tokens=2,runlocal")
  main_lib.check_config(config)
  model = dit.Model(num_classes=10, **config.model.to_dict())
  base = dit.Model(num_classes=10, **digits.get_config("runlocal").model.to_dict())
  assert model.proxy_tokens == 2
  assert dit.count_params(model, (8, 8, 1)) == dit.count_params(base, (8, 8, 1)) + \
      4 * 3 * 4 * (64 * 64 + 64)


def test_bad_proxy_sizes_raise():
  x = jnp.zeros((1, 8, 8, 1))  # a 4x4 patch grid
  for window, match in ((3, "proxy_tokens window 3 must divide the patch grid"),
                        (1, "proxy_tokens"), (True, "proxy_tokens"), (2.0, "proxy_tokens")):
    with pytest.raises(ValueError, match=match):
      dit.Model(num_classes=3, proxy_tokens=window, **TINY).init(jax.random.key(0), x)
