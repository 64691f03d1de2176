"""Hugging Face transformers models to big_attn models computing the same function.

    hf = transformers.LlamaForCausalLM.from_pretrained(DIR)          # or any supported class
    model, variables = big_attn.pretrained.from_transformers(hf)
    logits = model.apply(variables, tokens)                          # = hf(tokens).logits
    model = model.clone(attention="sigmoid")                         # any op, same weights

Supported (`config.model_type` -> big_attn model):
- "llama", "qwen2", "mistral" (`*ForCausalLM`) -> `big_attn.models.lm` (pre-RMSNorm, SwiGLU,
  RoPE with "linear", "dynamic" or "llama3" scaling, grouped-query attention, tied or untied
  embeddings, Qwen2's query/key/value biases, Mistral's sliding window).
- "vit" (`ViTForImageClassification`) -> `big_attn.models.vit` (pool_type="cls").
- "deit" (`DeiTForImageClassificationWithTeacher`) -> `big_attn.models.deit` (distilled). The
  plain `DeiTForImageClassification` is refused: its distillation token attends without a head,
  which big_attn's DeiT does not compute.
- "convnext" (`ConvNextForImageClassification`) -> `big_attn.models.convnext`.
- "poolformer" (`PoolFormerForImageClassification`) -> `big_attn.models.metaformer` (the
  "pool" mixer; without layer scale the scales are ones).
- "cvt" (`CvtForImageClassification`) -> `big_attn.models.cvt` (BatchNorm convolutional
  projection, running statistics in `variables["batch_stats"]`; class token in the last stage;
  `attention_scale="width"`, `norm_eps=1e-5`, `approximate_gelu=False` as the official code).
Images go in as `[batch, H, W, C]` (transformers takes `[batch, C, H, W]`). The class and
distillation tokens absorb their position embeddings (a constant token plus a constant position
is one vector), so the results are equal. A configuration big_attn has no equivalent for raises
`ConversionError` naming the config field. `to_transformers(model, variables)` converts a
Llama-family `lm.Model` back.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from big_attn.models import convnext, cvt, deit, lm, metaformer, vit
from big_attn.pretrained._common import (ConversionError, StateDict, dense_kernel, take_batch_norm,
                                         take_conv, take_dense, take_norm)

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # -> approximate_gelu


def _require(config: Any, field: str, ok: bool, expected: str) -> None:
  if not ok:
    raise ConversionError(f"{type(config).__name__}.{field}={getattr(config, field, None)!r} has "
                          f"no big_attn equivalent; expected {expected}")


def _require_class(cls_name: str, allowed: tuple[str, ...]) -> None:
  if cls_name not in allowed:
    raise ConversionError(f"{cls_name} is not supported; convert one of {', '.join(allowed)}")


def _attention(sd: StateDict, prefix: str, *, width: int, num_heads: int, num_kv_heads: int,
               head_dim: int, qkv_bias: bool, out_bias: bool) -> dict[str, Any]:
  """q/k/v/o_proj `Linear`s -> `big_attn.layers.Attention`'s `[width, heads, head_dim]` and
  `[heads, head_dim, width]` projections."""
  out = {}
  for name, heads in (("query", num_heads), ("key", num_kv_heads), ("value", num_kv_heads)):
    proj = f"{prefix}.{name[0]}_proj"
    out[name] = {"kernel": dense_kernel(sd.take(f"{proj}.weight")).reshape(width, heads,
                                                                            head_dim)}
    if qkv_bias:
      out[name]["bias"] = sd.take(f"{proj}.bias").reshape(heads, head_dim)
  out["out"] = {"kernel": dense_kernel(sd.take(f"{prefix}.o_proj.weight")).reshape(
      num_heads, head_dim, width)}
  if out_bias:
    out["out"]["bias"] = sd.take(f"{prefix}.o_proj.bias")
  return out


# ------------------------------------------------------------------------------ language models
def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
  """`(rope_base, rope_scaling)` of `lm.Model` from `config.rope_parameters`."""
  rope = dict(getattr(config, "rope_parameters", None) or {})
  kind = rope.get("rope_type", "default")
  if kind not in _ROPE_TYPES:
    raise ConversionError(f"rope_scaling.rope_type={kind!r} (config.rope_parameters) has no "
                          f"big_attn equivalent; expected one of {_ROPE_TYPES}")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError(f"config.rope_parameters.partial_rotary_factor="
                          f"{rope['partial_rotary_factor']!r}: big_attn rotates the whole head")
  base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10_000.)))
  if kind == "default":
    return base, None
  scaling = {"rope_type": kind, "factor": float(rope["factor"])}
  if kind == "dynamic":
    scaling["max_position_embeddings"] = int(config.max_position_embeddings)
  if kind == "llama3":
    scaling.update(low_freq_factor=float(rope["low_freq_factor"]),
                   high_freq_factor=float(rope["high_freq_factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
  return base, scaling


def _sliding_window(config: Any) -> int | None:
  """Mistral's window, or Qwen2's when every layer uses it; mixed layers are refused."""
  layer_types = set(getattr(config, "layer_types", None) or ())
  if layer_types - {"full_attention", "sliding_attention"} or len(layer_types) > 1:
    raise ConversionError(f"config.layer_types={config.layer_types!r}: big_attn's LM uses one "
                          "attention pattern in every layer (all full or all sliding)")
  if layer_types == {"full_attention"}:
    return None
  window = getattr(config, "sliding_window", None)
  return None if window is None else int(window)


def _causal_lm(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  _require_class(cls_name, ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"))
  _require(config, "hidden_act", config.hidden_act == "silu", "'silu' (SwiGLU)")
  _require(config, "mlp_bias", not getattr(config, "mlp_bias", False), "False")
  qwen = config.model_type == "qwen2"
  qkv_bias = qwen or bool(getattr(config, "attention_bias", False))
  out_bias = not qwen and bool(getattr(config, "attention_bias", False))
  width, heads = config.hidden_size, config.num_attention_heads
  kv_heads = config.num_key_value_heads or heads
  head_dim = getattr(config, "head_dim", None) or width // heads
  base, scaling = _rope(config)
  tied = bool(config.tie_word_embeddings)
  model = lm.Model(
      vocab_size=config.vocab_size, width=width, depth=config.num_hidden_layers,
      mlp_dim=config.intermediate_size, num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, rope_base=base, rope_scaling=scaling, qkv_bias=qkv_bias,
      out_bias=out_bias, sliding_window=_sliding_window(config),
      norm_eps=float(config.rms_norm_eps), tie_embeddings=tied)
  params = {"embedding": {"embedding": sd.take("model.embed_tokens.weight")}}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}"
    params[f"layers_{i}"] = {
        "attention_norm": {"scale": sd.take(f"{p}.input_layernorm.weight")},
        "attention": _attention(sd, f"{p}.self_attn", width=width, num_heads=heads,
                                num_kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                out_bias=out_bias),
        "mlp_norm": {"scale": sd.take(f"{p}.post_attention_layernorm.weight")},
        "mlp": {"wi_gate": take_dense(sd, f"{p}.mlp.gate_proj", bias=False),
                "wi_up": take_dense(sd, f"{p}.mlp.up_proj", bias=False),
                "wo": take_dense(sd, f"{p}.mlp.down_proj", bias=False)}}
  params["final_norm"] = {"scale": sd.take("model.norm.weight")}
  if tied:
    sd.skip("lm_head.weight")  # the same tensor as the input embedding
  else:
    params["unembedding"] = take_dense(sd, "lm_head", bias=False)
  return model, {"params": params}


# ----------------------------------------------------------------------------- vision encoders
def _encoder_config(config: Any) -> dict[str, Any]:
  """The `vit.Model` / `deit.Model` fields of a ViT-like transformers config."""
  _require(config, "hidden_act", config.hidden_act in _GELU, f"one of {sorted(_GELU)}")
  _require(config, "qkv_bias", config.qkv_bias, "True (big_attn's ViT has projection biases)")
  patch = config.patch_size
  return dict(num_classes=config.num_labels, width=config.hidden_size,
              depth=config.num_hidden_layers, mlp_dim=config.intermediate_size,
              num_heads=config.num_attention_heads,
              patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
              posemb="learn", norm_eps=float(config.layer_norm_eps),
              approximate_gelu=_GELU[config.hidden_act])


def _encoder_params(config: Any, sd: StateDict, prefix: str, num_tokens: int) -> dict[str, Any]:
  """Patch embedding, position embedding of the patches (the first `num_tokens` entries, of
  the class/distillation tokens, are returned folded into those tokens) and the blocks."""
  width, heads = config.hidden_size, config.num_attention_heads
  pos = sd.take(f"{prefix}.embeddings.position_embeddings")[0]
  params = {"embedding": take_conv(sd, f"{prefix}.embeddings.patch_embeddings.projection"),
            "posemb": {"pos_embedding": pos[num_tokens:]}}
  blocks = {}
  for i in range(config.num_hidden_layers):
    p = f"{prefix}.layers.{i}"
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": take_norm(sd, f"{p}.layernorm_before"),
        "MultiHeadAttention": _attention(sd, f"{p}.attention", width=width, num_heads=heads,
                                         num_kv_heads=heads, head_dim=width // heads,
                                         qkv_bias=True, out_bias=True),
        "LayerNorm_1": take_norm(sd, f"{p}.layernorm_after"),
        "MlpBlock": {"Dense_0": take_dense(sd, f"{p}.mlp.fc1"),
                     "Dense_1": take_dense(sd, f"{p}.mlp.fc2")}}
  blocks["encoder_norm"] = take_norm(sd, f"{prefix}.layernorm")
  params["Transformer"] = blocks
  params["tokens"] = pos[:num_tokens]
  return params


def _vit(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  _require_class(cls_name, ("ViTForImageClassification",))
  model = vit.Model(pool_type="cls", **_encoder_config(config))
  params = _encoder_params(config, sd, "vit", 1)
  params["cls"] = sd.take("vit.embeddings.cls_token")[0] + params.pop("tokens")[:1]
  params["head"] = take_dense(sd, "classifier")
  return model, {"params": params}


def _deit(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  _require_class(cls_name, ("DeiTForImageClassificationWithTeacher",))
  model = deit.Model(distilled=True, **_encoder_config(config))
  params = _encoder_params(config, sd, "deit", 2)
  tokens = params.pop("tokens")
  params["cls"] = sd.take("deit.embeddings.cls_token")[0] + tokens[:1]
  params["dist"] = sd.take("deit.embeddings.distillation_token")[0] + tokens[1:2]
  params["head"] = take_dense(sd, "cls_classifier")
  params["head_dist"] = take_dense(sd, "distillation_classifier")
  return model, {"params": params}


def _convnext(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  _require_class(cls_name, ("ConvNextForImageClassification",))
  _require(config, "hidden_act", config.hidden_act == "gelu", "'gelu'")
  dims, depths = tuple(config.hidden_sizes), tuple(config.depths)
  layer_scale = float(config.layer_scale_init_value)
  model = convnext.Model(num_classes=config.num_labels, depths=depths, dims=dims,
                         stem_size=config.patch_size, layer_scale_init=layer_scale,
                         head_norm_eps=float(config.layer_norm_eps))
  params = {"stem": take_conv(sd, "convnext.embeddings.patch_embeddings"),
            "stem_norm": take_norm(sd, "convnext.embeddings.layernorm")}
  for stage, depth in enumerate(depths):
    p = f"convnext.encoder.stages.{stage}"
    if stage:
      params[f"downsample_norm_{stage}"] = take_norm(sd, f"{p}.downsampling_layer.0")
      params[f"downsample_{stage}"] = take_conv(sd, f"{p}.downsampling_layer.1")
    for i in range(depth):
      q = f"{p}.layers.{i}"
      block = {"dwconv": take_conv(sd, f"{q}.dwconv"), "norm": take_norm(sd, f"{q}.layernorm"),
               "pwconv1": take_dense(sd, f"{q}.pwconv1"), "pwconv2": take_dense(sd, f"{q}.pwconv2")}
      if layer_scale > 0:
        block["gamma"] = sd.take(f"{q}.layer_scale_parameter")
      params[f"stage_{stage}_block_{i}"] = block
  params["head_norm"] = take_norm(sd, "convnext.layernorm")
  params["head"] = take_dense(sd, "classifier")
  return model, {"params": params}


def _poolformer(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  _require_class(cls_name, ("PoolFormerForImageClassification",))
  _require(config, "hidden_act", config.hidden_act in _GELU, f"one of {sorted(_GELU)}")
  stages = config.num_encoder_blocks
  embeddings = (tuple(config.patch_sizes[:stages]), tuple(config.strides[:stages]),
                tuple(config.padding[:stages]))
  expected = ((7,) + (3,) * (stages - 1), (4,) + (2,) * (stages - 1),
              (2,) + (1,) * (stages - 1))
  _require(config, "patch_sizes/strides/padding", embeddings == expected,
           f"{expected} (PoolFormer's 7x7 stride-4 stem, 3x3 stride-2 downsampling)")
  dims, depths = tuple(config.hidden_sizes[:stages]), tuple(config.depths[:stages])
  model = metaformer.Model(num_classes=config.num_labels, depths=depths, dims=dims,
                           mlp_ratio=float(config.mlp_ratio), mixers="pool",
                           mixer_args={"pool": {"pool_size": int(config.pool_size)}},
                           approximate_gelu=_GELU[config.hidden_act])
  params = {}
  for stage, depth in enumerate(depths):
    embed = "stem" if stage == 0 else f"downsample_{stage}"
    params[embed] = take_conv(sd, f"poolformer.encoder.patch_embeddings.{stage}.projection")
    for i in range(depth):
      p = f"poolformer.encoder.block.{stage}.{i}"
      block = {"norm1": take_norm(sd, f"{p}.before_norm"),
               "norm2": take_norm(sd, f"{p}.after_norm"),
               "mlp": {"Dense_0": take_dense(sd, f"{p}.output.conv1"),
                       "Dense_1": take_dense(sd, f"{p}.output.conv2")}}
      for ours, theirs in (("layer_scale1", "layer_scale_1"), ("layer_scale2", "layer_scale_2")):
        block[ours] = (sd.take(f"{p}.{theirs}") if config.use_layer_scale
                       else np.ones(dims[stage], np.float32))
      params[f"stage_{stage}_block_{i}"] = block
  params["norm"] = take_norm(sd, "norm")
  params["head"] = take_dense(sd, "classifier")
  return model, {"params": params}


def _cvt(config: Any, sd: StateDict, cls_name: str) -> tuple[Any, dict[str, Any]]:
  """CvT-13/21/W24-like -> `cvt.Model` with the official code's attention scale, LayerNorm eps
  1e-5 (`nn.LayerNorm`'s default; transformers ignores `config.layer_norm_eps`) and exact GELU;
  the BatchNorm running statistics go to `batch_stats`."""
  _require_class(cls_name, ("CvtForImageClassification",))
  stages = len(config.depth)

  def per_stage(field):  # the config's lists may be longer than `depth`
    return tuple(getattr(config, field)[:stages])

  def same(field, value):  # big_attn's CvT has one value for every stage
    _require(config, field, per_stage(field) == (value,) * stages,
             f"{(value,) * stages} (one value in every stage)")

  same("qkv_projection_method", "dw_bn")
  same("qkv_bias", True)
  same("stride_q", 1)
  _require(config, "cls_token", per_stage("cls_token") == (False,) * (stages - 1) + (True,),
           "a class token in the last stage only")
  for field in ("kernel_qkv", "stride_kv", "mlp_ratio"):
    same(field, getattr(config, field)[0])
  kernel = config.kernel_qkv[0]
  same("padding_q", kernel // 2)
  same("padding_kv", kernel // 2)
  model = cvt.Model(
      num_classes=config.num_labels, dims=per_stage("embed_dim"),
      num_heads=per_stage("num_heads"), depths=tuple(config.depth),
      patch_size=per_stage("patch_sizes"), patch_stride=per_stage("patch_stride"),
      patch_padding=per_stage("patch_padding"), kernel_size=kernel,
      stride_kv=config.stride_kv[0], mlp_ratio=float(config.mlp_ratio[0]), conv_norm="batch",
      norm_eps=1e-5, approximate_gelu=False, attention_scale="width")
  params, stats = {}, {}
  for stage, depth in enumerate(config.depth):
    p = f"cvt.encoder.stages.{stage}"
    embed = f"{p}.embedding.convolution_embeddings"
    params[f"stage_{stage}_embed"] = take_conv(sd, f"{embed}.projection")
    params[f"stage_{stage}_embed_norm"] = take_norm(sd, f"{embed}.normalization")
    if stage == stages - 1:
      params["cls"] = sd.take(f"{p}.cls_token")[0]
    for i in range(depth):
      q = f"{p}.layers.{i}"
      heads, dim = config.num_heads[stage], config.embed_dim[stage]
      attention, attention_stats = {}, {}
      for name in ("query", "key", "value"):
        conv = f"{q}.attention.attention.convolution_projection_{name}.convolution_projection"
        attention[f"conv_proj_{name[0]}"] = take_conv(sd, f"{conv}.convolution", bias=False)
        attention[f"conv_proj_{name[0]}_norm"] = take_batch_norm(
            sd, f"{conv}.normalization", attention_stats, f"conv_proj_{name[0]}_norm")
        proj = take_dense(sd, f"{q}.attention.attention.projection_{name}")
        attention[name] = {"kernel": proj["kernel"].reshape(dim, heads, dim // heads),
                           "bias": proj["bias"].reshape(heads, dim // heads)}
      out = take_dense(sd, f"{q}.attention.output.dense")
      attention["out"] = {"kernel": out["kernel"].reshape(heads, dim // heads, dim),
                          "bias": out["bias"]}
      params[f"stage_{stage}_block_{i}"] = {
          "LayerNorm_0": take_norm(sd, f"{q}.layernorm_before"), "attention": attention,
          "LayerNorm_1": take_norm(sd, f"{q}.layernorm_after"),
          "MlpBlock": {"Dense_0": take_dense(sd, f"{q}.intermediate.dense"),
                       "Dense_1": take_dense(sd, f"{q}.output.dense")}}
      stats[f"stage_{stage}_block_{i}"] = {"attention": attention_stats}
  params["norm"] = take_norm(sd, "layernorm")
  if config.num_labels:
    params["head"] = take_dense(sd, "classifier")
  return model, {"params": params, "batch_stats": stats}


_CONVERTERS: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "llama": _causal_lm, "qwen2": _causal_lm, "mistral": _causal_lm, "vit": _vit,
    "deit": _deit, "convnext": _convnext, "poolformer": _poolformer, "cvt": _cvt}


def to_transformers(model: Any, variables: Any) -> Any:
  """The transformers causal LM computing the same function as a big_attn `lm.Model` of the
  Llama family (the way back of `from_transformers`): `LlamaForCausalLM`, `Qwen2ForCausalLM`
  (query/key/value biases only) or `MistralForCausalLM` (sliding window), in eval mode.

  Raises `ConversionError` naming the field for a model transformers' classes cannot express
  (another block, attention op, qk-norm, scanned or grouped layers).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top,redefined-outer-name
  if not isinstance(model, lm.Model):
    raise ConversionError(f"to_transformers converts big_attn.models.lm.Model, got "
                          f"{type(model).__name__}")
  for field, ok in (("block", model.block == "pre_norm"),
                    ("attention", model.attention == "softmax"), ("qk_norm", not model.qk_norm),
                    ("scan_layers", not model.scan_layers),
                    ("layer_group_size", model.layer_group_size is None)):
    if not ok:
      raise ConversionError(f"lm.Model.{field}={getattr(model, field)!r} has no transformers "
                            "Llama-family equivalent")
  if model.out_bias and not model.qkv_bias:
    raise ConversionError("lm.Model.out_bias=True without qkv_bias has no transformers class")
  width, heads, kv_heads, head_dim = (model.width, model.num_heads, model.num_kv_heads,
                                      model.head_dim)
  rope = dict(model.rope_scaling or {"rope_type": "default"}, rope_theta=float(model.rope_base))
  kwargs = dict(vocab_size=model.vocab_size, hidden_size=width,
                intermediate_size=model.mlp_dim, num_hidden_layers=model.depth,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
                max_position_embeddings=int(rope.pop("max_position_embeddings", 4096)),
                rope_parameters=rope)
  if model.qkv_bias and not model.out_bias:
    kwargs.update(use_sliding_window=model.sliding_window is not None, max_window_layers=0,
                  sliding_window=model.sliding_window)
    cls, config = transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**kwargs)
  elif model.sliding_window is not None:
    if model.qkv_bias:
      raise ConversionError("lm.Model.qkv_bias with a sliding_window has no transformers class")
    cls, config = transformers.MistralForCausalLM, transformers.MistralConfig(
        sliding_window=model.sliding_window, **kwargs)
  else:
    cls, config = transformers.LlamaForCausalLM, transformers.LlamaConfig(
        attention_bias=model.qkv_bias, **kwargs)
  params = variables["params"]
  tensor = lambda x: torch.tensor(np.array(x, np.float32))  # pylint: disable=unnecessary-lambda-assignment
  state = {"model.embed_tokens.weight": tensor(params["embedding"]["embedding"]),
           "model.norm.weight": tensor(params["final_norm"]["scale"])}
  for i in range(model.depth):
    layer, p = params[f"layers_{i}"], f"model.layers.{i}"
    state[f"{p}.input_layernorm.weight"] = tensor(layer["attention_norm"]["scale"])
    state[f"{p}.post_attention_layernorm.weight"] = tensor(layer["mlp_norm"]["scale"])
    for name in ("query", "key", "value"):
      proj = layer["attention"][name]
      state[f"{p}.self_attn.{name[0]}_proj.weight"] = tensor(
          np.reshape(proj["kernel"], (width, -1)).T)
      if "bias" in proj:
        state[f"{p}.self_attn.{name[0]}_proj.bias"] = tensor(np.reshape(proj["bias"], -1))
    out = layer["attention"]["out"]
    state[f"{p}.self_attn.o_proj.weight"] = tensor(np.reshape(out["kernel"], (-1, width)).T)
    if "bias" in out:
      state[f"{p}.self_attn.o_proj.bias"] = tensor(out["bias"])
    for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
      state[f"{p}.mlp.{theirs}.weight"] = tensor(np.asarray(layer["mlp"][ours]["kernel"]).T)
  state["lm_head.weight"] = (state["model.embed_tokens.weight"] if model.tie_embeddings
                             else tensor(np.asarray(params["unembedding"]["kernel"]).T))
  framework = cls(config)
  framework.load_state_dict(state, strict=True)
  return framework.eval()


