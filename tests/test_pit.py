"""PiT model family: variants, parameter counts, the pooling layer against NumPy, stages and
2-D ops, a training step, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import pit
from big_attn.train import config_lib
from tests.model_checks import encoder_grids
from tests.test_convnext import abstract, count, full_size_count, images, run_tiny_config
from tests.test_train import _config_module
from tests.test_vit import check_affine_map, check_trains

# 8x8 images, 2x2 patches with stride 2: a 4x4 grid, pooled to 2x2 (widths 8, 16).
TINY = dict(base_dim=4, num_heads=(2, 4), depths=(1, 1), patch_size=2, patch_stride=2)


def _pool_reference(x, kernel, bias, fc_kernel, fc_bias, grid, stride=2):
  """float64 NumPy of PiT's pooling: the class token through the Dense layer; the patches
  through the depthwise convolution (kernel stride + 1, zero padding stride // 2, output
  channel o reads input channel o // multiplier), as in the paper's code."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  (h, w), (n, _, c), out_c = grid, x.shape, kernel.shape[-1]
  k, pad, mult = stride + 1, stride // 2, out_c // c
  img = np.pad(x[:, 1:].reshape(n, h, w, c), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  out = np.zeros((n, oh, ow, out_c)) + np.asarray(bias, np.float64)
  for o in range(out_c):
    for y in range(oh):
      for xx in range(ow):
        patch = img[:, y * stride:y * stride + k, xx * stride:xx * stride + k, o // mult]
        out[:, y, xx, o] += np.einsum("nij,ij->n", patch, kernel[:, :, 0, o])
  cls = x[:, :1] @ np.asarray(fc_kernel, np.float64) + np.asarray(fc_bias, np.float64)
  return np.concatenate([cls, out.reshape(n, oh * ow, out_c)], axis=1)


def test_registry_and_decode_variant():
  assert "pit" in models.names() and models.get("pit") is pit
  assert pit.decode_variant("PiT-B") == dict(base_dim=64, num_heads=(4, 8, 16),
                                             depths=(3, 6, 4), patch_size=14, patch_stride=7)
  assert pit.decode_variant("XS") == pit.decode_variant("PiT-XS")
  with pytest.raises(ValueError, match="Ti, XS, S, B"):
    pit.decode_variant("PiT-L")


def test_parameter_counts_of_the_variants():
  # The paper's Table 2: PiT-Ti 4.9M, XS 10.6M, S 23.5M, B 73.8M.
  counts = {}
  for variant, expected in {"Ti": 4.9e6, "XS": 10.6e6, "S": 23.5e6, "B": 73.8e6}.items():
    counts[variant] = full_size_count(pit.Model(num_classes=1000, variant=variant))
    assert abs(counts[variant] - expected) / expected < 0.02, (variant, counts[variant])
  assert counts["S"] == 23_461_912  # timm's pit_s_224, the authors' code


@pytest.mark.parametrize("grid", [(5, 3), pytest.param((4, 4), marks=pytest.mark.extended)])
def test_pooling_matches_numpy_forward_and_gradient(grid):
  c = 2
  x = jax.random.normal(jax.random.key(0), (2, 1 + grid[0] * grid[1], c))
  pool = pit.Pooling(features=2 * c)
  params = nn.meta.unbox(pool.init(jax.random.key(1), x, grid)["params"])
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
  assert params["conv"]["kernel"].shape == (3, 3, 1, 2 * c)
  out = pool.apply({"params": params}, x, grid)
  assert out.shape == (2, 1 + np.prod(pit.pooled_grid(grid, 2)), 2 * c)
  check_affine_map(lambda t: pool.apply({"params": params}, t, grid),
                   lambda t: _pool_reference(t, params["conv"]["kernel"],
                                             params["conv"]["bias"], params["fc"]["kernel"],
                                             params["fc"]["bias"], grid), x)
  with pytest.raises(ValueError, match="multiple of the width"):
    pit.Pooling(features=3).init(jax.random.key(0), x, grid)


def test_stages_grids_and_training_step():
  x = images(batch=3, size=8)
  assert encoder_grids(pit.Model(num_classes=3, attention="neighborhood", **TINY), x) == [
      ((17, 8), (4, 4)), ((5, 16), (2, 2))]  # a 2-D op sees each stage's grid
  params = check_trains(pit.Model(num_classes=3, head_zeroinit=False, **TINY), x)
  assert params["pool_1"]["fc"]["kernel"].shape == (8, 16)
  assert params["posemb"]["pos_embedding"].shape == (16, 8)


def test_bad_arguments():
  x = images(size=8)
  with pytest.raises(ValueError, match="one entry per stage"):
    abstract(pit.Model(num_classes=2, **dict(TINY, depths=(1, 1, 1))), x)
  with pytest.raises(ValueError, match="multiple of the previous"):
    abstract(pit.Model(num_classes=2, **dict(TINY, num_heads=(2, 3))), x)
  with pytest.raises(ValueError, match="smaller than patch_size"):
    abstract(pit.Model(num_classes=2, **dict(TINY, patch_size=16)), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(pit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="patch_stride must be a positive int"):
    abstract(pit.Model(num_classes=2, **dict(TINY, patch_stride=0)), x)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    abstract(pit.Model(num_classes=2, attention_args=[1], **TINY), x)
  with pytest.raises(ValueError, match="base_dim, num_heads, depths"):
    abstract(pit.Model(num_classes=2), x)


def test_every_config_builds():
  for name, arg in (("pit_digits", None), ("pit_digits", "runlocal"), ("pit_i1k", None),
                    ("pit_i1k", "variant=B"), ("pit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  model = pit.Model(**dict(_config_module("pit_i1k").get_config("variant=B").model.to_dict(),
                           dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 73.8e6) / 73.8e6 < 0.02
  digits = _config_module("pit_digits").get_config(None).model.to_dict()
  params = abstract(pit.Model(num_classes=10, **dict(digits, dtype=jnp.float32)),
                    jnp.zeros((1, 16, 16, 1)))
  assert params["head"]["kernel"].value.shape == (128, 10) and count(params) > 0
  with pytest.raises(ValueError, match="Ti, XS, S, B"):
    _config_module("pit_i1k").get_config("variant=L")


def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("pit_digits", tmp_path, steps=6, base_dim=8, depths=(1, 1, 1),
                  head_zeroinit=False)
