"""DeiT model family: the two tokens and heads, parameter counts, the hard-label distillation
loss, teachers (callable, restored from a trained ConvNeXt run through main), configs."""
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import deit
from big_attn.models import vit
from big_attn.train import config_lib
from tests.test_convnext import (abstract, count, full_size_count, images, random_params,
                                 run_tiny_config, train_steps)
from tests.test_train import _config_module

TINY = dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4)


def test_registry_and_decode_variant():
  assert "deit" in models.names() and models.get("deit") is deit
  assert deit.decode_variant("S/16") == dict(width=384, depth=12, mlp_dim=1536, num_heads=6,
                                             patch_size=(16, 16))
  with pytest.raises(ValueError, match="unknown ViT variant"):
    deit.decode_variant("X/16")


def test_parameter_counts_of_the_variants():
  # DeiT paper, Table 1: DeiT-Ti 5.7M (printed 5M), DeiT-S 22M, DeiT-B 86M; Table 5: DeiT-B⚗
  # (with the distillation token and head) 87M.
  paper = {"Ti/16": 5.7e6, "S/16": 22e6, "B/16": 86e6}
  for variant, expected in paper.items():
    n = full_size_count(deit.Model(num_classes=1000, variant=variant, distilled=False))
    assert abs(n - expected) / expected < 0.02, (variant, n)
  n = full_size_count(deit.Model(num_classes=1000, variant="B/16"))
  assert abs(n - 87e6) / 87e6 < 0.02 and n == 87_336_656, n


def test_tiny_parameter_count_is_vit_plus_token_and_head():
  x = images(size=8)
  plain = count(abstract(vit.Model(num_classes=10, pool_type="cls", **TINY), x))
  assert count(abstract(deit.Model(num_classes=10, distilled=False, **TINY), x)) == plain
  params = abstract(deit.Model(num_classes=10, **TINY), x)
  assert count(params) == plain + 16 + 16 * 10 + 10
  assert params["dist"].value.shape == (1, 16) and params["head_dist"]["kernel"].names == (
      "embed", "classes")


def test_train_returns_both_heads_inference_their_average():
  x = images(batch=3, size=8)
  model = deit.Model(num_classes=5, **TINY)
  params = random_params(model, x)
  apply = jax.jit(lambda p, train: model.apply({"params": p}, x, train=train),
                  static_argnums=1)
  cls_logits, dist_logits = apply(params, True)
  assert cls_logits.shape == dist_logits.shape == (3, 5)
  assert np.abs(cls_logits - dist_logits).max() > 1e-3  # two tokens, two heads
  np.testing.assert_allclose(apply(params, False), (cls_logits + dist_logits) / 2, rtol=1e-5,
                             atol=1e-5)
  plain = deit.Model(num_classes=5, distilled=False, **TINY)
  plain_params = {k: v for k, v in params.items() if k not in ("dist", "head_dist")}
  out = plain.apply({"params": plain_params}, x, train=True)
  assert out.shape == (3, 5) and out.dtype == jnp.float32


