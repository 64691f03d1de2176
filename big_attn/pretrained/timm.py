"""timm (PyTorch Image Models) checkpoints as big_attn models computing the same function.

    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval()
    module, variables = from_timm(model)                      # big_attn.models.vit.Model
    logits = module.apply(variables, images_nhwc, train=False)

    state_dict = torch.load("vit_base_patch16_224.pth")       # or safetensors.torch.load_file
    module, variables = from_timm("vit_base_patch16_224", state_dict)

Supported: timm's VisionTransformer (`vit_*`, with registers, "token"/"avg"/"map" pooling; the
DeiTs without distillation), distilled DeiT (`deit_*_distilled_*`, the two heads averaged at
eval), ConvNeXt (`convnext_*`), MaxViT in the authors' TensorFlow layout (`maxvit_*_tf_*`,
BatchNorm statistics in `variables["batch_stats"]`), PoolFormer v1 (`poolformer_*`) and DaViT
(`davit_*`). The converted model takes `[batch, H, W, C]` images (timm's are `[batch, C, H, W]`)
of the timm model's own size (timm's `dynamic_img_size` resampling is not reproduced). Keyword
overrides go to the big_attn model (e.g. `attention="sigmoid"` to fine-tune the weights with
another op, `scan_layers=True`). A configuration the big_attn family cannot express raises
`ConversionError` naming the timm field.
"""
from __future__ import annotations

from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.models import convnext, deit, hvit, maxvit, metaformer, vit
from big_attn.pretrained._common import (ConversionError, StateDict, take_batch_norm, take_conv,
                                         take_dense, take_norm)


def from_timm(model: Any, state_dict: Any = None, **overrides) -> tuple[Any, dict[str, Any]]:
  """`(big_attn Model, variables)` computing the function of a timm model in eval mode.

  Args:
    model: a timm model (its own weights are converted), or a timm model name such as
      "vit_base_patch16_224" (the architecture is built with random weights, then `state_dict`
      loaded into it; its classifier width is read from the state dict).
    state_dict: with a name: the checkpoint's tensors (`torch.load` / safetensors); with a
      model: optional tensors that replace the model's own.
    **overrides: fields of the big_attn Model (attention op, dtype, dropout, ...).
  """
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(model, str):
    if state_dict is None:
      raise ValueError(f"from_timm({model!r}) needs the checkpoint's state_dict (nothing is "
                       "downloaded)")
    model = _create(timm, model, state_dict)
  if not isinstance(model, torch.nn.Module):
    raise TypeError(f"model must be a timm model or a timm model name, got "
                    f"{type(model).__name__}")
  if state_dict is not None:
    try:
      model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
      raise ConversionError(f"state_dict does not fit {type(model).__name__}: {e}") from e
  for cls_name, converter in _CONVERTERS:
    if type(model).__name__ == cls_name:
      name = getattr(model, "pretrained_cfg", {}).get("architecture") or cls_name
      sd = StateDict(model.state_dict(), source=name)
      module_cls, kwargs, params, extra, image_hw = converter(model, sd)
      sd.check_all_read()
      module = module_cls(**{**kwargs, **overrides})
      if overrides.get("scan_layers"):
        params = _scan_blocks(params)
      return module, _fit(module, {"params": params, **extra}, image_hw, name)
  raise ConversionError(f"timm model class {type(model).__name__} has no big_attn converter; "
                        f"supported: {', '.join(name for name, _ in _CONVERTERS)}")


def _create(timm: Any, name: str, state_dict: Any) -> Any:
  """The timm architecture `name` with random weights and the state dict's classifier width."""
  probe = timm.create_model(name, pretrained=False)
  classifier = probe.pretrained_cfg.get("classifier", "head")
  classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
  weight = state_dict.get(f"{classifier}.weight")
  num_classes = 0 if weight is None else int(weight.shape[0])
  if num_classes == probe.num_classes:
    return probe
  return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _fit(module: Any, variables: dict[str, Any], image_hw: tuple[int, int], source: str
         ) -> dict[str, Any]:
  """`variables` checked against the shapes `module` creates for `[1, *image_hw, 3]` images,
  and cast to its dtypes (a `param_dtype` override).

  A converted tensor the module does not create, or of another shape, is a ConversionError.
  Variables the checkpoint cannot provide (an overriding attention op's own parameters) are
  initialised by the module, and logged.
  """
  images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
  init = lambda rng, x: nn.meta.unbox(module.init(rng, x, train=False))
  expected = jax.eval_shape(init, jax.random.key(0), images)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  extra = sorted(set(flat) - set(want))
  wrong = sorted(k for k in set(flat) & set(want) if np.shape(flat[k]) != want[k].shape)
  if extra or wrong:
    raise ConversionError(
        f"{source}: the converted tensors do not fit {type(module).__module__}.Model: "
        f"not created by it: {extra[:6]}; other shapes: "
        f"{[(k, np.shape(flat[k]), want[k].shape) for k in wrong[:6]]}")
  flat = {k: np.asarray(v, want[k].dtype) for k, v in flat.items()}
  missing = sorted(set(want) - set(flat))
  if not missing:
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[jax.tree_util.keystr(path)],
                                            variables)
  logging.info("%s: initialising %d tensors the checkpoint has no values for: %s", source,
               len(missing), ", ".join(missing[:8]))
  fresh = jax.jit(init)(jax.random.key(0), jnp.zeros(images.shape, images.dtype))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: flat.get(jax.tree_util.keystr(path), leaf), fresh)


