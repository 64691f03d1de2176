"""ViT model family: variants, pooling, registers, ops by name, remat, scan, bf16, counts."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_attn import models
from big_attn.layers import Attention, posemb_sincos_2d
from big_attn.models import vit
from tests import reference as ref

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "patch_h", "patch_w",
                 "channels_in", "position", "classes", "layers", None}


def _images(batch=2, size=16, channels=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _abstract(model, images):
  """Boxed parameter shapes (jax.eval_shape: traced, never compiled or allocated)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


def _init(model, images, seed=1):
  """Random parameters of the right shapes, filled by NumPy (fast: no init is compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                      nn.meta.unbox(_abstract(model, images)))


def _remats(jaxpr: str) -> int:
  return sum(len(re.findall(pattern, jaxpr)) for pattern in (r"\bremat2?\[", r"\bcheckpoint\["))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_count(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return _count(nn.meta.unbox(shapes))


def test_registry():
  assert "vit" in models.names()
  assert models.get("vit") is vit
  with pytest.raises(KeyError, match="vit"):
    models.get("no_such_model")


def test_decode_variant():
  assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                            patch_size=(16, 16))
  assert vit.decode_variant("G/14") == dict(width=1664, depth=48, mlp_dim=8192, num_heads=16,
                                            patch_size=(14, 14))
  assert vit.decode_variant("g/14")["width"] == 1408 and vit.decode_variant("g")["depth"] == 40
  assert "patch_size" not in vit.decode_variant("L")
  for bad in ("X/16", "B/", "B16", "", None):
    with pytest.raises(ValueError, match="Ti, S"):
      vit.decode_variant(bad)


def test_parameter_counts():
  # Scaling Vision Transformers: ViT-G/14 has 1,843M parameters; big_vision's ViT-B/16 86.6M.
  g = _abstract_count(vit.Model(num_classes=1000, variant="G/14", scan_layers=True), 224)
  assert abs(g - 1.843e9) / 1.843e9 < 0.02, g
  b = _abstract_count(vit.Model(num_classes=1000, variant="B/16", pool_type="cls",
                                scan_layers=True), 224)
  assert abs(b - 86.6e6) / 86.6e6 < 0.005, b


def test_tiny_parameter_count_formula():
  d, m, depth, classes, p, c, n, regs = 32, 64, 2, 10, 4, 3, 16, 3
  model = vit.Model(num_classes=classes, pool_type="cls", num_registers=regs, **TINY)
  block = 4 * (d * d + d) + (2 * d * m + m + d) + 4 * d
  expected = (p * p * c * d + d) + n * d + d + regs * d + depth * block + 2 * d + d * classes
  expected += classes
  assert _abstract_count(model, 16) == expected


@pytest.mark.parametrize("pool_type", ["gap", "cls", "tok", "map"])
def test_forward_pool_types(pool_type):
  model = vit.Model(num_classes=10, pool_type=pool_type, head_zeroinit=False, **TINY)
  x = _images()
  params = _init(model, x)
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.abs(logits).max() > 0
  assert ("cls" in params) == (pool_type in ("cls", "tok"))
  assert ("MAPHead" in params) == (pool_type == "map")
  pre = vit.Model(num_classes=0, pool_type=pool_type, **TINY).apply({"params": params}, x)
  assert pre.shape == (2, 32)
  np.testing.assert_allclose(pre @ params["head"]["kernel"] + params["head"]["bias"], logits,
                             rtol=1e-5, atol=1e-5)


def test_head_zeroinit_and_examples_independent():
  model = vit.Model(num_classes=10, **dict(TINY, depth=1))
  x = _images(batch=3)
  params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
  np.testing.assert_array_equal(model.apply({"params": params}, x), 0.0)
  np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["scale"], 1.0)
  pre = vit.Model(num_classes=0, **dict(TINY, depth=1))
  full = pre.apply({"params": params}, x)
  np.testing.assert_allclose(pre.apply({"params": params}, x[1:2]), full[1:2], atol=1e-5)


def test_registers_take_part_and_are_discarded():
  model = vit.Model(num_classes=0, num_registers=4, **TINY)
  x = _images()
  params = _init(model, x)
  assert params["registers"].shape == (4, 32)
  out = model.apply({"params": params}, x)
  assert out.shape == (2, 32)
  # New register values (a permutation, shift or scale would not show: attention is
  # permutation-invariant over keys and LayerNorm removes shifts and scales).
  moved = dict(params, registers=jnp.asarray(np.random.default_rng(5).normal(size=(4, 32)),
                                             jnp.float32))
  assert np.abs(model.apply({"params": moved}, x) - out).max() > 1e-4
  without = {k: v for k, v in params.items() if k != "registers"}
  plain = vit.Model(num_classes=0, **TINY).apply({"params": without}, x)
  assert np.abs(plain - out).max() > 1e-4


def test_sincos_posemb():
  model = vit.Model(num_classes=0, posemb="sincos2d", **TINY)
  x = _images()
  params = _init(model, x)
  assert "posemb" not in params and "posemb" in _init(vit.Model(num_classes=0, **TINY), x)
  h, w, width = 3, 5, 8
  pe = np.asarray(posemb_sincos_2d(h, w, width))
  omega = 1.0 / 10_000 ** (np.arange(2) / 1.0)
  for t in range(h * w):
    y, xx = divmod(t, w)
    want = np.concatenate([np.sin(xx * omega), np.cos(xx * omega), np.sin(y * omega),
                           np.cos(y * omega)])
    np.testing.assert_allclose(pe[t], want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    posemb_sincos_2d(2, 2, 6)


def test_attention_op_by_name_and_args():
  x = _images()
  softmax = vit.Model(num_classes=0, **TINY)
  params = _init(softmax, x)
  out = softmax.apply({"params": params}, x)
  sigmoid = vit.Model(num_classes=0, attention="sigmoid", **TINY)
  out_sigmoid = sigmoid.apply({"params": params}, x)
  assert np.all(np.isfinite(out_sigmoid)) and np.abs(out_sigmoid - out).max() > 1e-4
  biased = vit.Model(num_classes=0, attention="sigmoid", attention_args={"logit_bias": 0.0},
                     **TINY)
  assert np.abs(biased.apply({"params": params}, x) - out_sigmoid).max() > 1e-4
  capped = vit.Model(num_classes=0, attention_args={"logits_soft_cap": 1e-3}, **TINY)
  assert np.abs(capped.apply({"params": params}, x) - out).max() > 1e-4
  with pytest.raises(KeyError, match="softmax"):
    vit.Model(num_classes=0, attention="no_such_op", **TINY).apply({"params": params}, x)


def test_gqa_and_qk_norm():
  x = _images()
  model = vit.Model(num_classes=5, num_kv_heads=2, qk_norm=True, **TINY)
  params = _init(model, x)
  attn = params["Transformer"]["encoderblock_0"]["MultiHeadAttention"]
  assert attn["key"]["kernel"].shape == (32, 2, 8) and "query_norm" in attn
  assert model.apply({"params": params}, x).shape == (2, 5)


def test_logical_axis_names():
  x = _images()
  boxed = _abstract(vit.Model(num_classes=10, pool_type="map", num_registers=2,
                             scan_layers=True, **TINY), x)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim, leaf.names
  block = boxed["Transformer"]["encoderblock"]["MlpBlock"]["Dense_0"]["kernel"]
  assert block.names == ("layers", "embed", "mlp") and block.value.shape == (2, 32, 64)


def test_scan_matches_loop_and_remat_matches():
  x = _images()
  loop = vit.Model(num_classes=0, **TINY)
  params = _init(loop, x)
  out = loop.apply({"params": params}, x)
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(2)]
  scanned = dict(params, Transformer=dict(params["Transformer"],
                                          encoderblock=jax.tree.map(lambda *v: jnp.stack(v),
                                                                    *blocks)))
  for i, b in enumerate(blocks):
    params["Transformer"][f"encoderblock_{i}"] = b
  scan = vit.Model(num_classes=0, scan_layers=True, **TINY)
  np.testing.assert_allclose(scan.apply({"params": scanned}, x), out, rtol=1e-5, atol=1e-5)

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, x) ** 2)

  for policy in ("nothing_saveable", "dots_saveable"):
    remat = vit.Model(num_classes=0, remat_policy=policy, **TINY)
    np.testing.assert_allclose(remat.apply({"params": params}, x), out, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, m=remat: loss(m, p)))(params))
    assert _remats(jaxpr) == 2, policy  # one per block (the primitive is remat2/checkpoint)
  assert _remats(str(jax.make_jaxpr(jax.grad(lambda p: loss(loop, p)))(params))) == 0
  remat_scan = vit.Model(num_classes=0, remat_policy="nothing_saveable", scan_layers=True,
                         **TINY)
  np.testing.assert_allclose(remat_scan.apply({"params": scanned}, x), out, rtol=1e-5,
                             atol=1e-5)


def test_bf16_compute():
  x = _images()
  f32 = vit.Model(num_classes=0, **TINY)
  params = _init(f32, x)
  bf16 = vit.Model(num_classes=0, dtype=jnp.bfloat16, **TINY)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.meta.unbox(_abstract(bf16, x))))
  out = bf16.apply({"params": params}, x)
  assert out.dtype == jnp.float32
  ref = f32.apply({"params": params}, x)
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 0.05


def test_dropout_uses_rng_in_train_only():
  x = _images()
  model = vit.Model(num_classes=0, dropout=0.5, **TINY)
  params = _init(model, x)
  np.testing.assert_array_equal(model.apply({"params": params}, x),
                                model.apply({"params": params}, x))
  a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
  b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(a - b).max() > 1e-4


def test_training_steps_change_params_and_lower_loss():
  x = _images(batch=4)
  labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
  model = vit.Model(num_classes=3, pool_type="cls", num_registers=2, **TINY)
  params = _init(model, x)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return optax.softmax_cross_entropy(model.apply({"params": p}, x), labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  new, losses = params, []
  for _ in range(5):
    new, opt_state, loss = step(new, opt_state)
    losses.append(float(loss))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
  assert all(jax.tree.leaves(changed)), changed
  assert losses[-1] < losses[0]


def test_bad_arguments():
  x = _images()
  with pytest.raises(ValueError, match="divisible by patch_size"):
    _abstract(vit.Model(num_classes=2, **TINY), _images(size=18))
  with pytest.raises(ValueError, match="pool_type"):
    _abstract(vit.Model(num_classes=2, pool_type="max", **TINY), x)
  with pytest.raises(ValueError, match="remat_policy"):
    _abstract(vit.Model(num_classes=2, remat_policy="some", **TINY), x)
  with pytest.raises(ValueError, match="width, depth"):
    _abstract(vit.Model(num_classes=2, num_heads=2), x)
  with pytest.raises(ValueError, match="images must be"):
    _abstract(vit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="posemb|position embedding"):
    _abstract(vit.Model(num_classes=2, posemb="rope", **TINY), x)
  explicit = vit.Model(num_classes=2, variant="B/16", depth=1, width=64, num_heads=2,
                       patch_size=8)
  # The variant's sizes fill the fields left at None when the model is built.
  assert (explicit.width, explicit.depth, explicit.mlp_dim, explicit.num_heads,
          explicit.patch_size) == (64, 1, 3072, 2, (8, 8))


# ---------------------------------------------------------------------------- ConViT and CPVT
def forward_and_step(model, x, labels, lr=1e-2):
  """One compile: the training forward's logits, the loss and the parameters after one Adam
  step. Returns (params, logits, loss, new params)."""
  params = _init(model, x, seed=2)
  tx = optax.adam(lr)

  def loss_fn(p):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
    return optax.softmax_cross_entropy(logits, labels).mean(), logits

  @jax.jit
  def run(p):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    new = optax.apply_updates(p, tx.update(grads, tx.init(p))[0])
    return logits, loss, new

  return (params, *run(params))


def check_trains(model, x, classes=3):
  """Forward and one training step of `model` on `x` (one compile): finite logits of the right
  shape and loss, every parameter updated (a gradient reaches each). Returns the parameters."""
  labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % classes, classes)
  params, logits, loss, new = forward_and_step(model, x, labels)
  assert logits.shape == (x.shape[0], classes) and np.all(np.isfinite(logits))
  assert np.isfinite(loss) and loss > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
  assert all(jax.tree.leaves(changed)), changed
  return params


def check_affine_map(fn, reference, x, tol=1e-5):
  """`fn` (JAX) against its float64 NumPy `reference` at `x`, forward and gradient, for a map
  that is affine in `x` (a convolution and its bias): the gradient of `<g, fn(x)>` is the
  transposed Jacobian, built from the reference on unit vectors, times `g`."""
  np.testing.assert_allclose(fn(x), reference(np.asarray(x, np.float64)), rtol=tol, atol=tol)
  out = reference(np.zeros(x.shape))
  g = np.asarray(jax.random.normal(jax.random.key(1), out.shape), np.float64)
  grad = jax.grad(lambda t: jnp.sum(fn(t) * g))(x)
  eye = np.eye(x.size).reshape((x.size,) + x.shape)
  jac = np.stack([(reference(e) - out).ravel() for e in eye])  # [inputs, outputs]
  np.testing.assert_allclose(grad, (jac @ g.ravel()).reshape(x.shape), rtol=tol, atol=tol)


def _peg_reference(x, kernel, bias, grid, start):
  """float64 NumPy: x with its h·w tokens from `start` on, as an image, plus their depthwise
  3x3 zero-padded convolution (cross-correlation, as Flax and PyTorch) with bias."""
  x = np.asarray(x, np.float64)
  h, w = grid
  n, _, d = x.shape
  img = np.pad(x[:, start:start + h * w].reshape(n, h, w, d), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros((n, h, w, d)) + np.asarray(bias, np.float64)
  for dy in range(3):
    for dx in range(3):
      conv += img[:, dy:dy + h, dx:dx + w] * np.asarray(kernel, np.float64)[dy, dx, 0]
  out = x.copy()
  out[:, start:start + h * w] += conv.reshape(n, h * w, d)
  return out


def test_family_variants_and_parameter_counts():
  assert vit.decode_variant("ConViT-S/16") == dict(
      width=432, depth=12, mlp_dim=1728, num_heads=9, local_layers=10, pool_type="cls",
      patch_size=(16, 16))
  assert vit.decode_variant("CPVT-Ti") == dict(width=192, depth=12, mlp_dim=768, num_heads=3,
                                               posemb="peg", pool_type="gap")
  for bad in ("ConViT-L/16", "Swin-B/16", "-B/16"):
    with pytest.raises(ValueError, match="ConViT sizes Ti, S, B"):
      vit.decode_variant(bad)
  # The family's options fill the fields left at their defaults; others override them.
  model = vit.Model(num_classes=10, variant="ConViT-Ti/16", pool_type="map")
  assert (model.pool_type, model.local_layers, model.posemb) == ("map", 10, "learn")
  model = vit.Model(num_classes=10, variant="CPVT-Ti/16", local_layers=2)
  assert (model.pool_type, model.local_layers, model.posemb) == ("gap", 2, "peg")
  assert model.clone() == model
  # ConViT's Table 1 prints 6M, 27M, 86M; the authors' code (timm's convit_tiny/small/base)
  # counts 5,710,512, 27,777,322, 86,540,040. CPVT's GAP variants: 5.7M, 22M, 86M.
  expected = {"ConViT-Ti/16": 5_710_512, "ConViT-S/16": 27_777_322,
              "ConViT-B/16": 86_540_040, "CPVT-Ti/16": 5.7e6, "CPVT-S/16": 22e6,
              "CPVT-B/16": 86e6}
  for variant, n in expected.items():
    count = _abstract_count(vit.Model(num_classes=1000, variant=variant), 224)
    assert abs(count - n) / n < 0.02, (variant, count)


def test_peg_matches_numpy_forward_and_gradient():
  grid, start, d = (3, 4), 1, 2
  x = jax.random.normal(jax.random.key(0), (2, start + 12 + 2, d))  # class, patches, registers
  peg = vit.PEG(grid=grid, start=start)
  params = _init(peg, x)
  kernel, bias = params["proj"]["kernel"], params["proj"]["bias"]
  assert kernel.shape == (3, 3, 1, d)
  check_affine_map(lambda t: peg.apply({"params": params}, t),
                   lambda t: _peg_reference(t, kernel, bias, grid, start), x)
  with pytest.raises(ValueError, match="do not fit"):
    vit.PEG(grid=(4, 4), start=1).init(jax.random.key(0), x)


def _block_inputs(model, x):
  """(op, token count) of every encoder block's call, traced only (`jax.eval_shape`)."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Encoder1DBlock) and context.method_name == "__call__":
      seen.append((context.module.attention, args[0].shape[1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  return seen


def test_convit_class_token_joins_after_the_gpsa_blocks_and_trains():
  x = _images(batch=3, size=8)
  tiny = dict(width=16, depth=2, num_heads=4, mlp_dim=16, patch_size=4)
  model = vit.Model(num_classes=3, local_layers=1, pool_type="cls", **tiny)
  assert _block_inputs(model.clone(depth=3, local_layers=2), x) == [
      ("gpsa", 4), ("gpsa", 4), ("softmax", 5)]
  assert _block_inputs(model.clone(num_registers=2), x) == [("gpsa", 6), ("softmax", 7)]
  params = check_trains(model, x)
  gpsa = params["Transformer"]["encoderblock_0"]["MultiHeadAttention"]["op_params"]
  assert gpsa["pos_proj"].shape == (4, 3) and gpsa["gating"].shape == (4,)
  assert "op_params" not in params["Transformer"]["encoderblock_1"]["MultiHeadAttention"]


def test_cpvt_peg_after_the_first_block_and_trains():
  x = _images(batch=3, size=8)
  model = vit.Model(num_classes=3, posemb="peg", **dict(TINY, depth=1, width=16, mlp_dim=16))
  params = check_trains(model, x)
  assert "posemb" not in params
  assert set(params["Transformer"]) == {"encoderblock_0", "peg", "encoder_norm"}
  # The PEG reads the first block's output on the patch grid.
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, vit.Encoder1DBlock):
      seen.setdefault("block", out[0])
    if context.method_name == "__call__" and isinstance(context.module, vit.PEG):
      seen["peg"] = (args[0], context.module.grid)
    return out

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, x)
  np.testing.assert_array_equal(seen["peg"][0], seen["block"])
  assert seen["peg"][1] == (2, 2)


def test_convit_and_cpvt_bad_arguments():
  x = _images(size=8)
  with pytest.raises(ValueError, match="local_layers must be an int in \\[0, depth=2\\]"):
    _abstract(vit.Model(num_classes=2, local_layers=3, **TINY), x)
  with pytest.raises(ValueError, match="scan_layers=False"):
    _abstract(vit.Model(num_classes=2, posemb="peg", scan_layers=True, **TINY), x)
  with pytest.raises(ValueError, match="scan_layers=False"):
    _abstract(vit.Model(num_classes=2, local_layers=1, scan_layers=True, **TINY), x)
  with pytest.raises(ValueError, match="does not combine with local_layers"):
    _abstract(vit.Model(num_classes=2, local_layers=1, pool_type="cls",
                        token_reduction={"method": "tome"}, **TINY), x)
  with pytest.raises(ValueError, match="unknown posemb"):
    _abstract(vit.Model(num_classes=2, posemb="peg2", **TINY), x)
  with pytest.raises(KeyError, match="no_such_op"):
    _abstract(vit.Model(num_classes=2, local_layers=1, local_attention="no_such_op", **TINY), x)
  # Relevance propagation recomputes softmax blocks only: it refuses GPSA blocks and a PEG.
  from big_attn.interpret import lrp  # pylint: disable=g-import-not-at-top
  assert "local_layers" in lrp.unsupported(vit.Model(num_classes=2, local_layers=1, **TINY))
  assert "model.posemb" in lrp.unsupported(vit.Model(num_classes=2, posemb="peg", **TINY))


def test_family_configs_build():
  from big_attn import main as main_lib  # pylint: disable=g-import-not-at-top
  from tests.test_train import _config_module  # pylint: disable=g-import-not-at-top
  digits = _config_module("vit_digits")
  for arg, fields in (("family=convit", dict(local_layers=2, pool_type="cls")),
                      ("runlocal,family=cpvt", dict(posemb="peg", pool_type="gap"))):
    config = digits.get_config(arg)
    main_lib.check_config(config)
    assert {k: config.model[k] for k in fields} == fields
  assert "family=convit" in digits.__doc__
  config = _config_module("vit_i1k").get_config("variant=ConViT-S/16")
  main_lib.check_config(config)
  model = vit.Model(**dict(config.model.to_dict(), dtype=jnp.bfloat16))
  assert (model.local_layers, model.pool_type, model.scan_layers) == (10, "cls", False)
  assert _abstract(model, jnp.zeros((1, 32, 32, 3)))["head"]["kernel"].value.shape == (
      432, 1000)
  with pytest.raises(ValueError, match="unknown family 'swin'"):
    digits.get_config("family=swin")


def _tap_numpy(x, p, scales, grid, start):
  """Token-aware average pooling in float64 NumPy from Robustifying Token Attention's formula."""
  (h, w), (n, tokens, d) = grid, x.shape
  patches = x[:, start:start + h * w].reshape(n, h, w, d)

  def conv3x3(y, kernel, dilation=1):  # SAME zero padding
    padded = np.pad(y, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
    out = 0.0
    for i in range(3):
      for j in range(3):
        window = padded[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
        out = out + np.einsum("bhwc,co->bhwo", window, kernel[i, j])
    return out

  logits = conv3x3(conv3x3(patches, p["predictor_0"]), p["predictor_1"])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  mixed = weights[..., :1] * patches
  for k in range(1, scales):
    pooled = conv3x3(patches, np.eye(d)[None, None].repeat(3, 0).repeat(3, 1) / 9.0, k)
    mixed = mixed + weights[..., k:k + 1] * pooled
  return np.concatenate([x[:, :start], mixed.reshape(n, h * w, d), x[:, start + h * w:]], 1)


def test_token_aware_pooling_matches_numpy_and_runs_in_a_vit():
  scales, grid, start = 3, (3, 4), 1
  tap = vit.TokenAwarePooling(grid=grid, start=start, scales=scales)
  x = np.random.default_rng(0).normal(size=(2, 14, 5))  # class token, 12 patches, one more
  variables = tap.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in nn.unbox(variables)["params"].items()}
  got = tap.apply(variables, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, _tap_numpy(x, p, scales, grid, start), rtol=1e-5, atol=1e-5)

  # Gradient of <TAP(x), r> in the predictor weights, along a random direction.
  r = np.random.default_rng(1).normal(size=x.shape)
  direction = {k: np.random.default_rng(2 + i).normal(size=v.shape)
               for i, (k, v) in enumerate(sorted(p.items()))}
  objective = lambda params: jnp.sum(tap.apply(
      {"params": {k: {"kernel": v} for k, v in params.items()}}, jnp.asarray(x, jnp.float32))
      * r)
  grads = jax.grad(objective)({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})
  eps = 1e-6
  shifted = lambda s: {k: p[k] + s * direction[k] for k in p}
  numeric = ((_tap_numpy(x, shifted(eps), scales, grid, start)
              - _tap_numpy(x, shifted(-eps), scales, grid, start)) * r).sum() / (2 * eps)
  analytic = sum(float(np.sum(np.asarray(grads[k], np.float64) * direction[k])) for k in p)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-4)

  model = vit.Model(num_classes=10, pool_type="cls", token_pooling_scales=2, **TINY)
  images = jnp.ones((2, 16, 16, 1))
  params = model.init(jax.random.key(0), images)["params"]
  assert set(params["Transformer"]["encoderblock_1"]["token_pooling"]) == {"predictor_0",
                                                                           "predictor_1"}
  assert model.apply({"params": params}, images).shape == (2, 10)
  with pytest.raises(ValueError, match="scales must be an int >= 2"):
    vit.TokenAwarePooling(grid=grid, scales=1).init(jax.random.key(0), jnp.zeros((1, 12, 5)))
  with pytest.raises(ValueError, match="token_pooling_scales pools the patch grid"):
    vit.Model(num_classes=10, num_registers=2, token_pooling_scales=2, **TINY).init(
        jax.random.key(0), images)


def _mha_reference(x, p):
  """Σ_h softmax(q_h k_hᵀ / √d_h) v_h W_o,h + b_o, with q_h = x W_q,h + b_q,h (and k, v), and
  the per-head logits q_h k_hᵀ."""
  proj = lambda name: jnp.einsum("btd,dhk->bthk", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  out = ref.softmax_attention(q, k, v)
  return (jnp.einsum("bthk,hkd->btd", out, p["out"]["kernel"]) + p["out"]["bias"],
          jnp.einsum("bthk,bshk->bhts", q, k))


def test_head_dim_of_the_sequence_length_lifts_the_low_rank_bottleneck():
  """Low-Rank Bottleneck in Multi-head Attention Models: with head size d/h < n a head's n×n
  logits have rank d/h at most; with head size n (`head_dim="tokens"`) they have full rank n,
  with the same 2 heads. The blocks' attention matches the formula, forward and gradient."""
  images = _images(size=6)  # 3x3 patches of 2x2: n = 9 tokens, width 16, 2 heads: d/h = 8
  tiny = dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=2)
  for head_dim, pool_type, n in ((None, "gap", 8), ("tokens", "gap", 9), ("tokens", "cls", 10)):
    model = vit.Model(num_classes=0, head_dim=head_dim, pool_type=pool_type, **tiny)
    params = _init(model, images)
    attn = params["Transformer"]["encoderblock_0"]["MultiHeadAttention"]
    assert attn["query"]["kernel"].shape == (16, 2, n)
    assert np.all(np.isfinite(model.apply({"params": params}, images)))
  x = ref.normal(0, (2, 9, 16))
  for head_dim, rank in ((None, 8), (9, 9)):
    layer = Attention(num_heads=2, head_dim=head_dim, use_bias=True)
    params = _init(layer, x)
    with ref.x64():
      logits = _mha_reference(ref.f64(x), jax.tree.map(ref.f64, params))[1]
    assert [np.linalg.matrix_rank(np.asarray(logits[0, h]), tol=1e-6)
            for h in range(2)] == [rank, rank]
  leaves, tree = jax.tree.flatten(params)
  ref.assert_matches(lambda x, *l: layer.apply({"params": jax.tree.unflatten(tree, l)}, x),
                     lambda x, *l: _mha_reference(x, jax.tree.unflatten(tree, l))[0],
                     [x, *leaves], tol=dict(rtol=2e-4, atol=2e-4))
  with pytest.raises(ValueError, match="head_dim must be None, a positive int or 'tokens'"):
    vit.Model(num_classes=0, head_dim="n", **tiny).init(jax.random.key(0), images)


def test_vit_digits_head_dim_and_parallel_block_args():
  from tests.test_train import _config_module  # pylint: disable=g-import-not-at-top
  digits = _config_module("vit_digits")
  assert digits.get_config("head_dim=tokens").model.head_dim == "tokens"
  assert digits.get_config("head_dim=32").model.head_dim == 32
  assert "head_dim" not in digits.get_config().model
  assert digits.get_config("parallel_block").model.parallel_block
  with pytest.raises(ValueError, match="config arg head_dim"):
    digits.get_config("head_dim=n")


def test_parallel_block_matches_the_paf_formula_forward_and_gradient():
  """PAF: x + Attn(LN(x)) + MLP(LN(x)) with one LayerNorm, against float64 plain JAX."""
  block = vit.Encoder1DBlock(num_heads=2, mlp_dim=16, parallel=True)
  x = ref.normal(0, (2, 5, 8))
  params = _init(block, x)
  assert set(params) == {"LayerNorm_0", "MultiHeadAttention", "MlpBlock"}
  leaves, tree = jax.tree.flatten(params)

  def formula(x, *leaves):
    p = jax.tree.unflatten(tree, leaves)
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p[
        "LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
    h = y @ p["MlpBlock"]["Dense_0"]["kernel"] + p["MlpBlock"]["Dense_0"]["bias"]
    h = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    mlp = h @ p["MlpBlock"]["Dense_1"]["kernel"] + p["MlpBlock"]["Dense_1"]["bias"]
    return x + _mha_reference(y, p["MultiHeadAttention"])[0] + mlp
  ref.assert_matches(lambda x, *l: block.apply({"params": jax.tree.unflatten(tree, l)}, x)[0],
                     formula, [x, *leaves], tol=dict(rtol=2e-4, atol=2e-4))
  images = _images(size=8)
  model = vit.Model(num_classes=3, parallel_block=True, attention_free_layers=(1,), **TINY)
  params = _init(model, images)
  assert "LayerNorm_1" not in params["Transformer"]["encoderblock_0"]
  assert "LayerNorm_1" in params["Transformer"]["encoderblock_1"]  # an MLP-only block
  assert np.all(np.isfinite(model.apply({"params": params}, images)))
  with pytest.raises(ValueError, match="parallel_block .* does not combine with token_reduction"):
    vit.Model(num_classes=3, parallel_block=True, token_reduction={"method": "tome"},
              **TINY).init(jax.random.key(0), images)
