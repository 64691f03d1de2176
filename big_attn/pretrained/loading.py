"""Pretrained weights from files: `config.init_from` of `big_attn.main`, and the convert CLI.

`init_from` (a dict or ConfigDict) names a local file and how to read it:
- `source="transformers"`: `path` is a directory written by `save_pretrained` (`config.json`
  and `model.safetensors` or `pytorch_model.bin`), or a weights file in one; the class is
  `config.architectures[0]`; converted by `from_transformers`.
- `source="timm"`: `path` is a safetensors or `.pth`/`.bin` state dict of the timm model
  `name` created with `timm.create_model(name, **model_args)`; converted by `from_timm`.
- `source="big_attn"`: `path` is a `.npz` of params (`save_npz`) or a directory written by
  `python -m big_attn.pretrained convert`.

`load_weights` fits the converted parameters to a model's own: shapes must match, except that
a classifier head (`head`, `head_dist`) of another number of classes, or one the checkpoint
lacks, and op-specific parameters (`op_params`, e.g. a gate of `gated_attention`) keep their
fresh initialisation, and a checkpoint head the model has no use for, or a parameter under one
of the model's `removed_parameters()` (a ViT's removed attention layers), is dropped; each case
is logged. Anything else that does not fit raises `ConversionError` naming the parameter.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from big_attn import checkpoint_io as ckpt_lib
from big_attn.pretrained._common import ConversionError
from big_attn.train import step as step_lib

SOURCES = ("transformers", "timm", "big_attn")
KEYS = ("path", "source", "name", "model_args")
HEADS = ("head", "head_dist")  # classifier heads: refitted to the model's number of classes
FRESH = "op_params"  # op-specific parameters (`big_attn.ops.params_module`): initialised fresh
# Model fields a fine-tuning run may set freely (the rest should agree with the checkpoint's
# converted model; a difference is logged). Sizes show in the parameter shapes.
_FREE_FIELDS = frozenset((
    "parent", "name", "num_classes", "variant", "attention", "attention_args", "attention_impl",
    "local_attention", "local_attention_args", "global_attention", "global_attention_args",
    "block_attention", "block_attention_args", "grid_attention", "grid_attention_args",
    "dropout", "drop_path_rate", "head_zeroinit", "head_init_scale", "remat_policy",
    "scan_layers", "dtype", "param_dtype", "mesh", "seq_axis", "seq_strategy", "decode",
    "cache_len", "teacher", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads",
    "head_dim", "patch_size", "depths", "dims", "vocab_size"))
MODEL_FILE = "model.json"


def check_init_from(init_from: Any) -> None:
  """`ValueError` naming the `config.init_from` key that is missing or wrong."""
  unknown = set(init_from.keys()) - set(KEYS)
  if unknown:
    raise ValueError(f"config.init_from has unknown keys {sorted(unknown)}; known: {KEYS}")
  if init_from.get("source") not in SOURCES:
    raise ValueError(f"config.init_from.source must be one of {SOURCES}, got "
                     f"{init_from.get('source')!r}")
  path = init_from.get("path")
  if not isinstance(path, str) or not os.path.exists(path):
    raise ValueError(f"config.init_from.path must be an existing local file or directory, got "
                     f"{path!r}")
  if init_from["source"] == "timm" and not init_from.get("name"):
    raise ValueError("config.init_from.source='timm' needs config.init_from.name, the timm "
                     "model name (e.g. 'vit_tiny_patch16_224')")


def read_state_dict(path: str) -> dict[str, Any]:
  """A torch state dict from a safetensors or `torch.save` (`.pth`, `.bin`, `.pt`) file; a
  training checkpoint's `state_dict`/`model` entry is unwrapped."""
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  if not path.endswith((".pth", ".bin", ".pt")):
    raise ValueError(f"config.init_from.path {path!r}: expected a .safetensors, .pth, .bin or "
                     ".pt file")
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "state_dict_ema"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      return state[key]
  return state