def _scan_blocks(params: dict[str, Any]) -> dict[str, Any]:
  """ViT parameters with `encoderblock_{i}` stacked into one `encoderblock` (`scan_layers`)."""
  encoder = dict(params["Transformer"])
  names = sorted((k for k in encoder if k.startswith("encoderblock_")),
                 key=lambda k: int(k.rsplit("_", 1)[1]))
  blocks = [encoder.pop(k) for k in names]
  encoder["encoderblock"] = _tree_stack(blocks)
  return {**params, "Transformer": encoder}


def _tree_stack(trees: list[Any]) -> Any:
  if isinstance(trees[0], dict):
    return {k: _tree_stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


# --------------------------------------------------------------------------------- Shared pieces
def _require(condition: bool, source: str, field: str, message: str) -> None:
  if not condition:
    raise ConversionError(f"{source}: {field} {message}")


def _eps(module: Any) -> float | None:
  return getattr(module, "eps", None)


def _check_eps(source: str, field: str, module: Any, expected: float) -> None:
  eps = _eps(module)
  _require(eps is not None and np.isclose(eps, expected, rtol=1e-3, atol=0), source,
           f"{field}.eps", f"is {eps}; the big_attn model uses {expected}")


def _check_gelu(source: str, field: str, act: Any) -> bool:
  """True for a tanh-approximate GELU, False for the exact one; other activations refused."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(act, torch.nn.GELU):
    return act.approximate == "tanh"
  if isinstance(act, (timm.layers.activations.GELU, timm.layers.activations.GELUTanh)):
    return isinstance(act, timm.layers.activations.GELUTanh)
  raise ConversionError(f"{source}: {field} is {type(act).__name__}; the big_attn model uses "
                        "GELU")


def _attention(qkv_weight: np.ndarray, qkv_bias: np.ndarray | None, proj: dict[str, np.ndarray],
               num_heads: int) -> dict[str, Any]:
  """A fused `qkv` Linear (`[3·D, D]`) and its output projection -> `layers.Attention` params."""
  width = qkv_weight.shape[1]
  head_dim = qkv_weight.shape[0] // 3 // num_heads
  q, k, v = np.split(qkv_weight, 3, axis=0)
  biases = np.split(qkv_bias, 3) if qkv_bias is not None else (None,) * 3
  out = {}
  for name, weight, bias in zip(("query", "key", "value"), (q, k, v), biases):
    out[name] = {"kernel": weight.T.reshape(width, num_heads, head_dim)}
    if bias is not None:
      out[name]["bias"] = bias.reshape(num_heads, head_dim)
  out["out"] = {"kernel": proj["kernel"].reshape(num_heads, head_dim, -1)}
  if "bias" in proj:
    out["out"]["bias"] = proj["bias"]
  return out


# ------------------------------------------------------------------------------ ViT and DeiT
def _vit_blocks(model: Any, sd: StateDict, source: str) -> tuple[dict[str, Any], bool]:
  """timm `blocks.{i}` -> `encoderblock_{i}` parameters (LayerScales included), and whether
  GELU is tanh-approximate."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  blocks, approximate = {}, None
  layer_scale = not isinstance(model.blocks[0].ls1, torch.nn.Identity)
  for i, block in enumerate(model.blocks):
    field = f"blocks.{i}"
    _require(type(block) is timm.models.vision_transformer.Block, source, field,
             f"is {type(block).__name__}; only the pre-norm Block converts")
    for name in ("ls1", "ls2"):
      _require(isinstance(getattr(block, name), torch.nn.Identity) != layer_scale, source,
               f"{field}.{name}", "must be a LayerScale in every block or in none")
    attn, mlp = block.attn, block.mlp
    _require(type(attn) is timm.models.vision_transformer.Attention, source, f"{field}.attn",
             f"is {type(attn).__name__}; only timm's Attention converts")
    for name in ("q_norm", "k_norm", "norm"):
      _require(isinstance(getattr(attn, name, torch.nn.Identity()), torch.nn.Identity), source,
               f"{field}.attn.{name}", "is set (qk_norm / scale_attn_norm); not supported")
    _require(type(mlp) is timm.layers.Mlp and isinstance(mlp.norm, torch.nn.Identity), source,
             f"{field}.mlp", f"is {type(mlp).__name__} with norm {type(mlp.norm).__name__}; "
             "only the plain Mlp converts")
    approximate = _check_gelu(source, f"{field}.mlp.act", mlp.act)
    for name in ("norm1", "norm2"):
      _check_eps(source, f"{field}.{name}", getattr(block, name), 1e-6)
    qkv_bias = sd.take(f"{field}.attn.qkv.bias") if attn.qkv.bias is not None else None
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": take_norm(sd, f"{field}.norm1"),
        "MultiHeadAttention": _attention(
            sd.take(f"{field}.attn.qkv.weight"), qkv_bias,
            take_dense(sd, f"{field}.attn.proj", attn.proj.bias is not None), attn.num_heads),
        "LayerNorm_1": take_norm(sd, f"{field}.norm2"),
        "MlpBlock": {"Dense_0": take_dense(sd, f"{field}.mlp.fc1"),
                     "Dense_1": take_dense(sd, f"{field}.mlp.fc2")}}
    if layer_scale:
      blocks[f"encoderblock_{i}"].update(layer_scale_1=sd.take(f"{field}.ls1.gamma"),
                                         layer_scale_2=sd.take(f"{field}.ls2.gamma"))
    _require(attn.qkv.bias is not None and attn.proj.bias is not None, source,
             f"{field}.attn", "has no qkv/proj bias (qkv_bias=False); big_attn's ViT has both")
  return blocks, approximate


