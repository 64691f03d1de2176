"""Looped Transformers as Programmable Computers: `vit.Model(loops=T)` runs its weight-tied blocks
T times (with `loop_injection`, x_t = blocks(x_{t-1} + x_0)); checked against the unrolled
formula (an untied ViT whose blocks all hold the same weights, or the block applied by hand),
forward and gradient, and its parameters do not depend on T."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn.models import vit
from big_attn.train import config_lib
from tests.test_train import ROOT, losses

VIT_DIGITS = f"{ROOT}/configs/vit_digits.py"
TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4), head_zeroinit=False)


def init(model, x, seed=1):
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def looped():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  model = vit.Model(num_classes=5, loops=3, **TINY)
  return model, x, init(model, x)


def loss(model, params, x):
  return jnp.sum(jnp.sin(model.apply({"params": params}, x)))


def test_loops_equal_an_untied_stack_of_copies_forward_and_gradient(looped):
  model, x, params = looped
  block = params["Transformer"]["encoderblock_0"]
  untied = vit.Model(num_classes=5, **dict(TINY, depth=3))
  copies = dict(params, Transformer=dict(params["Transformer"], **{
      f"encoderblock_{i}": block for i in range(3)}))
  np.testing.assert_allclose(model.apply({"params": params}, x),
                             untied.apply({"params": copies}, x), rtol=1e-5, atol=1e-6)
  grads = jax.grad(loss, argnums=1)(model, params, x)
  copy_grads = jax.grad(loss, argnums=1)(untied, copies, x)
  # The shared block's gradient is the sum of the copies' gradients (chain rule).
  summed = jax.tree.map(lambda *g: sum(g), *(copy_grads["Transformer"][f"encoderblock_{i}"]
                                             for i in range(3)))
  for g, r in zip(jax.tree.leaves(grads["Transformer"]["encoderblock_0"]),
                  jax.tree.leaves(summed)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["head"]["kernel"], copy_grads["head"]["kernel"], rtol=1e-5)


def test_input_injection_matches_the_unrolled_loop(looped):
  _, x, params = looped
  tokens = jax.random.normal(jax.random.key(3), (2, 4, 16))
  block_args = dict(num_heads=2, mlp_dim=32)
  encoder = vit.Encoder(depth=1, block_args=block_args, loops=3, loop_injection=True,
                        final_norm=False)
  enc_params = {"encoderblock_0": params["Transformer"]["encoderblock_0"]}
  block = vit.Encoder1DBlock(**block_args)

  def unrolled(p, x0):
    apply = lambda y: block.apply({"params": p["encoderblock_0"]}, y)[0]  # pylint: disable=unnecessary-lambda-assignment
    x1 = apply(x0)
    x2 = apply(x1 + x0)
    return apply(x2 + x0)

  np.testing.assert_allclose(encoder.apply({"params": enc_params}, tokens),
                             unrolled(enc_params, tokens), rtol=1e-5, atol=1e-6)
  target = lambda f: jax.grad(lambda p, t: jnp.sum(jnp.sin(f(p, t))), argnums=(0, 1))  # pylint: disable=unnecessary-lambda-assignment
  got = target(lambda p, t: encoder.apply({"params": p}, t))(enc_params, tokens)
  want = target(unrolled)(enc_params, tokens)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_parameters_independent_of_loops_and_scan(looped):
  model, x, params = looped
  count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # pylint: disable=unnecessary-lambda-assignment
  for loops in (None, 1, 7):
    other = vit.Model(num_classes=5, loops=loops, loop_injection=loops == 7, **TINY)
    assert count(init(other, x)) == count(params), loops
  # Scanned blocks (a leading layers axis) loop the same way.
  two = dict(TINY, depth=2)
  plain = vit.Model(num_classes=5, loops=2, loop_injection=True, **two)
  p = init(plain, x)
  stacked = dict(p, Transformer=dict(
      {k: v for k, v in p["Transformer"].items() if not k.startswith("encoderblock_")},
      encoderblock=jax.tree.map(lambda *v: jnp.stack(v), *(p["Transformer"][f"encoderblock_{i}"]
                                                           for i in range(2)))))
  scanned = vit.Model(num_classes=5, loops=2, loop_injection=True, scan_layers=True, **two)
  np.testing.assert_allclose(scanned.apply({"params": stacked}, x),
                             plain.apply({"params": p}, x), rtol=1e-5, atol=1e-6)


def test_bad_loops_raise(looped):
  _, x, _ = looped
  for kwargs, match in ((dict(loops=0), "loops must be an int >= 1"),
                        (dict(loop_injection=True), "loop_injection needs loops"),
                        (dict(loops=2, attention_free_layers=(0,)), "does not combine")):
    with pytest.raises(ValueError, match=match):
      vit.Model(num_classes=5, **TINY, **kwargs).init(jax.random.key(0), x)


def test_vit_digits_loops_option():
  config = config_lib.load_config_file(f"{VIT_DIGITS}:loops=4")
  assert (config.model.depth, config.model.loops, config.model.loop_injection) == (1, 4, True)
  plain = config_lib.load_config_file(VIT_DIGITS)
  assert "loops" not in plain.model  # old workdirs resume unchanged


@pytest.mark.extended
def test_vit_digits_loops_trains(tmp_path):
  config = config_lib.load_config_file(f"{VIT_DIGITS}:loops=4,runlocal")
  assert main_lib.train_and_evaluate(config, str(tmp_path))["step"] == config.total_steps
  assert np.isfinite(list(losses(str(tmp_path)).values())).all()