def save_npz(params: Any, path: str) -> None:
  """Writes a params tree as `.npz`, one array per parameter named by its `/`-joined path."""
  flat = {"/".join(_names(k)): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, **flat)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = np.asarray(value)
  return out


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def read_checkpoint(init_from: Any) -> tuple[Any, dict[str, Any]]:
  """`(model or None, params)` of `init_from`'s file, converted to big_attn (the model is the
  converter's, None for big_attn's own files)."""
  model, variables = read_variables(init_from)
  return model, variables["params"]


def read_variables(init_from: Any) -> tuple[Any, dict[str, Any]]:
  """`read_checkpoint` with all the variables: `{"params": ...}` and, for a model with
  BatchNorm, `"batch_stats"`."""
  check_init_from(init_from)
  source, path = init_from["source"], init_from["path"]
  if source == "big_attn":
    if os.path.isdir(path):
      _, state = ckpt_lib.read_state(path)
      return None, {k: v for k, v in state.items() if k in ("params", step_lib.BATCH_STATS)}
    if not path.endswith(".npz"):
      raise ValueError(f"config.init_from.path {path!r}: source='big_attn' reads a .npz file "
                       "or a directory written by `python -m big_attn.pretrained convert`")
    with np.load(path) as data:
      return None, {"params": _unflatten(dict(data))}
  if source == "transformers":
    import transformers  # pylint: disable=g-import-not-at-top
    from big_attn.pretrained import from_transformers  # pylint: disable=g-import-not-at-top
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config = transformers.AutoConfig.from_pretrained(directory)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if not hasattr(transformers, str(architecture)):
      raise ConversionError(f"{directory}/config.json: architectures={architecture!r} is not a "
                            "transformers class")
    framework_model = getattr(transformers, architecture).from_pretrained(directory)
    model, variables = from_transformers(framework_model)
  else:
    import timm  # pylint: disable=g-import-not-at-top
    from big_attn.pretrained import from_timm  # pylint: disable=g-import-not-at-top
    framework_model = timm.create_model(init_from["name"], pretrained=False,
                                        **dict(init_from.get("model_args") or {}))
    framework_model.load_state_dict(read_state_dict(path))
    model, variables = from_timm(framework_model.eval())
  return model, variables


def _field_differences(source_model: Any, model: Any) -> list[str]:
  if source_model is None or type(source_model) is not type(model):
    return [] if source_model is None else [f"model class {type(source_model).__name__} vs "
                                            f"{type(model).__name__}"]
  return [f"{f.name}={getattr(source_model, f.name)!r} (checkpoint) vs "
          f"{getattr(model, f.name)!r} (config)" for f in dataclasses.fields(model)
          if f.name not in _FREE_FIELDS
          and getattr(source_model, f.name) != getattr(model, f.name)]


def load_weights(init_from: Any, model: Any, params: Any) -> Any:
  """`params` (the model's fresh parameters: arrays or shapes) with the checkpoint's values.

  Returns a tree of the same structure: NumPy arrays in the model's dtypes where the checkpoint
  has the parameter, the leaves of `params` where it is initialised fresh (heads of another
  number of classes, op-specific parameters). Raises `ConversionError` naming the first
  parameter that does not fit.
  """
  return _fit(init_from, model, _read_for(init_from, model)["params"], params)


def _read_for(init_from: Any, model: Any) -> dict[str, Any]:
  """`read_variables`, logging where the checkpoint's converted model differs from `model`."""
  source_model, variables = read_variables(init_from)
  for difference in _field_differences(source_model, model):
    logging.warning("init_from: the checkpoint's model differs: %s", difference)
  return variables


