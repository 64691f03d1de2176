"""The VT module of Visual Transformers: Token-based Image Representation and Processing for
Computer Vision (`big_attn.layers.visual_tokens`) against float64 references written from the
paper's tokenizer, the pre-norm token transformer and the projector, and as the `visual_tokens`
mixer of a tiny MetaFormer."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_attn.layers.visual_tokens import VisualTransformer
from big_attn.models import convnext, metaformer
from tests import reference as ref

# Odd, non-square map, 8 channels; 4 tokens of 6 channels, 2 heads of 3.
X = ref.normal(0, (2, 3, 5, 8))
TOKENS_IN = ref.normal(1, (2, 4, 6))
VT = VisualTransformer(num_tokens=4, token_dim=6, num_heads=2, mlp_ratio=1.5)


def random_params(module, *args, seed=2, std=0.4):
  boxed = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                      nn.unbox(boxed))


def softmax(z, axis, xp):
  e = xp.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def layer_norm(z, p, xp):
  mu = z.mean(-1, keepdims=True)
  return (z - mu) / xp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p[
      "bias"]


def gelu_tanh(z, xp):
  return 0.5 * z * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def reference_vt(x, p, tokens_in=None, xp=np):
  """The VT module from the formulas, per example, in float64 (`xp`: NumPy or jax.numpy)."""
  b, h, w, c = x.shape
  outs, all_tokens, all_maps = [], [], []
  for i in range(b):
    pixels = x[i].reshape(h * w, c)                                   # X: [HW, C]
    if tokens_in is None:
      maps = softmax(pixels @ p["token_filter"]["kernel"], 0, xp)     # softmax_HW(X W_A)
    else:
      w_r = tokens_in[i] @ p["token_recurrent"]["kernel"]             # T_in W_{T→R}: [L, C]
      maps = softmax(pixels @ w_r.T, 0, xp)
    t = (maps.T @ pixels) @ p["token_value"]["kernel"]                # (Aᵀ X) W_T
    att = p["attention"]
    y = layer_norm(t, p["norm1"], xp)
    heads = []
    for n in range(att["query"]["kernel"].shape[1]):
      q, k, v = (y @ att[name]["kernel"][:, n] for name in ("query", "key", "value"))
      heads.append(softmax(q @ k.T / math.sqrt(q.shape[-1]), -1, xp) @ v
                   @ att["out"]["kernel"][n])
    t = t + sum(heads)
    mlp = p["mlp"]
    y = layer_norm(t, p["norm2"], xp)
    y = gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"], xp)
    t = t + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    weights = softmax((pixels @ p["project_query"]["kernel"])
                      @ (t @ p["project_key"]["kernel"]).T, -1, xp)  # softmax_L
    outs.append((pixels + weights @ (t @ p["project_value"]["kernel"])).reshape(h, w, c))
    all_tokens.append(t)
    all_maps.append(maps)
  return xp.stack(outs), xp.stack(all_tokens), xp.stack(all_maps)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("recurrent", [False, True])
def test_forward_matches_the_formulas(recurrent):
  tokens_in = TOKENS_IN if recurrent else None
  params = random_params(VT, X, tokens_in)
  assert ("token_recurrent" in params) == recurrent
  assert ("token_filter" in params) != recurrent
  (out, tokens), state = VT.apply({"params": params}, X, tokens_in,
                                  mutable=["intermediates"])
  maps = state["intermediates"]["token_maps"][0]
  want_out, want_tokens, want_maps = reference_vt(
      np.asarray(X, np.float64), f64(params),
      None if tokens_in is None else np.asarray(tokens_in, np.float64))
  assert out.shape == X.shape and tokens.shape == (2, 4, 6) and maps.shape == (2, 15, 4)
  np.testing.assert_allclose(np.asarray(maps, np.float64), want_maps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(tokens, np.float64), want_tokens, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=1e-4, atol=1e-4)
  # One spatial attention map per token, a distribution over the H·W pixels.
  np.testing.assert_allclose(np.asarray(maps, np.float64).sum(axis=1), 1.0, atol=1e-6)
  assert np.all(np.asarray(maps) >= 0)
  assert np.abs(np.asarray(out - X)).max() > 1e-2  # the projector changes the map


@pytest.mark.parametrize("recurrent", [False, True])
def test_gradients_match_a_float64_reimplementation(recurrent):
  """Gradients w.r.t. the input map, the previous tokens (recurrent) and every parameter."""
  inputs = [X, TOKENS_IN] if recurrent else [X]
  params = random_params(VT, *inputs)
  leaves, tree = jax.tree.flatten(params)
  k = len(inputs)

  def module_fn(*arrays):
    out, tokens = VT.apply({"params": jax.tree.unflatten(tree, arrays[k:])}, *arrays[:k])
    return out.sum(axis=(1, 2)) + tokens.sum(axis=1).mean(-1, keepdims=True)

  def reference_fn(*arrays):
    out, tokens, _ = reference_vt(arrays[0], jax.tree.unflatten(tree, arrays[k:]),
                                  arrays[1] if recurrent else None, xp=jnp)
    return out.sum(axis=(1, 2)) + tokens.sum(axis=1).mean(-1, keepdims=True)

  ref.assert_matches(module_fn, reference_fn, [*inputs, *leaves],
                     tol=dict(rtol=2e-4, atol=2e-4))


@pytest.mark.parametrize("module, tokens, match", [
    (VT, None, "x must be"),
    (VisualTransformer(num_tokens=0), None, "num_tokens"),
    (VisualTransformer(num_tokens=4, token_dim=6, num_heads=4), None, "num_heads"),
    (VisualTransformer(num_tokens=4, mlp_ratio=0.0), None, "mlp_ratio"),
    (VT, jnp.zeros((2, 3, 6)), "tokens must be"),
])
def test_bad_inputs(module, tokens, match):
  x = X.reshape(2, 15, 8) if match == "x must be" else X
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(module.init, jax.random.key(0), x, tokens)


def test_the_token_transformer_takes_any_op():
  params = random_params(VT, X)
  softmax_out, _ = VT.apply({"params": params}, X)
  sigmoid_vt = VisualTransformer(num_tokens=4, token_dim=6, num_heads=2, mlp_ratio=1.5,
                                 op="sigmoid")
  sigmoid_out, _ = sigmoid_vt.apply({"params": params}, X)
  assert np.abs(np.asarray(sigmoid_out - softmax_out)).max() > 1e-3


def test_bad_mixer_argument():
  with pytest.raises(ValueError, match="visual_tokens mixer: num_modules"):
    jax.eval_shape(metaformer.get_mixer("visual_tokens")(num_modules=0).init,
                   jax.random.key(0), X)


def test_mixer_in_a_tiny_metaformer_trains():
  """Two VT modules (filter, then recurrent) in a one-block MetaFormer; one SGD step lowers the
  loss on a fixed batch."""
  assert "visual_tokens" in metaformer.mixer_names()
  x = ref.normal(3, (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 1])
  model = metaformer.Model(num_classes=3, depths=(1,), dims=(8,), mixers="visual_tokens",
                           layer_scale_init=1.0, head_zeroinit=False,
                           mixer_args=dict(visual_tokens=dict(num_tokens=4, num_heads=2,
                                                              num_modules=2)))
  params = random_params(model, x, std=0.3)
  mixer = params["stage_0_block_0"]["mixer"]
  assert "token_filter" in mixer["vt_0"] and "token_recurrent" in mixer["vt_1"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grads(params)
  new_loss, _ = loss_and_grads(jax.tree.map(lambda a, g: a - 0.05 * g, params, grads))
  vt_grads = jax.tree.leaves(grads["stage_0_block_0"]["mixer"])
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in vt_grads)
  assert min(float(np.abs(g).max()) for g in vt_grads) > 0  # every VT parameter is trained
  assert float(new_loss) < float(loss)


def test_config_and_convnext_select_the_mixer():
  """Convolutions first, VT modules in the last stage (VT-ResNet's layout): from the
  metaformer_digits config, and as ConvNeXt's per-stage mixer."""
  from tests.test_train import _config_module  # pylint: disable=g-import-not-at-top
  config = _config_module("metaformer_digits").get_config("mixer=conv+conv+conv+visual_tokens")
  model = metaformer.Model(num_classes=10, **config.model.to_dict())
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
  assert shapes["params"]["stage_3_block_0"]["mixer"]["vt_0"]["token_filter"]["kernel"].shape \
      == (64, 16)
  assert "vt_0" not in shapes["params"]["stage_2_block_0"]["mixer"]
  model = convnext.Model(num_classes=3, depths=(1, 1), dims=(8, 16), stem_size=1,
                         mixers=(None, "visual_tokens"), mixer_args=(None, dict(num_tokens=4)))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3))))
  block = shapes["params"]["stage_1_block_0"]
  assert block["mixer"]["vt_0"]["token_filter"]["kernel"].shape == (16, 4)
  assert "mixer" not in shapes["params"]["stage_0_block_0"]
