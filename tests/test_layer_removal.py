"""MLP Can Be A Good Transformer Learner (`big_attn.interpret.layer_removal`): the attention
entropy against float64 NumPy, the entropy-guided choice of the layers to remove on a tiny ViT
(its attention maps recomputed in NumPy from the blocks' queries and keys), and fine-tuning the
pruned model from the full model's weights (`config.init_from`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from big_attn import interpret
from big_attn import main as main_lib
from big_attn.models import vit
from big_attn.pretrained import ConversionError, loading
from tests import reference as ref
from tests.test_token_reduction import IMAGES, _random_params, attend_calls  # 16 patches
from tests.test_train import losses, tiny_config

TINY = dict(num_classes=3, width=8, depth=4, num_heads=2, mlp_dim=8, patch_size=4,
            head_zeroinit=False)


def _entropy(a):
  """float64 -Σ_j a log a (0 log 0 = 0), mean over the other axes."""
  a = np.asarray(a, np.float64)
  return -np.mean(np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0), -1))


def test_attention_entropy_matches_numpy():
  logits = np.asarray(ref.normal(1, (2, 3, 5, 6)))
  maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  maps[0, 0, 0] = [1, 0, 0, 0, 0, 0]  # a one-hot row: 0 log 0 = 0
  np.testing.assert_allclose(interpret.attention_entropy(maps), _entropy(maps), rtol=1e-6)
  with pytest.raises(ValueError, match=r"attention_map must be \[batch, heads, q, kv\]"):
    interpret.attention_entropy(maps[0])


def test_entropy_guided_choice_removes_the_lowest_entropy_layers():
  # Blocks 1 and 3 get sharp attention (queries and keys scaled by 6): the lowest entropies.
  model = vit.Model(**TINY)
  params = _random_params(model, 0)
  for i in (1, 3):
    attention = params["Transformer"][f"encoderblock_{i}"]["MultiHeadAttention"]
    for name in ("query", "key"):
      attention[name] = {k: 6 * v for k, v in attention[name].items()}
  variables = {"params": params}

  def run(variables):
    with attend_calls() as calls:
      model.apply(variables, IMAGES)
    return [call[:2] for call in calls]

  queries_keys = jax.jit(run).lower(variables).compile(  # XLA's optimisations off: cheaper
      compiler_options={"xla_backend_optimization_level": 0})(variables)
  want = {}
  for i, (q, k) in enumerate(queries_keys):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    want[i] = _entropy(probs / probs.sum(-1, keepdims=True))
  got = interpret.layer_attention_entropy(model, variables, IMAGES)
  assert sorted(got) == [0, 1, 2, 3]
  np.testing.assert_allclose([got[i] for i in range(4)], [want[i] for i in range(4)],
                             rtol=1e-4)
  assert interpret.entropy_guided_attention_free_layers(model, variables, IMAGES, 2) == (1, 3)
  with pytest.raises(ValueError, match=r"num_layers must be an int in \[0, 4\]"):
    interpret.entropy_guided_attention_free_layers(model, variables, IMAGES, 5)


def test_pruned_model_loads_the_full_models_weights(tmp_path):
  # The removed blocks' attention parameters are dropped; every other parameter is the full
  # model's; a checkpoint parameter the pruned model does not declare removed still raises.
  full = _random_params(vit.Model(**TINY, layer_scale_init=0.1), 0)
  path = str(tmp_path / "full.npz")
  loading.save_npz(full, path)
  init_from = {"path": path, "source": "big_attn"}
  pruned = vit.Model(**TINY, layer_scale_init=0.1, attention_free_layers=(1, 3))
  shapes = nn.unbox(jax.eval_shape(pruned.init, jax.random.key(0), IMAGES)["params"])
  loaded = loading.load_weights(init_from, pruned, shapes)
  blocks = loaded["Transformer"]
  assert set(blocks["encoderblock_1"]) == {"LayerNorm_1", "MlpBlock", "layer_scale_2"}
  for path_, value in jax.tree_util.tree_flatten_with_path(loaded)[0]:
    names = [str(getattr(k, "key", k)) for k in path_]
    node = full
    for name in names:
      node = node[name]
    np.testing.assert_array_equal(value, node)
  shallower = vit.Model(**dict(TINY, depth=3), layer_scale_init=0.1)
  with pytest.raises(ConversionError, match="encoderblock_3"):
    loading.load_weights(init_from, shallower, nn.unbox(
        jax.eval_shape(shallower.init, jax.random.key(0), IMAGES)["params"]))


@pytest.mark.extended
def test_fine_tuning_with_removed_layers_through_main(tmp_path):
  full = tiny_config(total_steps=1, ckpt_every=1, **{"model.depth": 2})
  assert main_lib.train_and_evaluate(full, str(tmp_path / "full"))["step"] == 1
  pruned = tiny_config(total_steps=1, ckpt_every=100, **{
      "model.depth": 2, "model.attention_free_layers": (0,),
      "init_from.path": str(tmp_path / "full" / "checkpoints"), "init_from.source": "big_attn"})
  assert main_lib.train_and_evaluate(pruned, str(tmp_path / "pruned"))["step"] == 1
  assert np.isfinite(list(losses(str(tmp_path / "pruned")).values())[0])