def _layer_scale_init(model: Any) -> float | None:
  """timm's `init_values` as the big_attn ViT's `layer_scale_init` (None without LayerScale);
  only the initialiser, the converted scales are the checkpoint's."""
  import torch  # pylint: disable=import-outside-toplevel
  ls1 = model.blocks[0].ls1
  return None if isinstance(ls1, torch.nn.Identity) else 1e-5


def _vit_embedding(model: Any, sd: StateDict, source: str, token_names: tuple[str, ...]
                   ) -> dict[str, Any]:
  """Patch embedding, position embedding (patches only) and the prefix tokens with their
  position embeddings folded in (a learned token plus a learned position is one vector)."""
  import torch  # pylint: disable=import-outside-toplevel
  embed = model.patch_embed
  proj = embed.proj
  _require(isinstance(proj, torch.nn.Conv2d) and proj.kernel_size == proj.stride
           and proj.padding == (0, 0), source, "patch_embed.proj",
           "must be a non-overlapping patch convolution")
  _require(isinstance(embed.norm, torch.nn.Identity), source, "patch_embed.norm",
           "is set (embed_norm_layer); not supported")
  _require(model.pos_embed is not None, source, "pos_embed",
           "is None (pos_embed='none'); the big_attn ViT adds a learned position embedding")
  _require(isinstance(model.norm_pre, torch.nn.Identity), source, "norm_pre",
           "is set (pre_norm); the big_attn ViT has no norm before the blocks")
  params = {"embedding": take_conv(sd, "patch_embed.proj")}
  pos = sd.take("pos_embed")[0]
  tokens = [sd.take(key)[0] for key in token_names]  # each [n, width]
  num_prefix = sum(len(t) for t in tokens)
  if not model.no_embed_class:
    prefix_pos, pos = pos[:num_prefix], pos[num_prefix:]
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    tokens = [t + prefix_pos[a:b] for t, a, b in zip(tokens, offsets[:-1], offsets[1:])]
  params["posemb"] = {"pos_embedding": pos}
  for key, value in zip(token_names, tokens):
    params[key] = value
  return params


def _vit_final_norm(model: Any, sd: StateDict, source: str, fc_norm: bool
                    ) -> dict[str, np.ndarray]:
  """The final LayerNorm's parameters (timm's `fc_norm` after pooling, or `norm` before it)."""
  import torch  # pylint: disable=import-outside-toplevel
  if fc_norm:
    _require(isinstance(model.norm, torch.nn.Identity), source, "norm",
             "and fc_norm are both set; the big_attn ViT has one final norm")
  else:
    _require(not isinstance(model.norm, torch.nn.Identity), source, "norm",
             "is Identity (final_norm=False); the big_attn ViT has a final norm")
  name = "fc_norm" if fc_norm else "norm"
  _check_eps(source, name, getattr(model, name), 1e-6)
  return take_norm(sd, name)


def _convert_vit(model: Any, sd: StateDict):
  """timm VisionTransformer (`vit_*`, and the DeiTs without distillation) ->
  `big_attn.models.vit.Model`."""
  import torch  # pylint: disable=import-outside-toplevel
  source = sd.source
  pool = model.global_pool
  _require(pool in ("token", "avg", "map"), source, "global_pool",
           f"is {pool!r}; big_attn's ViT pools with 'token', 'avg' or 'map'")
  _require(not model.pool_include_prefix, source, "pool_include_prefix",
           "is set; big_attn pools over the patch tokens only")
  if pool == "token":
    _require(model.has_class_token, source, "class_token", "is False with global_pool='token'")
  else:
    _require(not model.has_class_token, source, "class_token",
             f"is True with global_pool={pool!r}; big_attn's ViT has a class token only for "
             "'token' pooling")
  fc_norm = not isinstance(model.fc_norm, torch.nn.Identity)
  token_names = (("cls_token",) if model.has_class_token else ()) + (
      ("reg_token",) if model.num_reg_tokens else ())
  embedding = _vit_embedding(model, sd, source, token_names)
  blocks, approximate = _vit_blocks(model, sd, source)
  params = {"embedding": embedding["embedding"], "posemb": embedding["posemb"],
            "Transformer": blocks}
  if model.has_class_token:
    params["cls"] = embedding["cls_token"]
  if model.num_reg_tokens:
    params["registers"] = embedding["reg_token"]
  if fc_norm:
    params["fc_norm"] = _vit_final_norm(model, sd, source, fc_norm)
  else:
    params["Transformer"]["encoder_norm"] = _vit_final_norm(model, sd, source, fc_norm)
  if pool == "map":
    params["MAPHead"] = _map_head(model.attn_pool, sd, source, approximate)
  num_classes = model.num_classes
  if num_classes:
    params["head"] = take_dense(sd, "head")
  block = model.blocks[0]
  kwargs = dict(num_classes=num_classes, width=model.embed_dim, depth=len(model.blocks),
                num_heads=block.attn.num_heads, mlp_dim=block.mlp.fc1.out_features,
                patch_size=tuple(model.patch_embed.proj.kernel_size),
                approximate_gelu=approximate, layer_scale_init=_layer_scale_init(model))
  kwargs.update(pool_type={"token": "cls", "avg": "gap", "map": "map"}[pool], fc_norm=fc_norm,
                num_registers=model.num_reg_tokens)
  return vit.Model, kwargs, params, {}, tuple(model.patch_embed.img_size)


