"""Hierarchical Attention (FasterViT: Fast Vision Transformers with Hierarchical Attention):
forward against a float64 NumPy reference from the paper's formulas, `jax.grad` w.r.t. the input
against central differences of that reference, global reach through the carrier tokens, bad
sizes, and the `hat` MetaFormer mixer in a tiny model's forward and train step and in
`configs/metaformer_digits.py`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn.layers import HierarchicalAttention
from big_attn.models import metaformer
from tests import reference as ref
from tests.test_convnext import train_steps
from tests.test_train import _config_module


_erf = np.vectorize(math.erf)


def _reference(p, x, *, num_heads, window, carriers_per_window):
  """HAT from the formulas, written independently of the module: windows cut by slicing, the
  carriers in the image's row-major (H/window·g) x (W/window·g) order (FasterViT's), the conv
  as a sum of shifted slices, the upsampling by `repeat`, the windows' own step as one batch of
  `[b·nh·nw, g² + window², c]`."""
  b, h, w, c = x.shape
  g = math.isqrt(carriers_per_window)
  s, nh, nw = window // g, h // window, w // window

  def norm(t, q):
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).mean(-1, keepdims=True)
    return (t - mean) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  def dense(t, q):
    return t @ q["kernel"] + q["bias"]

  def attention(t, q):
    query, key, value = (np.einsum("bnc,chd->bnhd", t, q[name]["kernel"]) + q[name]["bias"]
                         for name in ("query", "key", "value"))
    logits = np.einsum("bihd,bjhd->bhij", query, key) / math.sqrt(c // num_heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", weights, value)
    return np.einsum("bihd,hdc->bic", out, q["out"]["kernel"]) + q["out"]["bias"]

  def block(t, prefix):
    t = t + attention(norm(t, p[prefix + "norm1"]), p[prefix + "attention"])
    u = dense(norm(t, p[prefix + "norm2"]), p[prefix + "mlp"]["Dense_0"])
    u = 0.5 * u * (1 + _erf(u / math.sqrt(2)))
    return t + dense(u, p[prefix + "mlp"]["Dense_1"])

  kernel = p["carrier_posemb"]["kernel"][:, :, 0]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  posemb = p["carrier_posemb"]["bias"] + sum(
      padded[:, i:i + h, j:j + w] * kernel[i, j] for i in range(3) for j in range(3))
  grid = np.stack([np.stack([posemb[:, r * s:(r + 1) * s, q * s:(q + 1) * s].mean((1, 2))
                             for q in range(nw * g)], 1) for r in range(nh * g)], 1)
  carriers = block(grid.reshape(b, nh * g * nw * g, c), "carrier_").reshape(
      b, nh * g, nw * g, c)
  cells = [(r, q) for r in range(nh) for q in range(nw)]
  own = np.stack([carriers[:, r * g:(r + 1) * g, q * g:(q + 1) * g] for r, q in cells], 1)
  tokens = np.stack([x[:, r * window:(r + 1) * window, q * window:(q + 1) * window]
                     for r, q in cells], 1)
  out = block(np.concatenate([own.reshape(-1, g * g, c),
                              tokens.reshape(-1, window * window, c)], 1), "")
  new_carriers = out[:, :g * g].reshape(b, nh, nw, g, g, c)
  up = np.repeat(np.repeat(new_carriers, s, axis=3), s, axis=4)
  out = out[:, g * g:].reshape(b, nh, nw, window, window, c) + up
  return np.concatenate([np.concatenate([out[:, r, q] for q in range(nw)], 2)
                         for r in range(nh)], 1)


def _random_params(module, x, seed=1):
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32),
                      nn.unbox(boxed))


CASES = (dict(shape=(2, 4, 6, 8), num_heads=2, window=2, carriers_per_window=1),
         dict(shape=(1, 8, 4, 8), num_heads=2, window=4, carriers_per_window=4))


@pytest.mark.parametrize("case", CASES, ids=("L1", "L4"))
def test_forward_and_input_gradient_match_float64_reference(case):
  case = dict(case)
  shape = case.pop("shape")
  module = HierarchicalAttention(mlp_ratio=2.0, **case)
  x = ref.normal(0, shape)
  params = _random_params(module, x)
  cotangent = ref.normal(3, shape)

  @jax.jit
  def forward_and_grad(params, x):
    fn = lambda x: module.apply({"params": params}, x)
    return fn(x), jax.grad(lambda x: jnp.sum(fn(x) * cotangent))(x)

  out, grad = forward_and_grad(params, x)
  np_params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  expected = _reference(np_params, np.asarray(x, np.float64), **case)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # The float64 gradient by central differences, every input coordinate at once: the 2N
  # perturbed copies of x are one batch of the reference.
  eps, x64 = 1e-5, np.asarray(x, np.float64)
  basis = np.eye(x64.size).reshape(x64.size, *shape)
  perturbed = np.concatenate([x64 + eps * basis, x64 - eps * basis])
  out64 = _reference(np_params, perturbed.reshape(-1, *shape[1:]), **case).reshape(
      perturbed.shape)
  loss = (out64 * np.asarray(cotangent, np.float64)).sum(axis=(1, 2, 3, 4))
  grad64 = ((loss[:x64.size] - loss[x64.size:]) / (2 * eps)).reshape(shape)
  assert np.abs(grad64).max() > 1e-2
  np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-4)


def test_carriers_carry_information_across_windows():
  # Windows of 2x2 on a 4x4 map: a change at the top-left token reaches the bottom-right window
  # only through the carrier tokens (plain window attention leaves it unchanged).
  module = HierarchicalAttention(num_heads=2, window=2, mlp_ratio=2.0)
  x = ref.normal(0, (1, 4, 4, 8))
  params = _random_params(module, x)
  apply = jax.jit(lambda x: module.apply({"params": params}, x))
  changed = apply(x.at[0, 0, 0].add(1.0)) - apply(x)
  far_window = np.abs(np.asarray(changed[0, 2:, 2:])).max(axis=-1)
  assert far_window.min() > 1e-3, far_window
  assert np.abs(np.asarray(changed[0, 0, 0])).max() > far_window.max()


def test_bad_sizes_raise():
  x = jnp.zeros((1, 6, 4, 8))
  for args, match in ((dict(num_heads=2, window=4), "multiples of window"),
                      (dict(num_heads=2, window=2, carriers_per_window=2), "carriers_per_window"),
                      (dict(num_heads=2, window=2, carriers_per_window=9), "carriers_per_window"),
                      (dict(num_heads=3, window=2), "num_heads"),
                      (dict(num_heads=2, window=0), "window")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(HierarchicalAttention(**args).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="head_dim"):
    jax.eval_shape(metaformer.get_mixer("hat")(head_dim=3).init, jax.random.key(0), x)


def test_hat_mixer_in_metaformer_forward_and_train_step():
  # 16x16 images: 4x4 tokens, windows of 2 with one carrier each.
  x = ref.normal(0, (2, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(2) % 3, 3)
  model = metaformer.Model(num_classes=3, depths=(1,), dims=(8,), mixers="hat",
                           layer_scale_init=1.0, head_zeroinit=False,
                           mixer_args=dict(hat=dict(head_dim=8, window=2, mlp_ratio=2.0)))
  params, trained, losses = train_steps(model, x, labels, steps=1)
  assert set(params["stage_0_block_0"]["mixer"]["hat"]) >= {"carrier_posemb",
                                                            "carrier_attention", "attention"}
  assert np.isfinite(losses[0])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, trained)
  assert all(jax.tree.leaves(changed)), changed


def test_digits_config_selects_hat_per_stage():
  # Stages of 8x8, 4x4, 2x2, 1x1 tokens: windows of 4, clipped to 2 and 1 in the last stages.
  config = _config_module("metaformer_digits").get_config("mixer=conv+conv+hat+hat")
  model = metaformer.Model(num_classes=10, **config.model.to_dict())
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  params = nn.unbox(shapes)["params"]
  assert "hat" in params["stage_2_block_0"]["mixer"] and "hat" in params["stage_3_block_0"]["mixer"]
