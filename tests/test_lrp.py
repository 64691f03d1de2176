"""big_attn.interpret.lrp: the rules of Transformer Interpretability Beyond Attention
Visualization against hand-computed and NumPy cases, conservation, and the relevance map of a
tiny ViT against the explicit product of the Ā matrices."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn.interpret import capture, lrp
from big_attn.models import vit


def _model(**kwargs):
  args = dict(num_classes=3, width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=(4, 4),
              pool_type="cls", head_zeroinit=False)
  return vit.Model(**dict(args, **kwargs))


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(0), (2, 8, 8, 3))  # 4 patches


def test_alpha_beta_linear_rule_by_hand():
  x = jnp.array([[1.0, -2.0]])
  w = jnp.array([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]])
  r = jnp.array([[1.0, 2.0, 3.0]])
  # x_j·w_ji = [[1, -1, 2], [-1, -2, 2]]; positive parts [[1, 0, 2], [0, 0, 2]], z⁺ = [1, 0, 4]:
  # output 1 has no positive contribution, its relevance 2 is dropped.
  np.testing.assert_allclose(lrp.lrp_linear(x, w, r), [[1 + 2 / 4 * 3, 2 / 4 * 3]], rtol=1e-6)
  # α=2, β=1: negative parts [[0, -1, 0], [-1, -2, 0]], z⁻ = [-1, -3, 0]:
  # R⁻ = [2/3, 1 + 4/3]; R = 2·R⁺ - R⁻.
  np.testing.assert_allclose(lrp.lrp_linear(x, w, r, alpha=2.0),
                             [[2 * 2.5 - 2 / 3, 2 * 1.5 - 7 / 3]], rtol=1e-6)


def test_addition_split_by_hand():
  a, b, r = jnp.array([[2.0, 1.0]]), jnp.array([[-1.0, 1.0]]), jnp.array([[1.0, 1.0]])
  # Rᵃ = a·r/(a+b) = [2, 0.5], Rᵇ = [-1, 0.5]; sums 2.5 and -0.5, ΣR = 2:
  # R̄ᵃ = Rᵃ·(2.5/3·2)/2.5 = [4/3, 1/3], R̄ᵇ = Rᵇ·(0.5/3·2)/(-0.5) = [2/3, -1/3].
  ra, rb = lrp.lrp_add(a, b, r)
  np.testing.assert_allclose(ra, [[4 / 3, 1 / 3]], rtol=1e-6)
  np.testing.assert_allclose(rb, [[2 / 3, -1 / 3]], rtol=1e-6)
  # An operand whose relevance cancels out gets none.
  ra, rb = lrp.lrp_add(jnp.array([[1.0, -2.0]]), jnp.array([[1.0, 1.0]]),
                       jnp.array([[2.0, 1.0]]))
  np.testing.assert_allclose(ra, [[1.0, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(rb, [[0.0, 0.0]], atol=1e-7)


def test_matmul_rule_against_numpy():
  rng = np.random.default_rng(0)
  a, b, r = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 2, 4))
  ra, rb = lrp.lrp_matmul("bij,bjk->bik", *(jnp.asarray(t, jnp.float32) for t in (a, b, r)))
  contrib = a[:, :, :, None] * b[:, None, :, :] * (r / (a @ b))[:, :, None, :]  # [b, i, j, k]
  np.testing.assert_allclose(ra, contrib.sum(3) / 2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rb, contrib.sum(1) / 2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ra).sum((1, 2)), r.sum((1, 2)) / 2, rtol=1e-4)


def test_conservation_through_linear_and_residual_add():
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (2, 5, 16))
  w = jax.random.normal(k[1], (16, 6))
  r = jax.random.normal(k[2], (2, 5, 6))
  z = x @ w  # biases zeroed
  assert np.all(np.asarray(jnp.maximum(x[..., None] * w, 0).sum(-2)) > 0)  # no output dropped
  np.testing.assert_allclose(lrp.lrp_linear(x, w, r).sum(), r.sum(), rtol=1e-4)
  ra, rb = lrp.lrp_add(x @ w, jax.random.normal(k[3], z.shape), r)
  np.testing.assert_allclose((ra + rb).sum((1, 2)), r.sum((1, 2)), rtol=1e-5)


def test_relevance_maps_and_logits(images):
  model = _model()
  variables = model.init(jax.random.key(2), images)
  out = lrp.lrp_pass(model, variables, images, 1)
  logits = model.apply(variables, images)
  np.testing.assert_allclose(out.logits, logits, atol=1e-5)
  maps = capture.capture_attention(model, variables, images, train=False)
  assert list(out.maps) == list(maps) and out.maps[next(iter(maps))].shape == (2, 2, 5, 5)
  assert out.tokens.shape == (2, 5, 8)
  # The pass is linear in the starting relevance: one-hot·logit = logit · one-hot.
  bare = lrp.lrp_relevance(model, variables, images, 1, scale_by_logit=False)
  for path, m in out.maps.items():
    np.testing.assert_allclose(m, bare[path] * logits[:, 1, None, None, None], rtol=1e-3,
                               atol=1e-6)


def _np_alpha1_beta0(x, w, r):
  """R_j = Σ_i (x_j w_ji)⁺ / Σ_j' (x_j' w_j'i)⁺ · R_i for x [..., j], w [j, i]."""
  c = np.maximum(x[..., :, None] * w, 0.0)
  z = c.sum(-2, keepdims=True)
  return (c * np.where(z > 0, r[..., None, :] / np.where(z > 0, z, 1.0), 0.0)).sum(-1)


