"""Hierarchical local-global ViTs (DaViT, Twins-SVT, DiNAT, BiFormer, RMT): variants, parameter
counts against the papers, forward and one train step per family, RMT's decomposed attention and
rotary frequencies against float64 references, the configs, a short run through main."""
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn import ops
from big_attn.layers import apply_rope
from big_attn.models import hvit
from big_attn.train import config_lib
from tests import reference
from tests.test_convnext import init_batch_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parameters (millions) the papers report at 224x224, 1000 classes, in their ImageNet-1K
# comparison tables:
# DaViT (Ding et al., ECCV 2022): T/S/B 28.3/49.7/87.9M.
# Twins (Chu et al., NeurIPS 2021): SVT-S/B/L 24.0/56.0/99.2M.
# DiNAT (Hassani & Shi, 2022) Table 1: M/T/S/B 20/28/51/90M.
# BiFormer (Zhu et al., CVPR 2023): T/S/B 13.1/25.5/57M.
# RMT (Fan et al., CVPR 2024): T/S/B/L 14/27/54/95M.
# The papers round to whole millions where they give no decimal (DiNAT, BiFormer-B, RMT): there
# the tolerance is 2% or the rounding, ±0.5M (RMT-T: the authors' RMT_T3 has 14.33M, "14M").
PAPER = {"davit_t": 28.3, "davit_s": 49.7, "davit_b": 87.9,
         "twins_svt_s": 24.0, "twins_svt_b": 56.0, "twins_svt_l": 99.2,
         "dinat_m": 20, "dinat_t": 28, "dinat_s": 51, "dinat_b": 90,
         "biformer_t": 13.1, "biformer_s": 25.5, "biformer_b": 57,
         "rmt_t": 14, "rmt_s": 27, "rmt_b": 54, "rmt_l": 95}
# Parameters each family's block must own (beyond attention, norms and MLP).
FAMILY_PARAMS = {"davit": {"cpe", "cpe_mlp"}, "twins_svt": {"sr", "sr_norm"},
                 "dinat": {"rpb"}, "biformer": {"cpe", "lce_kernel", "lce_bias"},
                 "rmt": {"cpe", "lce_kernel", "ffn_conv", "fc1"}}


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _abstract(model, images):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


