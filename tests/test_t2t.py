"""T2T-ViT model family: variants, parameter counts, the soft split against NumPy, the token
layer's formula, the token grids of 2-D ops, a training step, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import t2t
from big_attn.models import vit
from big_attn.train import config_lib
from tests.test_convnext import abstract, full_size_count, images, random_params, run_tiny_config
from tests.test_train import _config_module
from tests.test_vit import check_affine_map, check_trains

# 8x8 images: a 3x3/2 split (4x4 grid, 27 channels), a token layer of 8, a 3x3/2 split (2x2).
TINY = dict(width=16, depth=1, num_heads=2, token_dim=8, split_kernels=(3, 3),
            split_strides=(2, 2), split_paddings=(1, 1))


def _unfold_reference(x, kernel, stride, padding):
  """float64 NumPy of PyTorch's `nn.Unfold` in NHWC: `[b, patches, c·k·k]`, channel-major."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, h, w, c = x.shape
  oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
  out = np.zeros((n, oh, ow, c, kernel, kernel))
  for y in range(oh):
    for xx in range(ow):
      out[:, y, xx] = np.moveaxis(
          x[:, y * stride:y * stride + kernel, xx * stride:xx * stride + kernel], -1, 1)
  return out.reshape(n, oh * ow, c * kernel * kernel)


def _layer_norm(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_registry_and_decode_variant():
  assert "t2t" in models.names() and models.get("t2t") is t2t
  assert t2t.decode_variant("T2T-ViT-19") == dict(width=448, depth=19, num_heads=7, mlp_dim=1344)
  assert t2t.decode_variant("24") == t2t.decode_variant("T2T-ViT-24")
  with pytest.raises(ValueError, match="T2T-ViT-14, T2T-ViT-19 or T2T-ViT-24"):
    t2t.decode_variant("T2T-ViT-7")


def test_parameter_counts_of_the_variants():
  # The paper's Table 3: T2T-ViT-14 21.5M, -19 39.2M, -24 64.1M.
  for variant, expected in {"14": 21.5e6, "19": 39.2e6, "24": 64.1e6}.items():
    n = full_size_count(t2t.Model(num_classes=1000, variant=variant))
    assert abs(n - expected) / expected < 0.02, (variant, n)


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (7, 4, 2, (9, 11)), pytest.param(3, 2, 1, (5, 4), marks=pytest.mark.extended)])
def test_soft_split_matches_unfold_forward_and_gradient(kernel, stride, padding, size):
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  out, grid = t2t.soft_split(x, kernel, stride, padding)
  expected = _unfold_reference(x, kernel, stride, padding)
  assert out.shape == expected.shape and grid[0] * grid[1] == expected.shape[1]
  check_affine_map(lambda t: t2t.soft_split(t, kernel, stride, padding)[0],
                   lambda t: _unfold_reference(t, kernel, stride, padding), x)


def test_token_transformer_matches_its_formula():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5))
  layer = t2t.TokenTransformer(4)
  params = random_params(layer, x, scale=0.5)
  out = layer.apply({"params": params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  y = _layer_norm(np.asarray(x, np.float64), p["LayerNorm_0"])
  q, k, v = (y @ p[name]["kernel"][:, 0] for name in ("query", "key", "value"))
  logits = np.einsum("btd,bsd->bts", q, k) / 2.0  # 1/sqrt(4)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  h = v + (a @ v) @ p["out"]["kernel"][0] + p["out"]["bias"]
  mlp = p["MlpBlock"]
  z = _layer_norm(h, p["LayerNorm_1"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
  expected = h + _gelu(z) @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_token_grids_and_training_step():
  x = images(batch=3, size=8)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
        context.module, (t2t.TokenTransformer, vit.Encoder1DBlock)):
      module = context.module
      op_args = dict(module.op_args if isinstance(module, t2t.TokenTransformer)
                     else module.attention_args)
      seen.append((args[0].shape[1:], op_args["grid"], op_args.get("extra_tokens")))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):  # 2-D ops see the splits' grids
    abstract(t2t.Model(num_classes=3, attention="neighborhood", token_attention="window",
                       **TINY), x)
  assert seen == [((16, 27), (4, 4), None), ((5, 16), (2, 2), 1)]
  params = check_trains(t2t.Model(num_classes=3, head_zeroinit=False, **TINY), x)
  assert params["t2t_0"]["query"]["kernel"].shape == (27, 1, 8)
  assert params["project"]["kernel"].shape == (72, 16)


def test_bad_arguments():
  x = images(size=8)
  with pytest.raises(ValueError, match="one entry per soft split"):
    abstract(t2t.Model(num_classes=2, **dict(TINY, split_strides=(2,))), x)
  with pytest.raises(ValueError, match="does not fit"):
    abstract(t2t.Model(num_classes=2, **dict(TINY, split_kernels=(3, 7), split_paddings=(0, 0))),
             x)
  with pytest.raises(ValueError, match="split_paddings must be ints >= 0"):
    abstract(t2t.Model(num_classes=2, **dict(TINY, split_paddings=(1, -1))), x)
  with pytest.raises(ValueError, match="token_dim must be a positive int"):
    abstract(t2t.Model(num_classes=2, **dict(TINY, token_dim=0)), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(t2t.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(TypeError, match="token_attention_args must be a dict"):
    abstract(t2t.Model(num_classes=2, token_attention_args=[1], **TINY), x)
  with pytest.raises(KeyError, match="no_such_op"):
    abstract(t2t.Model(num_classes=2, token_attention="no_such_op", **TINY), x)
  with pytest.raises(ValueError, match="width, depth, num_heads"):
    abstract(t2t.Model(num_classes=2), x)


def test_every_config_builds():
  for name, arg in (("t2t_digits", None), ("t2t_digits", "runlocal,token_attention=performer"),
                    ("t2t_i1k", None), ("t2t_i1k", "variant=24,token_attention=softmax"),
                    ("t2t_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  model = t2t.Model(**dict(_config_module("t2t_i1k").get_config(None).model.to_dict(),
                           dtype=jnp.bfloat16))
  assert model.token_attention == "performer"
  assert abs(full_size_count(model) - 21.5e6) / 21.5e6 < 0.02
  digits = _config_module("t2t_digits").get_config(None).model.to_dict()
  params = abstract(t2t.Model(num_classes=10, **dict(digits, dtype=jnp.float32)),
                    jnp.zeros((1, 16, 16, 1)))
  assert params["head"]["kernel"].value.shape == (64, 10)
  with pytest.raises(ValueError, match="T2T-ViT-14"):
    _config_module("t2t_i1k").get_config("variant=12")


@pytest.mark.extended
@pytest.mark.parametrize("name,arg,steps,model", [
    ("t2t_digits", "runlocal", 10,
     dict(width=16, depth=1, num_heads=2, mlp_dim=32, token_dim=8)),
    ("vit_digits", "runlocal,family=convit", 6, dict(width=16, num_heads=2, mlp_dim=32)),
    ("vit_digits", "runlocal,family=cpvt", 6, dict(width=16, depth=2, num_heads=2, mlp_dim=32)),
])
def test_new_digits_configs_train_through_main(tmp_path, name, arg, steps, model):
  run_tiny_config(name, tmp_path, steps=steps, arg=arg, head_zeroinit=False, **model)
