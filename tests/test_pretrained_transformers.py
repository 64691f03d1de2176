"""big_attn.pretrained.transformers: tiny transformers models with random weights (2 layers,
width 64, float32) converted and compared with transformers' own forward pass and `generate`,
and converted back; unsupported configurations refused naming the field."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

from big_attn.models import lm  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.pretrained import ConversionError  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.pretrained import from_transformers  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.pretrained import to_transformers  # noqa: E402  pylint: disable=g-import-not-at-top

LM_SIZES = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
VISION_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, image_size=16, patch_size=4, num_labels=3)


def relative_error(out, ref):
  return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def random_model(cls, config):
  torch.manual_seed(0)
  return cls(config).eval()


LMS = {  # together: untied/tied, llama3/linear/dynamic RoPE, all biases/qkv biases, a window
    "llama_untied_llama3_biases": lambda: random_model(
        transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **LM_SIZES, rms_norm_eps=1e-5, attention_bias=True, rope_parameters=dict(
                rope_type="llama3", rope_theta=500_000., factor=8., low_freq_factor=1.,
                high_freq_factor=4., original_max_position_embeddings=8))),
    "qwen2_tied_linear": lambda: random_model(
        transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **LM_SIZES, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10_000., factor=2.))),
    "mistral_window_dynamic": lambda: random_model(
        transformers.MistralForCausalLM, transformers.MistralConfig(
            **LM_SIZES, sliding_window=4, max_position_embeddings=8,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10_000., factor=2.))),
}


@pytest.mark.parametrize("name", sorted(LMS))
def test_causal_lm_logits_and_greedy_generation_match(name):
  hf = LMS[name]()
  model, variables = from_transformers(hf)
  tokens = np.random.RandomState(0).randint(0, LM_SIZES["vocab_size"], (2, 12))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  assert relative_error(model.apply(variables, jnp.asarray(tokens)), ref) <= 1e-4
  back = to_transformers(model, variables)  # and back: the same class and function
  assert type(back) is type(hf)
  with torch.no_grad():
    assert relative_error(back(torch.tensor(tokens)).logits.numpy(), ref) <= 1e-6
  # 5 prompt tokens and 4 greedy steps: the window (4), the dynamic scaling (past 8 positions)
  # and llama3's long wavelengths all act inside the cache.
  prompt = tokens[:, :5]
  with torch.no_grad():
    out = hf.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                      max_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
  ours, logits = lm.generate(model, variables["params"], jnp.asarray(prompt), 4,
                             temperature=0.0, return_logits=True)
  np.testing.assert_array_equal(np.asarray(ours), out.sequences.numpy())
  assert relative_error(logits, torch.stack(out.logits, 1).numpy()) <= 1e-4


def test_converted_lm_fields():
  model, variables = from_transformers(LMS["qwen2_tied_linear"]())
  assert (model.qkv_bias, model.out_bias, model.tie_embeddings) == (True, False, True)
  assert model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
  attention = variables["params"]["layers_0"]["attention"]
  assert attention["key"]["kernel"].shape == (64, 2, 16) and "bias" not in attention["out"]
  assert "unembedding" not in variables["params"]
  model, variables = from_transformers(LMS["mistral_window_dynamic"]())
  assert model.sliding_window == 4
  # any op runs on the converted weights (the window is softmax's)
  out = model.clone(sliding_window=None, attention="sigmoid").apply(
      variables, jnp.zeros((1, 6), jnp.int32))
  assert out.shape == (1, 6, 50) and np.all(np.isfinite(out))


VISION = {
    "vit": lambda: random_model(transformers.ViTForImageClassification,
                                transformers.ViTConfig(**VISION_SIZES)),
    "deit": lambda: random_model(transformers.DeiTForImageClassificationWithTeacher,
                                 transformers.DeiTConfig(**VISION_SIZES)),
    "convnext": lambda: random_model(transformers.ConvNextForImageClassification,
                                     transformers.ConvNextConfig(
                                         hidden_sizes=[16, 32], depths=[1, 2], num_stages=2,
                                         num_labels=3, layer_scale_init_value=0.5)),
    "poolformer": lambda: random_model(transformers.PoolFormerForImageClassification,
                                       transformers.PoolFormerConfig(
                                           hidden_sizes=[16, 32], depths=[1, 2],
                                           num_encoder_blocks=2, num_labels=3,
                                           layer_scale_init_value=0.5)),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_logits_match(name):
  hf = VISION[name]()
  model, variables = from_transformers(hf)
  images = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.tensor(images)).logits.numpy()
  out = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert out.shape == (2, 3) and relative_error(out, ref) <= 1e-4


CVT_SIZES = dict(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 2], cls_token=[False, True],
                 num_labels=3)


def test_cvt_logits_match_with_batch_norm_statistics():
  hf = random_model(transformers.CvtForImageClassification, transformers.CvtConfig(**CVT_SIZES))
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # weights of unit gain (so that the image matters), norms and running
    for key, tensor in hf.state_dict().items():  # statistics away from their 0/1 initial values
      if key.endswith("running_var"):
        tensor.uniform_(0.3, 2.0, generator=gen)
      elif key.endswith(("running_mean", "bias", "normalization.weight")):
        tensor.normal_(float(key.endswith("weight")), 0.5, generator=gen)
      elif tensor.ndim >= 2:
        tensor.normal_(0.0, float(np.prod(tensor.shape[1:])) ** -0.5, generator=gen)
  model, variables = from_transformers(hf)
  assert variables["batch_stats"]["stage_1_block_1"]["attention"]["conv_proj_k_norm"][
      "var"].shape == (16,)
  images = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.tensor(images)).logits.numpy()
  apply = jax.jit(model.apply)
  images = jnp.asarray(images.transpose(0, 2, 3, 1))
  assert relative_error(apply(variables, images), ref) <= 1e-4
  halved = dict(variables, batch_stats=jax.tree.map(lambda x: x / 2, variables["batch_stats"]))
  assert relative_error(apply(halved, images), ref) > 1e-2  # the statistics matter


def test_unsupported_configurations_are_refused_naming_the_field():
  yarn = transformers.LlamaConfig(**LM_SIZES, rope_parameters=dict(
      rope_type="yarn", rope_theta=10_000., factor=4., original_max_position_embeddings=8))
  with pytest.raises(ConversionError, match=r"rope_scaling\.rope_type='yarn'"):
    from_transformers(transformers.LlamaForCausalLM(yarn))
  with pytest.raises(ConversionError, match="hidden_act='relu'"):
    from_transformers(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LM_SIZES, hidden_act="relu")))
  with pytest.raises(ConversionError, match="mlp_bias=True"):
    from_transformers(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LM_SIZES, mlp_bias=True)))
  mixed = transformers.Qwen2Config(**LM_SIZES, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)
  with pytest.raises(ConversionError, match="layer_types"):
    from_transformers(transformers.Qwen2ForCausalLM(mixed))
  with pytest.raises(ConversionError, match="qkv_bias=False"):
    from_transformers(transformers.ViTForImageClassification(
        transformers.ViTConfig(**VISION_SIZES, qkv_bias=False)))
  with pytest.raises(ConversionError, match="DeiTForImageClassification is not supported"):
    from_transformers(transformers.DeiTForImageClassification(
        transformers.DeiTConfig(**VISION_SIZES)))
  with pytest.raises(ConversionError, match="LlamaModel is not supported"):
    from_transformers(transformers.LlamaModel(transformers.LlamaConfig(**LM_SIZES)))
  with pytest.raises(ConversionError, match="lm.Model.attention='sigmoid' has no transformers"):
    model, variables = from_transformers(LMS["qwen2_tied_linear"]())
    to_transformers(model.clone(attention="sigmoid"), variables)
  for field, value in (("qkv_projection_method", ["dw_bn", "avg"]), ("cls_token", [True, True]),
                       ("stride_q", [1, 2]), ("kernel_qkv", [3, 5])):
    with pytest.raises(ConversionError, match=f"CvtConfig.{field}="):
      from_transformers(transformers.CvtForImageClassification(
          transformers.CvtConfig(**dict(CVT_SIZES, **{field: value}))))
  with pytest.raises(ConversionError, match="model_type='bert'"):
    from_transformers(transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96)))
