"""big_attn.train.regularizers: the attention diversification loss of Robustifying Token
Attention for Vision Transformers against float64 NumPy from the paper's formula (value and
gradient), added to a ViT's loss and through `config.loss.attention_diversification`."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import interpret
from big_attn import main as main_lib
from big_attn.models import vit
from big_attn.tasks import classification_loss
from big_attn.train import config_lib
from big_attn.train import regularizers
from tests import reference
from tests.test_train import losses, tiny_config


def _adl(maps, threshold=2.0):
  """float64 NumPy ADL: mean over layers, batch and rows of cos(A_i, ā) after thresholding."""
  terms = []
  for m in maps:
    a = np.asarray(m, np.float64).mean(1)
    n = a.shape[-1]
    mean_row = a.mean(1, keepdims=True)
    a, mean_row = a * (a > threshold / n), mean_row * (mean_row > threshold / n)
    cos = []
    for b in range(a.shape[0]):
      for i in range(n):
        norm = np.linalg.norm(a[b, i]) * np.linalg.norm(mean_row[b, 0])
        cos.append(a[b, i] @ mean_row[b, 0] / norm if norm > 0 else 0.0)
    terms.append(np.mean(cos))
  return np.mean(terms)


def _maps(seed, shape, scale=2.0):
  """Softmax maps whose key 0 draws much of every row (its mean weight above 2/n)."""
  logits = scale * np.random.default_rng(seed).normal(size=shape)
  logits[..., 0] += 3.0
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_attention_diversification_loss_matches_numpy_value_and_gradient():
  maps = [_maps(0, (2, 3, 6, 6)), _maps(1, (2, 2, 5, 5), scale=4.0)]
  maps[1][0, :, 2] = 0.0  # a fully masked row of every head: cosine 0
  got = regularizers.attention_diversification_loss([jnp.asarray(m, jnp.float32) for m in maps])
  np.testing.assert_allclose(got, _adl(maps), rtol=1e-5)
  assert 0 < got < 1

  grads = jax.grad(lambda ms: regularizers.attention_diversification_loss(ms))(
      [jnp.asarray(m, jnp.float32) for m in maps])
  direction = [np.random.default_rng(2 + i).normal(size=m.shape) for i, m in enumerate(maps)]
  eps = 1e-6
  numeric = (_adl([m + eps * d for m, d in zip(maps, direction)])
             - _adl([m - eps * d for m, d in zip(maps, direction)])) / (2 * eps)
  analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, direction))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3)

  uniform = np.full((1, 1, 4, 4), 0.25)
  focused = np.zeros((1, 1, 4, 4))
  focused[..., 0] = 1.0
  assert float(regularizers.attention_diversification_loss([jnp.asarray(focused)])) == \
      pytest.approx(1.0)
  assert float(regularizers.attention_diversification_loss(
      [jnp.asarray(uniform)], threshold=1.0)) == 0.0  # every weight at the threshold 1/n
  with pytest.raises(ValueError, match="at least one"):
    regularizers.attention_diversification_loss([])
  with pytest.raises(ValueError, match=r"\[batch, heads, n, n\]"):
    regularizers.attention_diversification_loss([jnp.zeros((1, 2, 3, 4))])
  with pytest.raises(ValueError, match="weight must be > 0"):
    regularizers.with_attention_diversification(classification_loss, 0.0)


def test_vit_loss_with_attention_diversification():
  model = vit.Model(num_classes=10, width=16, depth=2, mlp_dim=32, num_heads=2,
                    patch_size=(4, 4), head_zeroinit=False, pool_type="cls")
  images = reference.normal(0, (2, 8, 8, 1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  leaves, tree = jax.tree.flatten(shapes)  # every parameter N(0, 0.5²), the class token too
  params = jax.tree.unflatten(tree, [0.5 * reference.normal(i, x.shape)
                                     for i, x in enumerate(leaves)])
  batch = {"image": images, "labels": jax.nn.one_hot(jnp.array([1, 7]), 10)}
  rng = jax.random.key(1)
  regularized = regularizers.with_attention_diversification(classification_loss, 0.5,
                                                            threshold=0.5)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, loss_fn: loss_fn(model, p, batch, rng)), static_argnums=1)

  def adl(p):  # float64 NumPy ADL of the maps captured from the model
    maps = interpret.capture_attention(model, {"params": p}, images, train=True,
                                       rngs={"dropout": rng})
    assert len(maps) == 2
    return _adl(list(maps.values()), threshold=0.5)

  loss, grads = value_and_grad(params, regularized)
  plain_loss, plain_grads = value_and_grad(params, classification_loss)
  np.testing.assert_allclose(loss, plain_loss + 0.5 * adl(params), rtol=1e-5)
  assert loss > plain_loss

  # The gradient of the added term along a random direction against central differences.
  direction = jax.tree.unflatten(tree, [reference.normal(100 + i, x.shape)
                                        for i, x in enumerate(leaves)])
  step = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  eps = 1e-3
  numeric = 0.5 * (adl(step(eps)) - adl(step(-eps))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g - g0, d)) for g, g0, d in zip(
      jax.tree.leaves(grads), jax.tree.leaves(plain_grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


@pytest.mark.extended
def test_config_key_adds_the_loss_to_training(tmp_path):
  plain = tiny_config(total_steps=1, ckpt_every=100)
  config = tiny_config(total_steps=1, ckpt_every=100, **{
      "loss.attention_diversification": 1.0, "loss.attention_diversification_threshold": 0.0})
  for run, cfg in (("plain", plain), ("adl", config)):
    assert main_lib.train_and_evaluate(cfg, str(tmp_path / run))["step"] == 1
  (plain_loss,), (adl_loss,) = (list(losses(str(tmp_path / r)).values()) for r in ("plain", "adl"))
  assert 0 < adl_loss - plain_loss < 1  # ADL of the first step's maps, a cosine in (0, 1)


def test_config_key_refuses_scanned_layers(tmp_path):
  scanned = tiny_config(**{"loss.attention_diversification": 1.0, "model.scan_layers": True})
  with pytest.raises(config_lib.ConfigError, match="scan_layers=False"):
    main_lib.train_and_evaluate(scanned, str(tmp_path / "scanned"))


def test_a_run_saved_before_the_loss_keys_resumes_unchanged():
  # The keys default to None, which `config_changes` does not count against a saved config
  # that lacks them: a workdir of an earlier version resumes without `accept_changes`.
  new = config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "vit_digits.py"))
  old = new.copy_and_resolve_references()
  with old.unlocked():
    del old["loss"]
    del old.model["token_pooling_scales"]
  assert config_lib.config_changes(old, new) == []
  new.loss.attention_diversification = 0.5
  assert config_lib.config_changes(old, new) == [("loss.attention_diversification", "<absent>", 0.5)]