def test_hard_distillation_loss_by_hand():
  cls_logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  dist_logits = jnp.array([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
  labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  teacher = jnp.array([[0.1, 0.5, 0.2], [0.9, -1.0, 0.3]])  # argmax: 1, 0
  e = math.e
  ce_cls = [-math.log(e**2 / (e**2 + 2)), -math.log(e / (e + 2))]
  ce_teacher = [-math.log(e / (e + 2)), -math.log(e**3 / (e**3 + 2))]
  ce_labels = [-math.log(1 / (e + 2)), -math.log(1 / (e**3 + 2))]
  np.testing.assert_allclose(deit.hard_distillation_loss(cls_logits, dist_logits, labels, teacher),
                             [0.5 * (a + b) for a, b in zip(ce_cls, ce_teacher)], rtol=1e-6)
  np.testing.assert_allclose(deit.hard_distillation_loss(cls_logits, dist_logits, labels, None),
                             [0.5 * (a + b) for a, b in zip(ce_cls, ce_labels)], rtol=1e-6)


def test_distillation_loss_with_a_callable_teacher():
  x = images(batch=4, size=8)
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
  teacher = lambda imgs: jnp.stack([imgs.mean((1, 2, 3)), -imgs.mean((1, 2, 3)),  # pylint: disable=g-long-lambda
                                    jnp.zeros(imgs.shape[0])], -1)
  model = deit.Model(num_classes=3, teacher=teacher, **TINY)
  params = random_params(model, x)
  batch, rng = {"image": x, "labels": labels}, jax.random.key(0)
  loss = jax.jit(lambda p: deit.distillation_loss(model, p, batch, rng))(params)
  cls_logits, dist_logits = jax.jit(lambda p: model.apply({"params": p}, x, train=True))(params)
  targets = jnp.argmax(teacher(x), -1)
  assert not np.array_equal(targets, jnp.argmax(labels, -1))
  expected = np.mean([0.5 * (-jax.nn.log_softmax(c)[y] - jax.nn.log_softmax(d)[t])
                      for c, d, y, t in zip(cls_logits, dist_logits, [0, 1, 2, 0], targets)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  without = deit.distillation_loss(model.clone(teacher=None), params, batch, rng)
  assert abs(float(without) - float(loss)) > 1e-4
  # The teacher gets no gradient (a teacher with parameters of its own would stay frozen).
  grad = jax.grad(lambda s: deit.distillation_loss(
      model.clone(teacher=lambda imgs: s * teacher(imgs)), params, batch, rng))(1.0)
  assert grad == 0.0


def test_teacher_constants_and_errors(tmp_path, caplog):
  x = images(size=8)
  with caplog.at_level(logging.WARNING):
    assert deit.teacher_constants(deit.Model(num_classes=3, **TINY), {}) is None
  assert "distillation head is trained on the labels" in caplog.text
  assert deit.teacher_constants(deit.Model(num_classes=3, teacher=jnp.tanh, **TINY), {}) is None
  spec = dict(model_name="convnext", model=dict(depths=(1,), dims=(8,)), workdir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    deit.restore_teacher(spec, 3, (8, 8, 3))
  with pytest.raises(ValueError, match="missing \\['workdir'\\]"):
    deit.restore_teacher({k: v for k, v in spec.items() if k != "workdir"}, 3, (8, 8, 3))
  with pytest.raises(KeyError, match="unknown model"):
    deit.restore_teacher(dict(spec, model_name="resnet"), 3, (8, 8, 3))
  with pytest.raises(ValueError, match="restored parameters"):
    deit.teacher_logits(deit.Model(num_classes=3, teacher=spec, **TINY), x)


def test_training_steps_change_params_and_lower_loss():
  x = images(batch=4, size=8)
  model = deit.Model(num_classes=3, head_zeroinit=False, teacher=lambda imgs: jnp.flip(
      jnp.eye(3)[jnp.arange(imgs.shape[0]) % 3], -1), **TINY)
  before, after, losses = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3),
                                      loss_fn=deit.TASK.loss)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_bad_arguments():
  x = images(size=8)
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    abstract(deit.Model(num_classes=0, **TINY), x)
  with pytest.raises(TypeError, match="teacher must be None, a callable or a dict"):
    abstract(deit.Model(num_classes=2, teacher="/tmp/teacher", **TINY), x)
  with pytest.raises(ValueError, match="teacher needs distilled=True"):
    abstract(deit.Model(num_classes=2, teacher=jnp.tanh, distilled=False, **TINY), x)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    abstract(deit.Model(num_classes=2, **TINY), images(size=6))
  with pytest.raises(ValueError, match="images must be"):
    abstract(deit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="remat_policy"):
    abstract(deit.Model(num_classes=2, remat_policy="all", **TINY), x)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    abstract(deit.Model(num_classes=2, attention_args=[1], **TINY), x)
  with pytest.raises(ValueError, match="width, depth"):
    abstract(deit.Model(num_classes=2, num_heads=2), x)


def test_every_config_builds():
  for name, arg in (("deit_digits", None), ("deit_digits", "runlocal,teacher_workdir=/t"),
                    ("deit_i1k", None), ("deit_i1k", "variant=S/16,teacher_workdir=/t"),
                    ("deit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  assert _config_module("deit_digits").get_config(None).model.teacher is None
  digits = _config_module("deit_digits").get_config("teacher_workdir=/tmp/convnext_digits")
  assert digits.model.teacher.to_dict() == dict(
      model_name="convnext", workdir="/tmp/convnext_digits",
      model=_config_module("convnext_digits").MODEL)
  assert "teacher_workdir=/tmp/convnext_digits" in _config_module("deit_digits").__doc__
  config = _config_module("deit_i1k").get_config("teacher_workdir=/t")
  assert config.model.teacher.model.variant == "B" and config.model.variant == "B/16"
  model = deit.Model(**dict(config.model.to_dict(), dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 87e6) / 87e6 < 0.02
  with pytest.raises(ValueError, match="unknown config arg"):
    _config_module("deit_digits").get_config("teacher=/t")


@pytest.mark.slow
def test_convnext_teacher_then_deit_through_main(tmp_path, caplog):
  # The two commands of configs/deit_digits.py: its ConvNeXt teacher as configured, then a
  # (shrunk) student distilled from it.
  teacher_dir, student_dir = tmp_path / "convnext", tmp_path / "deit"
  run_tiny_config("convnext_digits", teacher_dir, steps=6)
  with caplog.at_level(logging.INFO):
    run_tiny_config("deit_digits", student_dir, steps=10,
                    arg=f"runlocal,teacher_workdir={teacher_dir}", width=16, depth=1,
                    num_heads=2, mlp_dim=32)
  assert "DeiT teacher big_attn.models.convnext restored from step 6" in caplog.text
  # The restored teacher is the checkpoint's params, read back here through another orbax API.
  saved = ocp.StandardCheckpointer().restore(os.path.join(teacher_dir, "checkpoints", "6",
                                                          "state"))["params"]
  teacher = _config_module("deit_digits").get_config(
      f"teacher_workdir={teacher_dir}").model.teacher.to_dict()
  restored = deit.restore_teacher(teacher, 10, (16, 16, 1))
  assert set(restored) == {"params"}  # ConvNeXt has no batch statistics
  restored = restored["params"]
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # A dry run compiles the step with the teacher's parameters as an argument.
  config = _config_module("deit_digits").get_config(f"runlocal,teacher_workdir={teacher_dir}")
  config.model.update(width=16, depth=1, num_heads=2, mlp_dim=32)
  config.mesh, config.mesh_subset, config.dry_run = [("data", 1)], True, True
  report = main_lib.train_and_evaluate(config, None)
  student = deit.Model(num_classes=10, **dict(config.model.to_dict(), dtype=jnp.float32))
  assert report["parameters"] == count(abstract(student, jnp.zeros((1, 16, 16, 1))))
  assert report["flops"] > 0
