"""VOLO model family: variants and parameter counts, the class-attention block against a float64
reference, the stages' ops and grids, a training step, bad arguments, configs, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import vit
from big_attn.models import volo
from big_attn.ops import spatial
from big_attn.train import config_lib
from tests import reference as ref
from tests.test_convnext import abstract, count, full_size_count, run_tiny_config, train_steps
from tests.test_mixer_families import _assert_block_matches, _layer_norm, _mlp
from tests.test_train import _config_module

# 16x8 images, stem stride 2 and 1x1 patches: an 8x4 grid for the Outlookers, 4x2 after.
TINY = dict(depths=(1, 1), widths=(8, 16), num_heads=(2, 4), mlp_ratio=2, stem_dim=4,
            patch_size=2, class_blocks=1)
PAPER = {"D1": 26.6e6, "D2": 58.7e6, "D3": 86.3e6, "D4": 193e6, "D5": 296e6}


def test_registry_and_decode_variant():
  assert "volo" in models.names() and models.get("volo") is volo
  assert volo.decode_variant("VOLO-D5") == dict(depths=(12, 36), widths=(384, 768),
                                                num_heads=(12, 16), mlp_ratio=4, stem_dim=128)
  assert volo.decode_variant("D1") == volo.decode_variant("VOLO-D1")
  with pytest.raises(ValueError, match="D1, D2, D3, D4, D5"):
    volo.decode_variant("D6")


def test_parameter_count_of_d1():
  params = abstract(volo.Model(num_classes=1000, variant="D1"), jnp.zeros((1, 224, 224, 3)))
  assert count(params) == 26_634_344 and abs(count(params) - 26.6e6) / 26.6e6 < 0.02
  outlook = params["stage_1"]["encoderblock_0"]["MultiHeadAttention"]["op_params"]
  assert outlook["outlook_kernel"].value.shape == (6, 32, 81)  # 3x3 windows, per head
  assert params["posemb"]["pos_embedding"].value.shape == (14 * 14, 384)
  assert count(params["aux_head"]) == 385_000  # the token-labelling head, in the paper's count
  assert "bias" not in params["class_block_1"]["attention"]["query"]


@pytest.mark.extended
@pytest.mark.parametrize("variant", ["D2", "D3", "D4", "D5"])
def test_parameter_count_matches_the_paper(variant):
  n = full_size_count(volo.Model(num_classes=1000, variant=variant))
  assert abs(n - PAPER[variant]) / PAPER[variant] < 0.02, (variant, n)


def _ref_class_block(x, p, eps=1e-5):
  """float64: c = x_0 + Proj(softmax(q_0 Kᵀ / sqrt(d)) V) from LN x (no projection biases but
  the output's), then c + MLP(LN c) with exact GELU; the other tokens unchanged."""
  a = p["attention"]
  y = _layer_norm(x, p["norm1"], eps)
  q = jnp.einsum("bte,ehd->bthd", y[:, :1], a["query"]["kernel"])
  k, v = (jnp.einsum("bte,ehd->bthd", y, a[n]["kernel"]) for n in ("key", "value"))
  cls = x[:, :1] + jnp.einsum("bthd,hde->bte", ref.softmax_attention(q, k, v),
                              a["out"]["kernel"]) + a["out"]["bias"]
  cls = cls + _mlp(_layer_norm(cls, p["norm2"], eps), p["mlp"])
  return jnp.concatenate([cls, x[:, 1:]], axis=1)


def test_class_block_matches_its_formula():
  x = ref.normal(3, (2, 5, 8))
  _assert_block_matches(volo.ClassBlock(num_heads=2, mlp_dim=12), x, _ref_class_block)


def test_stages_ops_and_grids():
  x = ref.normal(4, (4, 16, 8, 3))
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Encoder1DBlock) and context.method_name == "__call__":
      seen.append((context.module.attention, args[0].shape[1:],
                   dict(context.module.attention_args)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):  # each stage's op gets its grid
    abstract(volo.Model(num_classes=3, attention="neighborhood", **TINY), x)
  assert seen == [("outlook_attention", (32, 8), dict(grid=(8, 4), kernel_size=3, stride=2)),
                  ("neighborhood", (8, 16), dict(grid=(4, 2), kernel_size=(3, 1),
                                                 dilation=(1, 1)))]


@pytest.mark.extended  # the digits config through main trains VOLO in the default run
def test_forward_and_training_step():
  x = ref.normal(4, (4, 16, 8, 3))
  model = volo.Model(num_classes=3, head_zeroinit=False, **TINY)
  before, after, losses = train_steps(model, x, jax.nn.one_hot(jnp.arange(4) % 3, 3), steps=2)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  # Outlook attention's weights come from the queries alone: the key projection gets none.
  unused = changed["stage_1"]["encoderblock_0"]["MultiHeadAttention"].pop("key")
  assert not any(jax.tree.leaves(unused)) and all(jax.tree.leaves(changed)), changed


def test_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda model: abstract(model, x)
  with pytest.raises(ValueError, match="divisible by 2·patch_size"):
    build(volo.Model(num_classes=2, **dict(TINY, patch_size=8)))
  with pytest.raises(ValueError, match="patch_size must be even"):
    build(volo.Model(num_classes=2, **dict(TINY, patch_size=3)))
  with pytest.raises(ValueError, match="must be divisible by num_heads"):
    build(volo.Model(num_classes=2, **dict(TINY, num_heads=(3, 4))))
  with pytest.raises(ValueError, match="depths must be"):
    build(volo.Model(num_classes=2, **dict(TINY, depths=(1, 1, 1))))
  with pytest.raises(TypeError, match="local_attention_args must be a dict"):
    build(volo.Model(num_classes=2, local_attention_args=[3], **TINY))
  with pytest.raises(spatial.OpRefused, match="class attention"):
    build(volo.Model(num_classes=2, class_attention="window", **TINY))
  with pytest.raises(ValueError, match="images must be"):
    abstract(volo.Model(num_classes=2, **TINY), x[0])
  with pytest.raises(ValueError, match="depths, widths, num_heads"):
    build(volo.Model(num_classes=2))


def test_every_config_builds():
  for name, arg in (("volo_digits", None), ("volo_digits", "attention=sigmoid,runlocal"),
                    ("volo_i1k", None), ("volo_i1k", "variant=D3"), ("volo_i1k", "runlocal")):
    module = _config_module(name)
    config = module.get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in module.__doc__
    side = config.input.image_size if "digits" in name or "runlocal" in (arg or "") else None
    if side:
      model = volo.Model(**dict(dict(num_classes=10), **config.model.to_dict()))
      assert count(abstract(model, jnp.zeros((1, side, side, 1 if side == 16 else 3)))) > 0
  model = volo.Model(**_config_module("volo_i1k").get_config("variant=D3").model.to_dict())
  assert (model.depths, model.widths, model.dtype) == ((8, 28), (256, 512), "bfloat16")
  with pytest.raises(ValueError, match="D1, D2"):
    _config_module("volo_i1k").get_config("variant=D9")


def test_tiny_config_trains_through_main(tmp_path):
  run_tiny_config("volo_digits", tmp_path, steps=6, head_zeroinit=False)