def _map_head(pool: Any, sd: StateDict, source: str, approximate: bool) -> dict[str, Any]:
  """timm AttentionPoolLatent -> `vit.MAPHead` parameters."""
  import torch  # pylint: disable=import-outside-toplevel
  _require(pool.latent_len == 1 and pool.pool == "token" and pool.pos_embed is None, source,
           "attn_pool", "must have one latent query, token pooling and no position embedding")
  _require(isinstance(pool.q_norm, torch.nn.Identity), source, "attn_pool.q_norm",
           "is set (qk_norm); not supported")
  _require(pool.mlp is not None, source, "attn_pool.mlp", "is None; big_attn's MAPHead has one")
  _require(_check_gelu(source, "attn_pool.mlp.act", pool.mlp.act) == approximate, source,
           "attn_pool.mlp.act", "differs from the blocks' GELU")
  _check_eps(source, "attn_pool.norm", pool.norm, 1e-6)
  prefix = "attn_pool"
  kv = sd.take(f"{prefix}.kv.weight")
  kv_bias = sd.take(f"{prefix}.kv.bias")
  q = take_dense(sd, f"{prefix}.q")
  weight = np.concatenate([q["kernel"].T, kv], axis=0)
  bias = np.concatenate([q["bias"], kv_bias])
  return {"probe": sd.take(f"{prefix}.latent")[0],
          "MultiHeadAttention": _attention(weight, bias, take_dense(sd, f"{prefix}.proj"),
                                           pool.num_heads),
          "LayerNorm_0": take_norm(sd, f"{prefix}.norm"),
          "MlpBlock": {"Dense_0": take_dense(sd, f"{prefix}.mlp.fc1"),
                       "Dense_1": take_dense(sd, f"{prefix}.mlp.fc2")}}


def _convert_deit_distilled(model: Any, sd: StateDict):
  """timm VisionTransformerDistilled -> `big_attn.models.deit.Model` (distilled)."""
  import torch  # pylint: disable=import-outside-toplevel
  source = sd.source
  _require(model.global_pool == "token" and not model.num_reg_tokens
           and isinstance(model.fc_norm, torch.nn.Identity), source, "global_pool",
           "must be 'token' without registers or fc_norm for a distilled DeiT")
  embedding = _vit_embedding(model, sd, source, ("cls_token", "dist_token"))
  blocks, approximate = _vit_blocks(model, sd, source)
  blocks["encoder_norm"] = _vit_final_norm(model, sd, source, fc_norm=False)
  _require(model.num_classes > 0, source, "num_classes", "is 0; a distilled DeiT has heads")
  params = {"embedding": embedding["embedding"], "posemb": embedding["posemb"],
            "cls": embedding["cls_token"], "dist": embedding["dist_token"],
            "Transformer": blocks, "head": take_dense(sd, "head"),
            "head_dist": take_dense(sd, "head_dist")}
  block = model.blocks[0]
  kwargs = dict(num_classes=model.num_classes, width=model.embed_dim, depth=len(model.blocks),
                num_heads=block.attn.num_heads, mlp_dim=block.mlp.fc1.out_features,
                patch_size=tuple(model.patch_embed.proj.kernel_size), distilled=True,
                approximate_gelu=approximate)
  return deit.Model, kwargs, params, {}, tuple(model.patch_embed.img_size)