def from_transformers(model: Any) -> tuple[Any, dict[str, Any]]:
  """`(big_attn_model, variables)` computing the same function as the transformers `model`.

  Args:
    model: a transformers `PreTrainedModel` of a supported class (see the module docstring),
      e.g. `LlamaForCausalLM.from_pretrained(DIR)`.
  Returns:
    The big_attn Flax module (its `attention` field picks the op; any registered op runs with
    the converted weights) and its variables as float32 NumPy arrays (copies): `{"params":
    ...}`, and `"batch_stats"` (BatchNorm running statistics) for CvT.
  Raises:
    ConversionError: an unsupported class, or a config field without a big_attn equivalent.
  """
  config = getattr(model, "config", None)
  kind = getattr(config, "model_type", None)
  if kind not in _CONVERTERS:
    raise ConversionError(f"config.model_type={kind!r} ({type(model).__name__}) is not "
                          f"supported; expected one of {sorted(_CONVERTERS)}")
  cls_name = type(model).__name__
  sd = StateDict(model.state_dict(), source=cls_name)
  big_model, variables = _CONVERTERS[kind](config, sd, cls_name)
  sd.check_all_read()
  # copies: NumPy views would share memory with the torch tensors (and see later updates)
  return big_model, jax.tree.map(np.array, variables)