def _fit(init_from: Any, model: Any, source: Any, params: Any, heads: tuple[str, ...] = HEADS,
         kind: str = "parameter") -> Any:
  """`params` with `source`'s values (see `load_weights`); `heads` may differ or be missing."""
  source_flat = {_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
  used, fresh, loaded = set(), [], []

  def fit(path, target):
    names = _names(path)
    value = source_flat.get(names)
    head = names[0] in heads
    if value is not None and tuple(value.shape) == tuple(target.shape):
      used.add(names)
      loaded.append(names)
      return np.asarray(value, target.dtype)
    if value is None and not (head or FRESH in names):
      raise ConversionError(f"{kind} {'/'.join(names)} {tuple(target.shape)} of "
                            f"{type(model).__name__} is not in {init_from['path']}")
    if value is not None and not head:
      raise ConversionError(f"{kind} {'/'.join(names)}: {init_from['path']} has shape "
                            f"{tuple(value.shape)}, the model {tuple(target.shape)}")
    used.add(names)
    fresh.append("/".join(names))
    return target

  fitted = jax.tree_util.tree_map_with_path(fit, params)
  unused = [n for n in source_flat if n not in used]
  removed = getattr(model, "removed_parameters", None)
  removed = removed() if callable(removed) else ()
  extra = ["/".join(n) for n in unused
           if n[0] not in heads and not any(n[:len(r)] == r for r in removed)]
  if extra:
    raise ConversionError(f"{init_from['path']} has {kind}s {type(model).__name__} lacks: "
                          f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  if fresh:
    logging.info("init_from: initialised fresh (not taken from the checkpoint): %s",
                 ", ".join(fresh))
  if unused:
    logging.info("init_from: checkpoint %ss dropped: %s", kind,
                 ", ".join("/".join(n) for n in unused))
  logging.info("init_from: %d %ss loaded from %s (%s)", len(loaded), kind,
               init_from["path"], init_from["source"])
  return fitted


def init_state(init_from: Any, model: Any, tx: Any, state: dict[str, Any],
               state_shardings: Any) -> dict[str, Any]:
  """The fresh train state of `big_attn.main` with `init_from`'s weights (`load_weights`), the
  model's `post_update` applied and the optimizer state initialised from them; `state` itself
  when `init_from` has no `path`. A state with BatchNorm `batch_stats` takes the checkpoint's
  running statistics (every one must fit), or keeps its fresh ones when the checkpoint has none
  (logged)."""
  if not init_from or not init_from.get("path"):
    return state
  variables = _read_for(init_from, model)
  loaded = {"params": _fit(init_from, model, variables["params"], state["params"])}
  stats = step_lib.BATCH_STATS
  if stats in state and stats in variables:
    loaded[stats] = _fit(init_from, model, variables[stats], state[stats], heads=(),
                         kind="running statistic")
  elif stats in state:
    logging.warning("init_from: %s has no BatchNorm running statistics; they start fresh",
                    init_from["path"])
    loaded[stats] = state[stats]
  post_update = step_lib.post_update_fn(model)

  def build(loaded):
    params = post_update(loaded["params"])
    return dict(loaded, step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(build, out_shardings=state_shardings)(loaded)


def model_fields(model: Any) -> dict[str, Any]:
  """The fields of a converted model that differ from their defaults, JSON-ready (the
  `config.model` of a run that fine-tunes it)."""
  out = {}
  for f in dataclasses.fields(model):
    value = getattr(model, f.name)
    if f.name in ("parent", "name") or value == f.default:
      continue
    out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


def convert(init_from: Any, out_dir: str) -> str:
  """Converts `init_from`'s file to an orbax checkpoint in `out_dir` (state `{"step": 0,
  "params": ...}`, and `"batch_stats"` for a model with BatchNorm, read back by
  `init_from.source="big_attn"`), with `model.json` holding `model_name` and the `model` fields
  to fine-tune it with. Returns the model name."""
  model, variables = read_variables(init_from)
  if model is None:
    raise ValueError("convert reads a timm or transformers checkpoint (source 'timm' or "
                     "'transformers')")
  model_name = type(model).__module__.rsplit(".", 1)[-1]
  checkpointer = ckpt_lib.Checkpointer(out_dir, every=1, max_to_keep=None)
  try:
    checkpointer.save(0, dict(variables, step=np.zeros((), np.int32)), force=True)
  finally:
    checkpointer.close()
  with open(os.path.join(out_dir, MODEL_FILE), "w", encoding="utf-8") as f:
    json.dump({"model_name": model_name, "model": model_fields(model)}, f, indent=1)
  return model_name