# ---------------------------------------------------------------------------------- ConvNeXt
def _convert_convnext(model: Any, sd: StateDict):
  """timm ConvNeXt -> `big_attn.models.convnext.Model`."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  source = sd.source
  stem = model.stem
  _require(isinstance(stem[0], torch.nn.Conv2d) and stem[0].kernel_size == stem[0].stride
           and len(stem) == 2, source, "stem", "must be a patchify conv and a norm ('patch')")
  _check_eps(source, "stem.1", stem[1], 1e-6)
  stem_size = stem[0].kernel_size[0]
  params = {"stem": take_conv(sd, "stem.0"), "stem_norm": take_norm(sd, "stem.1")}
  depths, dims, kernel, layer_scale = [], [], None, None
  for s, stage in enumerate(model.stages):
    if s:
      down = stage.downsample
      _require(len(down) == 2 and down[1].kernel_size == (2, 2) == down[1].stride, source,
               f"stages.{s}.downsample", "must be a norm and a 2x2 stride-2 conv")
      _check_eps(source, f"stages.{s}.downsample.0", down[0], 1e-6)
      params[f"downsample_norm_{s}"] = take_norm(sd, f"stages.{s}.downsample.0")
      params[f"downsample_{s}"] = take_conv(sd, f"stages.{s}.downsample.1")
    else:
      _require(isinstance(stage.downsample, torch.nn.Identity), source,
               "stages.0.downsample", "is set; the big_attn ConvNeXt's first stage keeps the "
               "stem's resolution")
    for i, block in enumerate(stage.blocks):
      field = f"stages.{s}.blocks.{i}"
      _require(isinstance(block.shortcut, torch.nn.Identity), source, f"{field}.shortcut",
               "is set; not supported")
      mlp = block.mlp
      _require(type(mlp) in (timm.layers.Mlp,) and isinstance(mlp.norm, torch.nn.Identity),
               source, f"{field}.mlp", f"is {type(mlp).__name__} (GRN of ConvNeXt V2?); only "
               "the plain MLP converts")
      _require(not _check_gelu(source, f"{field}.mlp.act", mlp.act), source,
               f"{field}.mlp.act", "is tanh-approximate; the big_attn ConvNeXt uses exact GELU")
      _check_eps(source, f"{field}.norm", block.norm, 1e-6)
      kernel = block.conv_dw.kernel_size[0]
      layer_scale = block.gamma is not None
      p = {"dwconv": take_conv(sd, f"{field}.conv_dw"), "norm": take_norm(sd, f"{field}.norm"),
           "pwconv1": take_dense(sd, f"{field}.mlp.fc1"),
           "pwconv2": take_dense(sd, f"{field}.mlp.fc2")}
      if layer_scale:
        p["gamma"] = sd.take(f"{field}.gamma")
      params[f"stage_{s}_block_{i}"] = p
    depths.append(len(stage.blocks))
    dims.append(stage.blocks[0].conv_dw.out_channels)
  head = model.head
  _require(type(head) is timm.layers.NormMlpClassifierHead and head.global_pool.pool_type == "avg"
           and isinstance(head.pre_logits, torch.nn.Identity), source, "head",
           "must be average pooling, norm and a linear classifier (no head_hidden_size)")
  _check_eps(source, "head.norm", head.norm, 1e-6)
  params["head_norm"] = take_norm(sd, "head.norm")
  if model.num_classes:
    params["head"] = take_dense(sd, "head.fc")
  kwargs = dict(num_classes=model.num_classes, depths=tuple(depths), dims=tuple(dims),
                stem_size=stem_size, kernel_size=kernel,
                layer_scale_init=1e-6 if layer_scale else 0.0)
  side = stem_size * 2 ** (len(depths) - 1)
  return convnext.Model, kwargs, params, {}, (side, side)


# ------------------------------------------------------------------------------------ MaxViT
def _batch_norm(model_bn: Any, sd: StateDict, prefix: str, stats: dict[str, Any], name: str,
                source: str, eps: float) -> dict[str, np.ndarray]:
  """A torch BatchNorm2d: `{scale, bias}` returned, `{mean, var}` put in `stats[name]`."""
  _require(model_bn.affine and model_bn.track_running_stats, source, prefix,
           "must be an affine BatchNorm with running statistics")
  _check_eps(source, prefix, model_bn, eps)
  return take_batch_norm(sd, prefix, stats, name)


def _partition_attention(block: Any, sd: StateDict, prefix: str, source: str) -> dict[str, Any]:
  """timm PartitionAttentionCl (TF layout) -> `maxvit.PartitionAttention` parameters."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  attn = block.attn
  _require(not attn.head_first, source, f"{prefix}.attn.head_first",
           "is True (timm's own `_rw` layout); only the TensorFlow MaxViT layout converts")
  _require(type(attn.rel_pos) is timm.layers.RelPosBiasTf, source, f"{prefix}.attn.rel_pos",
           f"is {type(attn.rel_pos).__name__}; big_attn's window/grid ops take the TensorFlow "
           "relative position bias (rel_pos_type='bias_tf')")
  for name in ("ls1", "ls2"):
    _require(isinstance(getattr(block, name), torch.nn.Identity), source, f"{prefix}.{name}",
             "is a LayerScale (init_values); not supported")
  _require(_check_gelu(source, f"{prefix}.mlp.act", block.mlp.act), source, f"{prefix}.mlp.act",
           "is the exact GELU; big_attn's MaxViT uses the tanh approximation (act_layer "
           "'gelu_tanh')")
  proj = take_dense(sd, f"{prefix}.attn.proj")
  mha = _attention(sd.take(f"{prefix}.attn.qkv.weight"), sd.take(f"{prefix}.attn.qkv.bias"),
                   proj, attn.num_heads)
  # timm (the TensorFlow code) indexes the table by key minus query position; big_attn's ops
  # by query minus key (Swin): the same table flipped along both offsets.
  table = sd.take(f"{prefix}.attn.rel_pos.relative_position_bias_table")
  mha["op_params"] = {"rpb": np.ascontiguousarray(table[:, ::-1, ::-1])}
  return {"LayerNorm_0": take_norm(sd, f"{prefix}.norm1"), "MultiHeadAttention": mha,
          "LayerNorm_1": take_norm(sd, f"{prefix}.norm2"),
          "MlpBlock": {"Dense_0": take_dense(sd, f"{prefix}.mlp.fc1"),
                       "Dense_1": take_dense(sd, f"{prefix}.mlp.fc2")}}


