"""CvT model family: variants, parameter counts, the convolutional projection against a float64
reference, ops by name, training, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import cvt
from big_attn.train import config_lib
from tests.test_convnext import (abstract, count, full_size_count, images, init_batch_stats,
                                 random_params, run_tiny_config, train_steps)
from tests.test_train import _config_module

# Three stages on 16x16 images: 3x3/2 token embeddings -> 8x8, 4x4, 2x2 maps.
TINY = dict(dims=(8, 16, 16), num_heads=(1, 2, 2), depths=(1, 1, 2), patch_size=(3, 3, 3),
            patch_stride=(2, 2, 2), patch_padding=(1, 1, 1))
# Two stages (8x8, 4x4 token maps): the cheapest model with a stage before the class token's.
TWO_STAGES = dict(dims=(8, 16), num_heads=(1, 2), depths=(1, 1), patch_size=(3, 3),
                  patch_stride=(2, 2), patch_padding=(1, 1))
LOGICAL_NAMES = {"conv_height", "conv_width", "channels_in", "embed", "heads", "head_dim", "mlp",
                 "norm", "classes", None}


def test_registry_and_decode_variant():
  assert "cvt" in models.names() and models.get("cvt") is cvt
  assert cvt.decode_variant("CvT-13") == dict(dims=(64, 192, 384), num_heads=(1, 3, 6),
                                              depths=(1, 2, 10))
  assert cvt.decode_variant("21") == dict(dims=(64, 192, 384), num_heads=(1, 3, 6),
                                          depths=(1, 4, 16))
  assert cvt.decode_variant("CvT-W24")["dims"] == (192, 768, 1024)
  for bad in ("CvT-24", "cvt-13", "", None, 13):
    with pytest.raises(ValueError, match="CvT-13, CvT-21 or CvT-W24"):
      cvt.decode_variant(bad)


def test_parameter_counts_of_the_variants():
  # CvT paper, Table 2 (architectures for ImageNet): CvT-13 20M, CvT-21 32M, CvT-W24 277M.
  paper = {"CvT-13": 20e6, "CvT-21": 32e6, "CvT-W24": 277e6}
  for variant, expected in paper.items():
    n = full_size_count(cvt.Model(num_classes=1000, variant=variant))
    assert abs(n - expected) / expected < 0.02, (variant, n)
  assert full_size_count(cvt.Model(num_classes=1000, variant="CvT-13")) == 19_997_480


def test_structure_and_logical_names():
  params = abstract(cvt.Model(num_classes=10, **TINY), images(size=16))
  names = {n for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
           for n in leaf.names}
  assert names <= LOGICAL_NAMES, names
  # No position embedding; a class token in the last stage only.
  assert not any("pos" in k for k in params)
  assert params["cls"].value.shape == (1, 16)
  assert params["stage_0_embed"]["kernel"].value.shape == (3, 3, 3, 8)
  attn = params["stage_2_block_1"]["attention"]
  assert attn["conv_proj_k"]["kernel"].value.shape == (3, 3, 1, 16)
  assert "bias" not in attn["conv_proj_k"]
  assert attn["query"]["kernel"].value.shape == (16, 2, 8)
  d, classes = 16, 10
  block = lambda d: 4 * d + 3 * (9 * d + 2 * d) + 4 * (d * d + d) + 8 * d * d + 5 * d
  expected = ((27 * 8 + 8 + 2 * 8) + block(8)
              + (9 * 8 * 16 + 16 + 2 * 16) + block(16)
              + (9 * 16 * 16 + 16 + 2 * 16) + d + 2 * block(16)
              + 2 * d + d * classes + classes)
  assert count(params) == expected


def _reference_attention(p, x, grid, heads, num_prefix, stride_kv, stats=None, scale_dim=None):
  """CvT's convolutional projection and softmax attention in float64 NumPy, from the paper
  (BatchNorm with running statistics `stats`, or LayerNorm without; logits over
  sqrt(`scale_dim`), the head dimension by default)."""
  b, _, d = x.shape
  h, w = grid
  prefix, fmap = x[:, :num_prefix], x[:, num_prefix:].reshape(b, h, w, d)

  def conv_proj(name, stride):
    k = p[f"conv_proj_{name}"]["kernel"][:, :, 0]
    padded = np.pad(fmap, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    y = np.zeros((b, oh, ow, d))
    for i in range(oh):
      for j in range(ow):
        y[:, i, j] = np.einsum("bxyc,xyc->bc",
                               padded[:, i * stride:i * stride + 3, j * stride:j * stride + 3], k)
    norm = p[f"conv_proj_{name}_norm"]
    if stats is None:
      y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
    else:
      running = stats[f"conv_proj_{name}_norm"]
      y = (y - running["mean"]) / np.sqrt(running["var"] + 1e-5)
    y = y * norm["scale"] + norm["bias"]
    tokens = np.concatenate([prefix, y.reshape(b, oh * ow, d)], axis=1)
    proj = {"q": "query", "k": "key", "v": "value"}[name]
    return np.einsum("bnd,dhk->bnhk", tokens, p[proj]["kernel"]) + p[proj]["bias"]

  q, k, v = conv_proj("q", 1), conv_proj("k", stride_kv), conv_proj("v", stride_kv)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(scale_dim or d // heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("num_prefix,stride_kv,norm,scale", [
    (0, 2, "layer", "head_dim"), (1, 2, "batch", "width"), (1, 1, "layer", "head_dim")])
def test_conv_projection_attention_matches_reference(num_prefix, stride_kv, norm, scale):
  grid, dim, heads = (4, 3), 8, 2
  x = jax.random.normal(jax.random.key(0), (2, num_prefix + 12, dim))
  layer = cvt.ConvProjectionAttention(num_heads=heads, stride_kv=stride_kv,
                                      num_prefix=num_prefix, conv_norm=norm,
                                      attention_scale=scale)
  variables = nn.meta.unbox(jax.eval_shape(lambda: layer.init(jax.random.key(0), x, grid)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.4, s.shape), s.dtype),
                        variables["params"])
  stats = jax.tree_util.tree_map_with_path(  # running means ~ N(0, 0.4), variances in [0.5, 2)
      lambda path, s: rng.uniform(0.5, 2, s.shape) if path[-1].key == "var"
      else rng.normal(0, 0.4, s.shape), variables.get("batch_stats", {}))
  out = jax.jit(layer.apply, static_argnums=2)(
      {"params": params, **({"batch_stats": stats} if stats else {})}, x, grid)
  ref = _reference_attention(jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                             np.asarray(x, np.float64), grid, heads, num_prefix, stride_kv,
                             stats or None, dim if scale == "width" else None)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)


def test_forward_attention_ops_by_name():
  x = images(batch=3, size=16)
  model = cvt.Model(num_classes=5, **TINY)
  params = random_params(model, x)
  stats = init_batch_stats(model, x)
  apply = jax.jit(lambda m, p, x: m.apply({"params": p, **stats}, x), static_argnums=0)
  logits = apply(model, params, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  sigmoid = apply(model.clone(attention="sigmoid"), params, x)
  assert np.all(np.isfinite(sigmoid)) and np.abs(sigmoid - logits).max() > 1e-3
  features = apply(model.clone(num_classes=0),
                   {k: v for k, v in params.items() if k != "head"}, x)
  np.testing.assert_allclose(features @ params["head"]["kernel"] + params["head"]["bias"],
                             logits, rtol=1e-4, atol=1e-4)


def test_training_steps_change_params_and_lower_loss():
  x = images(batch=4, size=16)
  model = cvt.Model(num_classes=3, drop_path_rate=0.1, **TWO_STAGES)
  before, after, losses = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3))
  unchanged = {jax.tree_util.keystr(path) for path, changed in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)) if not changed}
  # Only the class token is classified and it skips the convolutions, so the last block's
  # query convolution (which only the patch tokens' queries go through) gets no gradient.
  last = "['stage_1_block_0']['attention']"
  assert unchanged == {f"{last}['conv_proj_q']['kernel']", f"{last}['conv_proj_q_norm']['bias']",
                       f"{last}['conv_proj_q_norm']['scale']"}, unchanged
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_bad_arguments():
  x = images(size=16)
  with pytest.raises(ValueError, match="variant or explicit num_heads"):
    abstract(cvt.Model(num_classes=2, dims=(8,), depths=(1,)), x)
  with pytest.raises(ValueError, match="num_heads must be 3 ints"):
    abstract(cvt.Model(num_classes=2, **dict(TINY, num_heads=(1, 2))), x)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    abstract(cvt.Model(num_classes=2, **dict(TINY, num_heads=(3, 2, 2))), x)
  with pytest.raises(ValueError, match="patch_padding must be 3 ints >= 0"):
    abstract(cvt.Model(num_classes=2, **dict(TINY, patch_padding=(1, -1, 1))), x)
  with pytest.raises(ValueError, match="images must be"):
    abstract(cvt.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="drop_path_rate"):
    abstract(cvt.Model(num_classes=2, drop_path_rate=-0.1, **TINY), x)
  with pytest.raises(ValueError, match="stride_kv"):
    abstract(cvt.Model(num_classes=2, stride_kv=0, **TINY), x)
  with pytest.raises(ValueError, match="unknown attention_scale 'dim'"):
    abstract(cvt.Model(num_classes=2, attention_scale="dim", **TINY), x)
  with pytest.raises(ValueError, match="norm_eps must be positive"):
    abstract(cvt.Model(num_classes=2, norm_eps=0.0, **TINY), x)
  with pytest.raises(TypeError, match="attention_args must be a dict"):
    abstract(cvt.Model(num_classes=2, attention_args=3, **TINY), x)
  with pytest.raises(KeyError, match="no_such_op"):
    abstract(cvt.Model(num_classes=2, attention="no_such_op", **TINY), x)
  with pytest.raises(ValueError, match="expected num_prefix"):
    layer = cvt.ConvProjectionAttention(num_heads=1, num_prefix=1)
    jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 16, 4)), (4, 4)))
  explicit = cvt.Model(num_classes=2, variant="CvT-13", depths=(1, 1, 1))
  assert explicit.depths == (1, 1, 1) and explicit.dims == (64, 192, 384)


def test_every_config_builds():
  for name, arg in (("cvt_digits", None), ("cvt_digits", "runlocal,attention=sigmoid"),
                    ("cvt_i1k", None), ("cvt_i1k", "variant=CvT-W24"), ("cvt_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
  config = _config_module("cvt_i1k").get_config("variant=CvT-21")
  assert config.optax.weight_decay == 0.1
  model = cvt.Model(**dict(config.model.to_dict(), dtype=jnp.bfloat16))
  assert abs(full_size_count(model) - 32e6) / 32e6 < 0.02
  with pytest.raises(ValueError, match="unknown config arg"):
    _config_module("cvt_digits").get_config("variant=CvT-13")


def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("cvt_digits", tmp_path, steps=20, **dict(TWO_STAGES, dims=(16, 32)))
