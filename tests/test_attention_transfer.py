"""Attention transfer (On the Surprising Effectiveness of Attention Transfer for Vision
Transformers): attention copy and attention distillation against a float64 reference of two
softmax attention layers written from the formulas, forward and gradient, and through
`config.loss.attention_transfer` of `big_attn.main`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn.layers import Attention
from big_attn.train import config_lib
from big_attn.train import regularizers
from tests import reference
from tests.test_train import losses, tiny_config

B, N, C, HEADS = 2, 5, 8, 2


class TwoLayers(nn.Module):
  """Tokens `[b, n, c]` (the "images"), `depth` residual softmax attention layers."""
  depth: int = 2

  @nn.compact
  def __call__(self, images, train=False):
    del train
    x = images
    for i in range(self.depth):
      x = x + Attention(num_heads=HEADS, use_bias=True, name=f"attn_{i}")(x)
    return x


def task_loss(model, params, batch, rng):
  del rng
  return jnp.mean(jnp.sin(model.apply({"params": params}, batch["image"])))


def reference_loss(params, x, teacher, *, mode, weight, layers):
  """float64 loss of the student: each layer A·V (A its own softmax(q kᵀ/√d), or the teacher's
  map under copy), plus weight · mean CE(T, S) under distill; also returns the teacher maps."""

  def maps_and_values(p, x):
    q, k, v = (jnp.einsum("bnc,chd->bhnd", x, p[n]["kernel"]) + p[n]["bias"][None, :, None]
               for n in ("query", "key", "value"))
    return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -1), v

  def out(p, a, v):
    return jnp.einsum("bhnd,hdc->bnc", a @ v, p["out"]["kernel"]) + p["out"]["bias"]

  t_maps, y = [], x
  for i in range(2):
    a, v = maps_and_values(teacher[f"attn_{i}"], y)
    t_maps.append(a)
    y = y + out(teacher[f"attn_{i}"], a, v)
  penalty, y = 0.0, x
  for i in range(2):
    p = params[f"attn_{i}"]
    a, v = maps_and_values(p, y)
    transferred = i >= 2 - layers
    if transferred and mode == "copy":
      a = t_maps[i]
    elif transferred:
      penalty += -jnp.mean(jnp.sum(t_maps[i] * jnp.log(a), -1)) / layers
    y = y + out(p, a, v)
  return jnp.mean(jnp.sin(y)) + weight * penalty


@pytest.fixture(scope="module")
def setup():
  model = TwoLayers()
  x = reference.normal(0, (B, N, C))
  student = nn.unbox(model.init(jax.random.key(0), x)["params"])
  teacher = nn.unbox(model.init(jax.random.key(1), x)["params"])
  return model, x, student, teacher


@pytest.mark.parametrize("mode, layers", [("copy", None), ("distill", None), ("copy", 1),
                                          ("distill", 1)])
def test_transfer_matches_reference_value_and_gradient(setup, mode, layers):
  model, x, student, teacher = setup
  weight = 0.7
  loss_fn = regularizers.with_attention_transfer(task_loss, model, {"params": teacher},
                                                 mode=mode, weight=weight, layers=layers)
  batch = {"image": x}
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(model, p, batch, jax.random.key(0))))(student)
  with reference.x64():
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # pylint: disable=unnecessary-lambda-assignment
    ref_loss, ref_grads = jax.value_and_grad(reference_loss)(
        f64(student), f64(x), f64(teacher), mode=mode, weight=weight, layers=layers or 2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  if mode == "copy" and layers is None:  # the student's queries and keys are not used
    for i in range(2):
      for name in ("query", "key"):
        assert float(jnp.abs(grads[f"attn_{i}"][name]["kernel"]).max()) == 0


def test_distillation_loss_and_errors(setup):
  rng = np.random.default_rng(0)
  t, s = (jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 4, 4)), jnp.float32)) for _ in "ts")
  got, grad = jax.value_and_grad(lambda s: regularizers.attention_distillation_loss([s], [t]))(s)
  t64, s64 = np.asarray(t, np.float64), np.asarray(s, np.float64)
  np.testing.assert_allclose(got, -np.mean(np.sum(t64 * np.log(s64), -1)), rtol=1e-6)
  np.testing.assert_allclose(grad, -t64 / s64 / (2 * 3 * 4), rtol=1e-5)
  # H(T, S) >= H(T, T), equality at S = T.
  assert float(regularizers.attention_distillation_loss([t], [t])) < float(got)
  with pytest.raises(ValueError, match="same number"):
    regularizers.attention_distillation_loss([s], [])
  with pytest.raises(ValueError, match="same shape"):
    regularizers.attention_distillation_loss([s], [t[:, :2]])
  for kwargs, match in ((dict(mode="paste"), "mode must be one of"),
                        (dict(mode="distill", weight=0.0), "weight must be > 0"),
                        (dict(mode="copy", layers=0), "layers must be >= 1")):
    with pytest.raises(ValueError, match=match):
      regularizers.with_attention_transfer(task_loss, None, None, **kwargs)
  model, x, student, _ = setup
  one_layer = TwoLayers(depth=1)
  loss_fn = regularizers.with_attention_transfer(
      task_loss, one_layer, nn.unbox(one_layer.init(jax.random.key(0), x)),
      mode="copy")
  with pytest.raises(ValueError, match="the teacher has 1 self-attention layers, TwoLayers ran 2"):
    loss_fn(model, student, {"image": x}, jax.random.key(0))


@pytest.mark.extended
def test_config_transfers_from_a_teacher_workdir(tmp_path):
  teacher_dir = str(tmp_path / "teacher")
  teacher_config = tiny_config(total_steps=2, ckpt_every=2)
  assert main_lib.train_and_evaluate(teacher_config, teacher_dir)["step"] == 2
  teacher = dict(model_name="vit", model=teacher_config.model.to_dict(), workdir=teacher_dir)
  runs = {}
  for mode in ("copy", "distill"):
    config = tiny_config(total_steps=1, ckpt_every=100, **{
        "loss.attention_transfer": mode, "loss.attention_transfer_teacher": teacher,
        "loss.attention_transfer_weight": 2.0})
    assert main_lib.train_and_evaluate(config, str(tmp_path / mode))["step"] == 1
    runs[mode] = losses(str(tmp_path / mode))[1]
  plain = tiny_config(total_steps=1, ckpt_every=100)
  main_lib.train_and_evaluate(plain, str(tmp_path / "plain"))
  plain_loss = losses(str(tmp_path / "plain"))[1]
  # Distillation adds 2·H(T, S) > 0; copying the maps changes the loss itself.
  assert runs["distill"] > plain_loss + 0.1
  assert runs["copy"] != pytest.approx(plain_loss, rel=1e-6)


def test_config_needs_a_teacher_and_a_known_mode(tmp_path):
  for overrides, match in (({"loss.attention_transfer": "copy"},
                            "needs config.loss.attention_transfer_teacher"),
                           ({"loss.attention_transfer": "paste"},
                            "config.loss.attention_transfer: mode must be one of")):
    with pytest.raises(config_lib.ConfigError, match=match):
      main_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "bad"))