def _convert_maxvit(model: Any, sd: StateDict):
  """timm MaxxVit with MaxViT blocks in the TensorFlow layout (`maxvit_*_tf_*`) ->
  `big_attn.models.maxvit.Model` (BatchNorm statistics in `batch_stats`)."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  mx = timm.models.maxxvit
  source = sd.source
  stem = model.stem
  _require(isinstance(stem.norm1, timm.layers.BatchNormAct2d), source, "stem.norm1",
           f"is {type(stem.norm1).__name__}; expected BatchNorm")
  bn_eps = stem.norm1.eps
  _require(stem.conv1.stride == (2, 2) and stem.conv1.bias is not None
           and stem.conv2.bias is not None, source, "stem",
           "must be a 3x3/2 and a 3x3 conv with biases (stem_bias=True)")
  _require(_check_gelu(source, "stem.norm1.act", stem.norm1.act), source, "stem.norm1.act",
           "is the exact GELU; big_attn's MaxViT uses the tanh approximation")
  stats = {}
  params = {"stem_conv_0": take_conv(sd, "stem.conv1"),
            "stem_norm": _batch_norm(stem.norm1, sd, "stem.norm1", stats, "stem_norm", source,
                                     bn_eps),
            "stem_conv_1": take_conv(sd, "stem.conv2")}
  dims, depths, partition, head_dim, ln_eps = [], [], None, None, None
  for s, stage in enumerate(model.stages):
    for i, block in enumerate(stage.blocks):
      field = f"stages.{s}.blocks.{i}"
      _require(type(block) is mx.MaxxVitBlock and block.nchw_attn is False, source, field,
               f"is {type(block).__name__}; only MaxViT blocks (channels-last attention) "
               "convert")
      conv = block.conv
      _require(type(conv) is mx.MbConvBlock, source, f"{field}.conv",
               f"is {type(conv).__name__}; expected MbConvBlock")
      _require(isinstance(conv.pre_norm.act, torch.nn.Identity), source,
               f"{field}.conv.pre_norm", "has an activation (pre_norm_act); not supported")
      _require(isinstance(conv.down, torch.nn.Identity), source, f"{field}.conv.down",
               "is set (stride_mode 'pool' or '1x1'); big_attn strides the depthwise conv")
      _require(type(conv.se) is timm.layers.SEModule
               and isinstance(conv.se.act, torch.nn.SiLU), source, f"{field}.conv.se",
               "must be squeeze-excitation with SiLU (attn_layer 'se', attn_act_layer 'silu')")
      for name in ("norm1", "norm2"):
        _require(_check_gelu(source, f"{field}.conv.{name}.act", getattr(conv, name).act),
                 source, f"{field}.conv.{name}.act", "is the exact GELU; big_attn's MaxViT "
                 "uses the tanh approximation")
      p = f"{field}.conv"
      mb, mb_stats = {}, {}
      mb["pre_norm"] = _batch_norm(conv.pre_norm, sd, f"{p}.pre_norm", mb_stats, "pre_norm",
                                   source, bn_eps)
      if not isinstance(conv.shortcut, torch.nn.Identity):
        shortcut = conv.shortcut
        _require(isinstance(shortcut.expand, torch.nn.Identity) or shortcut.expand.bias
                 is not None, source, f"{p}.shortcut.expand", "has no bias (output_bias)")
        if not isinstance(shortcut.expand, torch.nn.Identity):
          mb["shortcut"] = take_dense(sd, f"{p}.shortcut.expand")
      mb["expand"] = take_dense(sd, f"{p}.conv1_1x1", bias=False)
      mb["norm_1"] = _batch_norm(conv.norm1, sd, f"{p}.norm1", mb_stats, "norm_1", source,
                                 bn_eps)
      mb["depthwise"] = take_conv(sd, f"{p}.conv2_kxk", bias=False)
      mb["norm_2"] = _batch_norm(conv.norm2, sd, f"{p}.norm2", mb_stats, "norm_2", source,
                                 bn_eps)
      mb["se_reduce"] = take_dense(sd, f"{p}.se.fc1")
      mb["se_expand"] = take_dense(sd, f"{p}.se.fc2")
      mb["project"] = take_dense(sd, f"{p}.conv3_1x1")
      _require(block.attn_block is not None, source, f"{field}.attn_block",
               "is None (no_block_attn); big_attn's MaxViT has block and grid attention")
      params[f"stage_{s}_block_{i}"] = {
          "MBConv": mb,
          "block_attention": _partition_attention(block.attn_block, sd, f"{field}.attn_block",
                                                  source),
          "grid_attention": _partition_attention(block.attn_grid, sd, f"{field}.attn_grid",
                                                 source)}
      stats[f"stage_{s}_block_{i}"] = {"MBConv": mb_stats}
      window = tuple(block.attn_block.partition_size)
      _require(window == tuple(block.attn_grid.partition_size)
               and partition in (None, window), source, f"{field}.attn_grid.partition_size",
               f"{block.attn_grid.partition_size} differs from the window {window} or from "
               f"earlier stages' {partition}")
      partition = window
      head_dim = block.attn_block.attn.dim_head
      ln_eps = block.attn_block.norm1.eps
    depths.append(len(stage.blocks))
    dims.append(stage.blocks[0].conv.conv3_1x1.out_channels)
  _require(isinstance(model.norm, torch.nn.Identity), source, "norm",
           "is set; big_attn's MaxViT norms in the head")
  head = model.head
  _require(type(head) is timm.layers.NormMlpClassifierHead
           and head.global_pool.pool_type == "avg", source, "head",
           "must be average pooling, norm, optional pre-logits and a classifier")
  _check_eps(source, "head.norm", head.norm, ln_eps)
  params["head_norm"] = take_norm(sd, "head.norm")
  head_hidden = 0
  if not isinstance(head.pre_logits, torch.nn.Identity):
    _require(isinstance(head.pre_logits.act, (torch.nn.Tanh, timm.layers.activations.Tanh)),
             source, "head.pre_logits.act",
             "must be tanh")
    params["pre_logits"] = take_dense(sd, "head.pre_logits.fc")
    head_hidden = head.pre_logits.fc.out_features
  if model.num_classes:
    params["head"] = take_dense(sd, "head.fc")
  kwargs = dict(num_classes=model.num_classes, embed_dims=tuple(dims), depths=tuple(depths),
                stem_width=stem.conv1.out_channels, head_hidden=head_hidden, head_dim=head_dim,
                partition_size=partition,
                expansion=model.stages[0].blocks[0].conv.conv1_1x1.out_channels / dims[0],
                conv_norm="batch", batch_norm_eps=bn_eps, layer_norm_eps=ln_eps)
  factor = 2 ** (len(depths) + 1)  # the stem and every stage halve the map
  return (maxvit.Model, kwargs, params, {"batch_stats": stats},
          (factor * partition[0], factor * partition[1]))


# -------------------------------------------------------------------------------- PoolFormer
def _convert_poolformer(model: Any, sd: StateDict):
  """timm MetaFormer with pooling mixers (`poolformer_*`, v1) -> `big_attn.models.metaformer`."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  mf = timm.models.metaformer
  source = sd.source
  _require(isinstance(model.stem.norm, torch.nn.Identity)
           and model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (4, 4)
           and model.stem.conv.padding == (2, 2), source, "stem",
           "must be PoolFormer's 7x7/4 conv (padding 2) without a norm")
  params = {"stem": take_conv(sd, "stem.conv")}
  depths, dims, approximate, mlp_ratio = [], [], None, None
  for s, stage in enumerate(model.stages):
    if s:
      down = stage.downsample
      _require(not isinstance(down, torch.nn.Identity), source, f"stages.{s}.downsample",
               "is Identity (equal widths); big_attn's MetaFormer downsamples every stage")
      _require(isinstance(down.norm, torch.nn.Identity) and down.conv.kernel_size == (3, 3)
               and down.conv.stride == (2, 2) and down.conv.padding == (1, 1), source,
               f"stages.{s}.downsample", "must be a 3x3/2 conv (padding 1) without a norm")
      params[f"downsample_{s}"] = take_conv(sd, f"stages.{s}.downsample.conv")
    for i, block in enumerate(stage.blocks):
      field = f"stages.{s}.blocks.{i}"
      mixer = block.token_mixer
      _require(type(mixer) is mf.Pooling and mixer.pool.kernel_size == 3
               and not mixer.pool.count_include_pad, source, f"{field}.token_mixer",
               f"is {type(mixer).__name__}; only PoolFormer's 3x3 pooling converts")
      for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        _require(type(norm) is timm.layers.GroupNorm1 and norm.affine, source,
                 f"{field}.{name}", f"is {type(norm).__name__}; expected GroupNorm(1) (v1)")
        _check_eps(source, f"{field}.{name}", norm, 1e-5)
      for name in ("res_scale1", "res_scale2"):
        _require(isinstance(getattr(block, name), torch.nn.Identity), source,
                 f"{field}.{name}", "is set (res_scale); not supported")
      _require(isinstance(block.mlp.norm, torch.nn.Identity), source, f"{field}.mlp.norm",
               "is set; not supported")
      approximate = _check_gelu(source, f"{field}.mlp.act", block.mlp.act)
      mlp_ratio = block.mlp.fc1.out_channels / block.mlp.fc1.in_channels
      params[f"stage_{s}_block_{i}"] = {
          "norm1": take_norm(sd, f"{field}.norm1"), "norm2": take_norm(sd, f"{field}.norm2"),
          "layer_scale1": sd.take(f"{field}.layer_scale1.scale").reshape(-1),
          "layer_scale2": sd.take(f"{field}.layer_scale2.scale").reshape(-1),
          "mlp": {"Dense_0": take_dense(sd, f"{field}.mlp.fc1"),
                  "Dense_1": take_dense(sd, f"{field}.mlp.fc2")}}
    depths.append(len(stage.blocks))
    dims.append(stage.blocks[0].mlp.fc2.out_channels)
  head = model.head
  _require(head.global_pool.pool_type == "avg" and not hasattr(head.fc, "fc1"), source, "head",
           "must be average pooling, norm and a linear classifier (no MLP head)")
  _check_eps(source, "head.norm", head.norm, 1e-6)
  params["norm"] = take_norm(sd, "head.norm")
  if model.num_classes:
    params["head"] = take_dense(sd, "head.fc")
  kwargs = dict(num_classes=model.num_classes, depths=tuple(depths), dims=tuple(dims),
                mlp_ratio=mlp_ratio, mixers="pool", approximate_gelu=approximate,
                head_norm="layer")
  return metaformer.Model, kwargs, params, {}, (32, 32)


