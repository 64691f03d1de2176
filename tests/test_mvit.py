"""MViTv2 model family: variants, parameter counts, the pooling attention against a float64
reference, grids and ops by name, a training step, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import mvit
from big_attn.ops import spatial
from big_attn.train import config_lib
from tests import reference as ref
from tests.test_convnext import abstract, full_size_count, images, run_tiny_config
from tests.test_ops_positional import _relpos_ref
from tests.test_train import _config_module
from tests.test_vit import check_trains

# 8x8 images, a 3x3/2 embedding: grids 4x4 and 2x2 (widths 8, 16).
TINY = dict(dims=(8, 16), num_heads=(1, 2), depths=(1, 1), patch_size=3, patch_stride=2,
            patch_padding=1, stride_q=(1, 2), stride_kv=2)


def test_registry_and_decode_variant():
  assert "mvit" in models.names() and models.get("mvit") is mvit
  assert mvit.decode_variant("MViTv2-T") == dict(
      dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 5, 2), expand_attn=True)
  assert mvit.decode_variant("L") == dict(
      dims=(144, 288, 576, 1152), num_heads=(2, 4, 8, 16), depths=(2, 6, 36, 4),
      expand_attn=False)
  assert mvit.kv_strides((1, 2, 2, 2), 4) == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="T, S, B, L"):
    mvit.decode_variant("MViTv2-H")


# The paper's Table 3: MViTv2-T 24M, S 35M, B 52M, L 218M; timm's mvitv2_* (which load the
# authors' weights) count 24,173,320, 34,870,216, 51,472,744 and 217,992,952.
@pytest.mark.parametrize("variant,paper,timm", [
    ("T", 24e6, 24_173_320),
    pytest.param("S", 35e6, 34_870_216, marks=pytest.mark.extended),
    pytest.param("B", 52e6, 51_472_744, marks=pytest.mark.extended),
    pytest.param("L", 218e6, 217_992_952, marks=pytest.mark.extended)])
def test_parameter_counts_of_the_variants(variant, paper, timm):
  count = full_size_count(mvit.Model(num_classes=1000, variant=variant))
  assert abs(count - paper) / paper < 0.02 and count == timm, (variant, count)


def _pooling_attention_ref(x, p, grid, heads, stride_q, stride_kv):
  """MViTv2's pooling attention from the paper: projections, per-head 3x3 depthwise pooling
  (zero padding 1, the kernel shared by the heads) and LayerNorm, softmax attention with the
  decomposed relative positions of the pooled grids, the pooled queries added, the output
  projection."""
  b, _, _ = x.shape

  def pool(name, stride):
    t = jnp.einsum("bnd,dhk->bnhk", x, p[name]["kernel"]) + p[name]["bias"]
    d = t.shape[-1]
    img = jnp.pad(t.reshape((b,) + grid + (heads, d)), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    oh, ow = ((s - 1) // stride + 1 for s in grid)
    kernel = p[f"pool_{name[0]}"]["kernel"][:, :, 0]
    y = sum(img[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            * kernel[dy, dx] for dy in range(3) for dx in range(3))
    norm = p[f"norm_{name[0]}"]
    y = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6)
    return (y * norm["scale"] + norm["bias"]).reshape(b, oh * ow, heads, d), (oh, ow)

  (q, q_grid), (k, kv_grid), (v, _) = (pool("query", stride_q), pool("key", stride_kv),
                                       pool("value", stride_kv))
  rel = p["op_params"]
  full = np.ones((b, heads, q.shape[1], k.shape[1]), bool)
  out = _relpos_ref(q, k, v, rel["rel_h"], rel["rel_w"], q_grid, full, kv_grid) + q
  return jnp.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("grid,stride_q,stride_kv", [
    ((5, 4), 2, 1), pytest.param((4, 6), 1, 2, marks=pytest.mark.extended)])
def test_pooling_attention_matches_reference(grid, stride_q, stride_kv):
  heads, dim = 2, 8
  x = ref.normal(0, (2, grid[0] * grid[1], 6))
  layer = mvit.PoolingAttention(dim_out=dim, num_heads=heads, stride_q=stride_q,
                                stride_kv=stride_kv)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: layer.init(jax.random.key(0), x, grid)))
  leaves, tree = jax.tree.flatten(shapes["params"])
  leaves = [ref.normal(i + 1, s.shape, std=0.4) for i, s in enumerate(leaves)]
  assert shapes["params"]["pool_q"]["kernel"].shape == (3, 3, 1, dim // heads)

  def fn(x, *leaves):
    out, q_grid = layer.apply({"params": jax.tree.unflatten(tree, leaves)}, x, grid)
    assert q_grid == mvit.pooled_grid(grid, 3, stride_q)
    return out

  ref.assert_matches(fn, lambda x, *leaves: _pooling_attention_ref(
      x, jax.tree.unflatten(tree, leaves), grid, heads, stride_q, stride_kv), [x] + leaves)


def test_grids_ops_by_name_and_training_step():
  x = images(batch=3, size=8)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, mvit.PoolingAttention) and context.method_name == "__call__":
      out = next_fun(*args, **kwargs)
      seen.append((args[1], out[1], context.module.stride_kv, out[0].shape[-1]))
      return out
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    abstract(mvit.Model(num_classes=3, **TINY), x)
  # (grid in, query grid, key/value stride, width): widths double in the attention.
  assert seen == [((4, 4), (4, 4), 2, 8), ((4, 4), (2, 2), 1, 16)]
  params = check_trains(mvit.Model(num_classes=3, drop_path_rate=0.1, **TINY), x)
  block = params["stage1_block0"]
  assert block["shortcut_attn"]["kernel"].shape == (8, 16)
  assert block["attention"]["op_params"]["rel_h"].shape == (7, 8)  # 2 * max(2, 4) - 1
  # Another op by name; a 2-D op that needs one grid is refused.
  softmax = abstract(mvit.Model(num_classes=3, attention="softmax", **TINY), x)
  assert "op_params" not in softmax["stage0_block0"]["attention"]
  with pytest.raises(spatial.OpRefused, match="MViTv2.*one token grid"):
    abstract(mvit.Model(num_classes=3, attention="neighborhood", **TINY), x)
  same = dict(TINY, stride_q=(1, 1), stride_kv=1)
  abstract(mvit.Model(num_classes=3, attention="neighborhood", **same), x)


def test_widths_change_in_the_mlp_without_expand_attn():
  x = images(batch=1, size=8)
  params = abstract(mvit.Model(num_classes=3, expand_attn=False, **TINY), x)
  # The last block of a stage doubles the width in its MLP; the next stage keeps it.
  assert params["stage0_block0"]["shortcut_mlp"]["kernel"].value.shape == (8, 16)
  assert params["stage0_block0"]["MlpBlock"]["Dense_1"]["kernel"].value.shape == (32, 16)
  assert params["stage1_block0"]["attention"]["query"]["kernel"].value.shape == (16, 2, 8)
  assert params["head"]["kernel"].value.shape == (16, 3)


def test_bad_arguments():
  x = images(size=8)
  with pytest.raises(ValueError, match="depths must be 2 ints"):
    abstract(mvit.Model(num_classes=2, **dict(TINY, depths=(1, 1, 1))), x)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    abstract(mvit.Model(num_classes=2, **dict(TINY, num_heads=(3, 2))), x)
  with pytest.raises(ValueError, match="stride_kv must be a positive int"):
    abstract(mvit.Model(num_classes=2, **dict(TINY, stride_kv=0)), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(mvit.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    abstract(mvit.Model(num_classes=2, attention_args=[1], **TINY), x)
  with pytest.raises(ValueError, match="variant or explicit dims, num_heads, depths"):
    abstract(mvit.Model(num_classes=2), x)
  with pytest.raises(ValueError, match="expected the grid"):
    layer = mvit.PoolingAttention(dim_out=4, num_heads=1)
    jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 15, 4)), (4, 4)))


def test_every_config_builds():
  for name, arg in (("mvit_digits", None), ("mvit_digits", "runlocal,attention=softmax"),
                    ("mvit_i1k", None), ("mvit_i1k", "variant=MViTv2-L"),
                    ("mvit_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  model = mvit.Model(**dict(_config_module("mvit_i1k").get_config("variant=B").model.to_dict(),
                            dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 52e6) / 52e6 < 0.02
  with pytest.raises(ValueError, match="T, S, B, L"):
    _config_module("mvit_i1k").get_config("variant=H")


def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("mvit_digits", tmp_path, steps=6, dims=(8, 16, 16), depths=(1, 1, 1))