def _np_add(a, b, r):
  """The generic rule for a + b, each part rescaled to |ΣRᵘ| / (|ΣRᵃ| + |ΣRᵇ|) · ΣR per example."""
  ra, rb = a * r / (a + b), b * r / (a + b)
  sa, sb, sr = (t.sum((1, 2), keepdims=True) for t in (ra, rb, r))
  norm = np.abs(sa) + np.abs(sb)
  safe = lambda u, w: np.where(w == 0, 0.0, u / np.where(w == 0, 1.0, w))  # 0 where ΣRᵘ = 0
  return ra * safe(np.abs(sa) * sr, norm * sa), rb * safe(np.abs(sb) * sr, norm * sb)


def test_depth1_pass_against_float64_numpy(images):
  """R(A) of a depth-1 class-token ViT, recomputed in float64 NumPy from the parameters."""
  model = _model()
  variables = model.init(jax.random.key(5), images)
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), nn.meta.unbox(variables["params"]))
  blk, att = p["Transformer"]["encoderblock_0"], p["Transformer"]["encoderblock_0"][
      "MultiHeadAttention"]
  ln = lambda t, q: ((t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
                     * q["scale"] + q["bias"])
  img = np.asarray(images, np.float64)
  patches = img.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  x = patches @ p["embedding"]["kernel"].reshape(48, 8) + p["embedding"]["bias"]
  x = x + p["posemb"]["pos_embedding"].reshape(4, 8)
  x = np.concatenate([np.broadcast_to(p["cls"], (2, 1, 8)), x], 1)  # [2, 5, 8]
  dense = lambda t, q: t @ q["kernel"].reshape(8, 8) + q["bias"].reshape(8)
  y0 = ln(x, blk["LayerNorm_0"])
  q, k, v = (dense(y0, att[n]).reshape(2, 5, 2, 4) for n in ("query", "key", "value"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", a, v)
  attn_out = dense(o.reshape(2, 5, 8), att["out"])
  x1 = x + attn_out
  y1 = ln(x1, blk["LayerNorm_1"])
  hid = y1 @ blk["MlpBlock"]["Dense_0"]["kernel"] + blk["MlpBlock"]["Dense_0"]["bias"]
  g = 0.5 * hid * (1 + np.tanh(np.sqrt(2 / np.pi) * (hid + 0.044715 * hid ** 3)))
  m = g @ blk["MlpBlock"]["Dense_1"]["kernel"] + blk["MlpBlock"]["Dense_1"]["bias"]
  pooled = ln(x1 + m, p["Transformer"]["encoder_norm"])[:, 0]
  out = pooled @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(out, model.apply(variables, images), rtol=1e-4, atol=1e-5)
  # Backward from onehot(1)·logit.
  r = np.zeros_like(out)
  r[:, 1] = out[:, 1]
  r_tok = np.zeros((2, 5, 8))
  r_tok[:, 0] = _np_alpha1_beta0(pooled, p["head"]["kernel"], r)
  r_x1, r_m = _np_add(x1, m, r_tok)
  r_g = _np_alpha1_beta0(g, blk["MlpBlock"]["Dense_1"]["kernel"], r_m)
  r_x1 = r_x1 + _np_alpha1_beta0(y1, blk["MlpBlock"]["Dense_0"]["kernel"], r_g)
  _, r_att = _np_add(x, attn_out, r_x1)
  r_o = _np_alpha1_beta0(o.reshape(2, 5, 8), att["out"]["kernel"].reshape(8, 8), r_att)
  ratio = (r_o.reshape(2, 5, 2, 4) / o).transpose(0, 2, 1, 3)  # [b, h, q, d]
  contrib = a[..., None] * v.transpose(0, 2, 1, 3)[:, :, None] * ratio[:, :, :, None]
  expected = contrib.sum(-1) / 2  # the A-half of the A·V rule: [b, h, q, k]
  (got,) = lrp.lrp_relevance(model, variables, images, 1).values()
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("pool_type", ["cls", "gap"])
def test_attribution_equals_explicit_product(images, pool_type):
  model = _model(pool_type=pool_type)
  variables = model.init(jax.random.key(3), images)
  target = np.array([0, 2])
  heat = lrp.transformer_attribution(model, variables, images, target)
  assert heat.shape == (2, 4) and np.all(np.isfinite(heat))
  (rel,) = lrp.lrp_relevance(model, variables, images, target).values()
  _, grads = capture.attention_gradients(
      model, variables, lambda o: o[jnp.arange(2), target].sum(), images, train=False)
  (grad,) = grads.values()
  rel, grad = np.asarray(rel, np.float64), np.asarray(grad, np.float64)
  n = rel.shape[-1]  # 5 with a class token, 4 without
  a_bar = np.eye(n) + np.maximum(grad * rel, 0.0).mean(1)  # Ā = I + E_h[(∇A ⊙ R(A))⁺]
  expected = a_bar[:, 0, 1:] if pool_type == "cls" else a_bar.mean(1)  # gap: mean patch row
  np.testing.assert_allclose(heat, expected, rtol=1e-6)


def test_deeper_model_with_registers(images):
  model = _model(depth=2, pool_type="gap", num_registers=1)
  variables = model.init(jax.random.key(4), images)
  maps = lrp.lrp_relevance(model, variables, images, 2)
  assert [m.shape for m in maps.values()] == [(2, 2, 5, 5)] * 2
  assert all(np.all(np.isfinite(m)) for m in maps.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention="sigmoid"), "softmax"),
    (dict(pool_type="map"), "pool_type"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(num_kv_heads=1), "num_kv_heads"),
    (dict(scan_layers=True), "scan_layers"),
    (dict(num_classes=0), "num_classes"),
    (dict(attention_args={"scale": 1.0}), "attention_args"),
])
def test_unsupported_models_raise(images, kwargs, match):
  with pytest.raises(ValueError, match=match):
    lrp.lrp_relevance(_model(**kwargs), None, images, 0)


def test_bad_inputs_raise(images):
  model = _model()
  with pytest.raises(ValueError, match="vit.Model"):
    lrp.lrp_relevance(object(), None, images, 0)
  with pytest.raises(ValueError, match="images"):
    lrp.lrp_relevance(model, None, images[0], 0)
  with pytest.raises(ValueError, match="target"):
    lrp.lrp_relevance(model, None, images, 3)
  with pytest.raises(ValueError, match="target"):
    lrp.transformer_attribution(model, None, images, [0, 1, 2])
  with pytest.raises(TypeError, match="target"):
    lrp.lrp_relevance(model, None, images, 0.5)