def _count(model, size=224):
  shapes = nn.meta.unbox(_abstract(model, jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _tiny(family, **overrides):
  kwargs = dict(_config_module("hvit_digits").get_config(f"family={family}").model)
  kwargs.update(num_classes=10, head_zeroinit=False, dtype=jnp.float32)
  kwargs.update(overrides)
  return hvit.Model(**kwargs)


def test_registry_and_variants():
  assert models.get("hvit") is hvit
  assert set(PAPER) == set(hvit._VARIANTS)  # pylint: disable=protected-access
  for name in PAPER:
    spec = hvit.decode_variant(name)
    assert name.startswith(spec["family"]) and spec["family"] in hvit.FAMILIES
    assert len(spec["embed_dims"]) == len(spec["depths"]) == len(spec["num_heads"]) == 4
  assert hvit.decode_variant("davit_t")["depths"] == (2, 2, 6, 2)
  assert hvit.decode_variant("twins_svt_s")["sr_ratios"] == (8, 4, 2, 1)
  for bad in ("davit", "davit_x", "DaViT-T", "", None):
    with pytest.raises(ValueError, match="davit_t"):
      hvit.decode_variant(bad)


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_parameter_count_matches_paper(variant):
  count = _count(hvit.Model(num_classes=1000, variant=variant))
  paper = PAPER[variant]
  tolerance = max(0.02 * paper, 0.5 if isinstance(paper, int) else 0.0)
  assert abs(count / 1e6 - paper) < tolerance, count


def _filled(model, images, seed=1):
  """Random parameters of the right shapes, filled by NumPy (no init is compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype),
                      nn.meta.unbox(_abstract(model, images)))


# DaViT's train step runs through main in test_tiny_config_trains_through_main.
@pytest.mark.parametrize("family", [f for f in hvit.FAMILIES if f != "davit"])
def test_forward_and_train_step(family):
  # Two blocks (local, global) in the first stage, one in the others: XLA's CPU compile time
  # grows with every convolution, so the step is compiled without backend optimisation.
  model = _tiny(family, depths=(2, 1, 1, 1))
  images = reference.normal(0, (2, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.array([3, 7]), 10)
  params = _filled(model, images)
  stats = init_batch_stats(model, images)  # BiFormer's and RMT's BatchNorms
  assert bool(stats) == (family in ("biformer", "rmt"))
  first = set(params["stage0_block0"]) | set(params["stage0_block1"])
  assert FAMILY_PARAMS[family] <= first | set(params), sorted(first)
  tx = optax.sgd(0.1)

  def step(params, opt_state):
    def loss_fn(p):
      logits, _ = model.apply({"params": p, **stats}, images, train=True,
                              rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
      return optax.softmax_cross_entropy(logits, labels).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), loss, logits, grads

  opt_state = tx.init(params)
  compiled = jax.jit(step).lower(params, opt_state).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  new_params, loss, logits, grads = compiled(params, opt_state)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.isfinite(loss)
  # Both ops of the first stage and the last stage's attention learn.
  for name in ("stage0_block0", "stage0_block1", "stage3_block0"):
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[name]["attention"])]
    assert max(norms) > 0, name
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
  # Softmax is blind to the key bias (it adds a constant per query row); on the last stage's
  # 1x1 map a softmax over one key gives queries and keys no gradient at all.
  block = dict(moved["stage0_block1"], attention=dict(moved["stage0_block1"]["attention"]))
  block["attention"]["key"] = block["attention"]["key"]["kernel"]
  assert all(jax.tree.leaves(moved["head"])) and all(jax.tree.leaves(block)), block
  assert any(jax.tree.leaves(moved["stage3_block0"]))


def test_ops_are_swappable_and_grids_filled():
  images = jnp.zeros((1, 16, 16, 3))
  model = _tiny("davit", local_attention="neighborhood",
                local_attention_args={"kernel_size": 1}, global_attention="softmax")
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images))[0]
  assert out.shape == (1, 10)
  # Twins with the op's own depthwise reduction instead of the layer's conv.
  model = _tiny("twins_svt", sr_ratios=1, global_attention="spatial_reduction",
                global_attention_args={"reduction": 1, "method": "conv"})
  params = _abstract(model, images)
  assert "sr" not in params["stage0_block1"]
  assert "op_params" in params["stage0_block1"]["attention"]


def test_decomposed_retention_matches_reference():
  b, h, w, n, d = 2, 3, 4, 2, 5
  q, k, v = (reference.normal(s, (b, h * w, n, d)) for s in range(3))
  gamma = np.array([0.75, 0.9], np.float32)
  out = hvit._decomposed(  # pylint: disable=protected-access
      ops.get("retention"), q, k, v, (h, w), gamma=gamma, mask=None, is_causal=False)
  with reference.x64():
    qr, kr, vr = (reference.f64(x).reshape(b, h, w, n, d) for x in (q, k, v))
    log_g = jnp.log(jnp.asarray(gamma, jnp.float64))
    s = d ** -0.5

    def attend(logits, dist):  # along the last axis, with RMT's decay log γ·|Δ|
      logits = logits + log_g[:, None, None] * dist
      return jax.nn.softmax(logits, axis=-1)

    dw = np.abs(np.arange(w)[:, None] - np.arange(w)[None, :])
    aw = attend(jnp.einsum("byxnd,byznd->bynxz", qr, kr) * s, dw)
    mid = jnp.einsum("bynxz,byznd->byxnd", aw, vr)
    dh = np.abs(np.arange(h)[:, None] - np.arange(h)[None, :])
    ah = attend(jnp.einsum("byxnd,bzxnd->bxnyz", qr, kr) * s, dh)
    want = jnp.einsum("bxnyz,bzxnd->byxnd", ah, mid).reshape(b, h * w, n, d)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_rmt_rotary_frequencies():
  # RMT's angle = 1 / 10000 ** linspace(0, 1, d/2); Attention's rope_base 10000^(d/(d-2)).
  d, pos = 8, 5
  x = jnp.eye(d)[None, :d // 2].repeat(1, 0).reshape(1, d // 2, 1, d)  # token i: channel i set
  out = apply_rope(jnp.broadcast_to(x, (1, d // 2, 1, d)), jnp.full((d // 2,), pos),
                   10_000.0 ** (d / (d - 2)))
  angles = pos / 10_000.0 ** np.linspace(0, 1, d // 2)
  np.testing.assert_allclose(np.asarray(out[0, :, 0]).diagonal(), np.cos(angles), rtol=1e-5)


def test_configs_build():
  digits, i1k = _config_module("hvit_digits"), _config_module("hvit_i1k")
  assert "configs/hvit_digits.py" in digits.__doc__ and "configs/hvit_i1k.py" in i1k.__doc__
  for family in hvit.FAMILIES:
    config = digits.get_config(f"family={family},runlocal")
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert hvit.Model(num_classes=10, **config.model).spec()["family"] == family
  for variant in PAPER:
    config = i1k.get_config(f"variant={variant}")
    main_lib.check_config(config)
    assert hvit.Model(**config.model).spec()["depths"] == hvit.decode_variant(variant)["depths"]
  swapped = digits.get_config("family=rmt,global_attention=softmax").model
  assert hvit.Model(num_classes=10, **swapped).spec()["ops"] == ("retention", "softmax")
  for bad in ("family=swin", "variant=davit_t"):
    with pytest.raises(ValueError):
      digits.get_config(bad)
  with pytest.raises(ValueError, match="davit_t"):
    i1k.get_config("variant=davit_xl")


def test_bad_arguments():
  images = jnp.zeros((1, 16, 16, 3))

  def init(model, x=images):
    return _abstract(model, x)

  cases = [
      (dict(), "needs a variant"),
      (dict(family="swin"), "unknown hvit family"),
      (dict(family="davit"), "needs a variant or explicit embed_dims, depths, num_heads"),
      (dict(variant="davit_t", family="rmt"), "davit model"),
      (dict(family="davit", arch="rmt"), "disagree"),
      (dict(variant="davit_t", depths=(2, 2, 2)), "depths"),
      (dict(variant="davit_t", embed_dims=(96, 192, 384, 770)), "divisible by num_heads"),
      (dict(variant="davit_t", sr_ratios=2), "not a setting of family 'davit'"),
      (dict(variant="dinat_t", patch_size=3), "power of two"),
      (dict(variant="biformer_t", topks=(1, 0, 2, -1)), "topks"),
      (dict(variant="rmt_t", decays=(2, 4)), "decays"),
      (dict(variant="davit_t", local_attention="no_such_op"), "unknown attention op"),
      (dict(variant="davit_t", global_attention_args=[1]), "dicts"),
  ]
  for kwargs, match in cases:
    with pytest.raises((ValueError, TypeError), match=match):
      hvit.Model(num_classes=10, **kwargs).spec()
  with pytest.raises(ValueError, match="multiple of the total stride 16"):
    init(_tiny("davit"), jnp.zeros((1, 24, 16, 3)))
  with pytest.raises(ValueError, match=r"images must be \[batch"):
    init(_tiny("davit"), jnp.zeros((16, 16, 3)))
  model = _tiny("twins_svt", window_size=3)  # clipped to a divisor of every stage's map
  spec = model.spec()
  assert [model._op_args(spec, 0, stage, (side, side))["window_size"]  # pylint: disable=protected-access
          for stage, side in enumerate((8, 4, 2, 1))] == [(2, 2), (2, 2), (2, 2), (1, 1)]
  with pytest.raises(ValueError, match="'window' needs queries and keys on one token grid"):
    _tiny("twins_svt", global_op="window").spec()
  with pytest.raises(ValueError, match="even head_dim"):
    init(_tiny("rmt", num_heads=(8, 2, 4, 4)))


@pytest.mark.slow
def test_tiny_config_trains_through_main(tmp_path):
  config = _config_module("hvit_digits").get_config("family=davit,runlocal")
  config.model["depths"] = (2, 1, 1, 1)
  config.input.batch_size = 16
  config.mesh, config.mesh_subset = [("data", 1)], True
  config.total_steps = 10
  config.log_every = 1
  config.ckpt_every = 10
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  main_lib.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  losses = [m["train/loss"] for m in metrics if "train/loss" in m]
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0]