# ------------------------------------------------------------------------------------- DaViT
def _convert_davit(model: Any, sd: StateDict):
  """timm DaVit -> `big_attn.models.hvit.Model(family="davit")`.

  timm pads a stage's map up to a multiple of the window; big_attn's windows must divide the
  map (or are clipped to a smaller map), so the two agree where every stage's map is a multiple
  of `window_size` (224x224 with windows of 7).
  """
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  dv = timm.models.davit
  source = sd.source
  stem = model.stem
  _require(stem.conv.kernel_size == (7, 7) and stem.conv.stride == (4, 4)
           and stem.conv.padding == (3, 3), source, "stem.conv",
           "must be DaViT's 7x7/4 conv (padding 3)")
  eps = _eps(stem.norm)
  params = {"stem": take_conv(sd, "stem.conv"), "stem_norm": take_norm(sd, "stem.norm")}
  dims, depths, heads, mlp_ratio, window, approximate = [], [], [], None, None, None
  for s, stage in enumerate(model.stages):
    if s:
      _require(stage.downsample.conv.kernel_size == (2, 2) == stage.downsample.conv.stride,
               source, f"stages.{s}.downsample", "must be a norm and a 2x2/2 conv")
      _check_eps(source, f"stages.{s}.downsample.norm", stage.downsample.norm, eps)
      params[f"downsample_{s}_norm"] = take_norm(sd, f"stages.{s}.downsample.norm")
      params[f"downsample_{s}"] = take_conv(sd, f"stages.{s}.downsample.conv")
    j = 0
    for p, pair in enumerate(stage.blocks):
      for q, block in enumerate(pair):
        field = f"stages.{s}.blocks.{p}.{q}"
        expected = (dv.SpatialBlock, dv.ChannelBlock)[q]
        _require(type(block) is expected, source, field,
                 f"is {type(block).__name__}; expected {expected.__name__} (DaViT v1 order)")
        qkv_weight = sd.take(f"{field}.attn.qkv.weight")
        qkv_bias = sd.take(f"{field}.attn.qkv.bias")
        if q == 0:
          window = tuple(block.window_size)
        else:
          _require(type(block.attn) is dv.ChannelAttention, source, f"{field}.attn",
                   f"is {type(block.attn).__name__}; only DaViT v1's ChannelAttention converts")
          # timm computes softmax(s·kᵀv) applied to q; big_attn's op softmax(s·QᵀK) applied
          # to V: the projections take the roles (Q, K, V) = (k, v, q).
          qkv_weight, qkv_bias = (np.concatenate([np.split(t, 3)[i] for i in (1, 2, 0)])
                                  for t in (qkv_weight, qkv_bias))
        for name in ("cpe1", "cpe2"):
          _require(isinstance(getattr(block, name).act, torch.nn.Identity), source,
                   f"{field}.{name}.act", "is set (cpe_act); not supported")
        for name in ("norm1", "norm2"):
          _check_eps(source, f"{field}.{name}", getattr(block, name), eps)
        for name in ("ls1", "ls2"):
          _require(isinstance(getattr(block, name, torch.nn.Identity()), torch.nn.Identity),
                   source, f"{field}.{name}", "is a LayerScale; not supported")
        approximate = _check_gelu(source, f"{field}.mlp.act", block.mlp.act)
        mlp_ratio = block.mlp.fc1.out_features // block.mlp.fc1.in_features
        attn = block.attn
        params[f"stage{s}_block{j}"] = {
            "cpe": take_conv(sd, f"{field}.cpe1.proj"), "norm1": take_norm(sd, f"{field}.norm1"),
            "attention": _attention(qkv_weight, qkv_bias, take_dense(sd, f"{field}.attn.proj"),
                                    attn.num_heads),
            "cpe_mlp": take_conv(sd, f"{field}.cpe2.proj"),
            "norm2": take_norm(sd, f"{field}.norm2"),
            "mlp": {"Dense_0": take_dense(sd, f"{field}.mlp.fc1"),
                    "Dense_1": take_dense(sd, f"{field}.mlp.fc2")}}
        j += 1
    dims.append(stage.blocks[0][0].norm1.normalized_shape[0])
    depths.append(j)
    heads.append(stage.blocks[0][0].attn.num_heads)
  _require(_ensure_four(depths), source, "depths", f"is {tuple(depths)}; hvit has four stages")
  head = model.head
  _require(isinstance(model.norm_pre, torch.nn.Identity) and head.global_pool.pool_type == "avg"
           and isinstance(head.pre_logits, torch.nn.Identity), source, "head",
           "must be average pooling, norm and a linear classifier")
  _check_eps(source, "head.norm", head.norm, eps)
  params["norm"] = take_norm(sd, "head.norm")
  if model.num_classes:
    params["head"] = take_dense(sd, "head.fc")
  _require(window[0] == window[1], source, "window_size", f"is {window}; hvit's is square")
  _require(np.isclose(eps, 1e-5), source, "norm_layer.eps", f"is {eps}; DaViT's is 1e-5")
  kwargs = dict(num_classes=model.num_classes, family="davit", embed_dims=tuple(dims),
                depths=tuple(depths), num_heads=tuple(heads), mlp_ratios=mlp_ratio,
                window_size=window[0], approximate_gelu=approximate)
  return hvit.Model, kwargs, params, {}, (32 * window[0], 32 * window[0])


def _ensure_four(stages: list[Any]) -> bool:
  return len(stages) == 4


# timm class name -> converter returning (big_attn Model class, its fields, params, other
# collections, an image size (h, w) the model accepts)
_CONVERTERS: list[tuple[str, Callable[..., Any]]] = [
    ("VisionTransformer", _convert_vit),
    ("VisionTransformerDistilled", _convert_deit_distilled),
    ("ConvNeXt", _convert_convnext),
    ("MaxxVit", _convert_maxvit),
    ("MetaFormer", _convert_poolformer),
    ("DaVit", _convert_davit),
]

__all__ = ["ConversionError", "from_timm"]
