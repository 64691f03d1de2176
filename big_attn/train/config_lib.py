"""Helpers for the Python configs in `configs/`: loading `configs/NAME.py[:ARG]`, typed `arg`
strings, `--config.KEY=VALUE` overrides, the shared defaults, and the copy of a run's config
saved in its workdir."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import os
import traceback
import warnings
from typing import Any, Callable

import ml_collections

from big_attn.parallel import STRATEGIES
from big_attn.parallel import mesh as mesh_lib


class ConfigError(ValueError):
  """A config value the run cannot use, with the key named; `big_attn.main` prints it without
  a traceback and exits with status 1."""


@contextlib.contextmanager
def naming(key: str):
  """Re-raises a ValueError, TypeError, KeyError or FileNotFoundError of the block as a
  `ConfigError` naming `key` (unless its message names a `config.` key already)."""
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise ConfigError(message if str(message).startswith("config.") else f"{key}: {message}"
                      ) from e


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("", "true", "1", "yes"):
      return True
    if value.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"config arg {key!r} is a bool, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


_SEEN_ARG_DEFAULTS: list[dict[str, Any]] = []  # what `parse_arg` got, while `arg_defaults` runs


def parse_arg(arg: str | None, *, renamed: dict[str, str] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
  """`"variant=B/16,runlocal"` -> ConfigDict of `defaults` with those keys replaced.

  Values take the type of their default; a bare key sets a bool to True; an unknown key raises
  `ValueError` listing the known ones (as big_vision's `parse_arg`). `renamed` maps deprecated
  keys to their new names (read as the new key, with a `DeprecationWarning`).
  """
  _SEEN_ARG_DEFAULTS.append(dict(defaults))
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key in (renamed or {}):
      warnings.warn(f"config arg {key!r} is deprecated; use {renamed[key]!r}", DeprecationWarning,
                    stacklevel=2)
      key = renamed[key]
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known args: {', '.join(sorted(defaults))}")
    try:
      out[key] = _convert(key, value.strip(), defaults[key])
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: cannot read {value!r} as "
                       f"{type(defaults[key]).__name__} ({e})") from None
  return ml_collections.ConfigDict(out)


def arg_defaults(get_config: Callable[..., Any]) -> dict[str, Any]:
  """The options of a config's `arg` with their defaults: what `get_config()` passes to
  `parse_arg` (empty for a config without options)."""
  start = len(_SEEN_ARG_DEFAULTS)
  try:
    get_config()
    return _SEEN_ARG_DEFAULTS[start] if len(_SEEN_ARG_DEFAULTS) > start else {}
  finally:
    del _SEEN_ARG_DEFAULTS[start:]


def _failure_site(error: BaseException, path: str) -> str:
  """` (FILE, line N)` of the innermost frame of `error` in file `path`, or ""."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" ({path}, line {frames[-1].lineno})" if frames else ""


def load_config_module(path: str) -> Any:
  """The Python module of config file `path`; a `ValueError` with the cause otherwise."""
  if not path.endswith(".py"):
    raise ValueError(f"config file {path!r} must be a Python file configs/NAME.py (the configs: "
                     "python -m big_attn.main --list)")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} not found (relative to the current directory "
                     f"{os.getcwd()}; the configs: python -m big_attn.main --list)")
  name = "big_attn_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"config file {path} cannot be loaded: SyntaxError: {e.msg} ({path}, line "
                     f"{e.lineno})") from None
  except Exception as e:  # pylint: disable=broad-exception-caught  # reported with its cause
    raise ValueError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}"
                     f"{_failure_site(e, path)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config(arg=None)")
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` -> `get_config(ARG)` of that file (unlocked), as ml_collections'
  `DEFINE_config_file` loads it; a `ValueError` naming the file and the cause otherwise."""
  path, colon, arg = spec.partition(":")
  get_config = load_config_module(path).get_config
  try:
    config = get_config(arg) if colon else get_config()
  except (ValueError, TypeError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ValueError(f"--config={spec}: {message}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config={spec}: get_config returned {type(config).__name__}, not a "
                     "ConfigDict")
  return config


def _a_type(value: Any) -> str:
  """"an int", "a list", ...: the type of `value` with its article."""
  name = type(value).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def read_override(key: str, text: str | None, current: Any) -> Any:
  """The value of `--config.KEY=TEXT` for a key whose value is now `current`.

  `TEXT` is read as the type of `current`: bool (true/false/1/0, or None for the bare flags
  `--config.KEY` and `--noconfig.KEY`), int, float, str; lists, tuples and dicts as Python
  literals (`"[('fsdp', -1)]"`); a key that is None now takes a Python literal, else the string.
  A `ValueError` naming `config.KEY`, its type and the text otherwise.
  """
  if isinstance(current, ml_collections.ConfigDict):
    current = current.to_dict()
  kind = _a_type(current)

  def refuse(why: str = "") -> ValueError:
    return ValueError(f"--config.{key}={text}: config.{key} is {kind} (now {current!r}), cannot "
                      f"read {text!r} as one{why}")

  if text is None:  # `--config.KEY` or `--noconfig.KEY`
    if isinstance(current, bool):
      return True
    raise ValueError(f"--config.{key} without a value: config.{key} is {kind} (now "
                     f"{current!r}), not a bool; pass --config.{key}=VALUE")
  if isinstance(current, bool):
    if text.lower() in ("true", "t", "1"):
      return True
    if text.lower() in ("false", "f", "0"):
      return False
    raise refuse(" (true or false)")
  if isinstance(current, (int, float, str)):
    try:
      return type(current)(text)
    except ValueError:
      raise refuse() from None
  try:
    value = ast.literal_eval(text)
  except (SyntaxError, ValueError):
    if current is None:
      return text
    raise refuse(" (a Python literal)") from None
  if current is None:
    return value
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if isinstance(current, dict) and isinstance(value, dict):
    return value
  raise refuse(f" (it is {_a_type(value)})")


def lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of dotted `key` ("input.batch_size") in `config`; `KeyError` if absent."""
  value = config
  for part in key.split("."):
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      raise KeyError(key)
    value = value[part]
  return value


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """`[(dotted key, value)]` of the leaves of `config` (a nested ConfigDict is not a leaf,
  unless empty)."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      out.extend(flat_items(value, f"{prefix}{key}."))
    else:
      out.append((prefix + key, value.to_dict() if isinstance(
          value, ml_collections.ConfigDict) else value))
  return out


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of `config` and of its nested ConfigDicts, as dotted paths."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_keys(value, f"{prefix}{key}."))
  return out


def check_overrides(config: ml_collections.ConfigDict,
                    overrides: list[tuple[str, str | None]]) -> None:
  """Checks `--config.KEY=TEXT` overrides `[(KEY, TEXT)]` against `config` before they apply:
  every KEY exists (else "did you mean" the closest keys) and TEXT reads as its type
  (`read_override`). Raises `ValueError` naming the full key."""
  for key, text in overrides:
    holder, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      parent = ".".join(["config", *parts[:depth]])
      if not isinstance(holder, ml_collections.ConfigDict):
        raise ValueError(f"--config.{key}: {parent} is {holder!r}, which has no keys")
      if part not in holder:
        close = difflib.get_close_matches(key, _keys(config), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(f'config.{k}' for k in close)}?" if close else
                f"{parent} has keys {', '.join(sorted(holder))}")
        raise ValueError(f"--config.{key}: unknown config key config.{key}; {hint}")
      holder = holder[part]
    read_override(key, text, holder)


def declare_model_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every setting of `config.model_name`'s Model that defaults to None and names
  an attention op or arguments (`attention_args`, `attention_impl`, `<role>_attention`,
  `<role>_attention_args`, any other `*_args`), the `token_reduction` dict or the block lists
  `shared_attention_layers` and `attention_free_layers` declared as None
  in `config.model` where the config leaves it out, so that the locked config takes
  `--config.model.KEY=VALUE` (a dict as a Python literal). Every config returns through it;
  deprecated names are left out."""
  from big_attn import models  # pylint: disable=g-import-not-at-top  # models import jax
  module = models.get(config.model_name)
  deprecated = set(getattr(module, "RENAMED", {}))
  for field in dataclasses.fields(module.Model):
    if (field.name.endswith(("_args", "attention", "attention_impl", "token_reduction",
                             "attention_layers", "attention_free_layers"))
        and field.default is None
        and field.name not in deprecated and field.name not in config.model):
      config.model[field.name] = None
  return config


def check_sequence_parallel_arg(arg: ml_collections.ConfigDict) -> None:
  """Checks the `seq_shards`, `strategy` and `seq_len` options of a sequence-parallel config."""
  if arg.strategy not in STRATEGIES:
    raise ValueError(f"config arg strategy must be one of {STRATEGIES}, got {arg.strategy!r}")
  if arg.seq_shards < 1 or arg.seq_len % arg.seq_shards:
    raise ValueError(f"config arg seq_len ({arg.seq_len}) must be a multiple of seq_shards "
                     f"({arg.seq_shards} >= 1)")


def base_config() -> ml_collections.ConfigDict:
  """The keys every training config has (DESIGN.md), with neutral defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_name = "vit"
  config.model = ml_collections.ConfigDict()
  config.input = ml_collections.ConfigDict(dict(
      name="digits", data_dir=None, image_size=32, batch_size=128,
      augment=dict(crop_padding=0, flip=False), mixup=0.0))
  config.mesh = [("data", -1)]
  config.mesh_subset = False
  config.sharding_rules = list(mesh_lib.DEFAULT_RULES)
  config.optax_name = "adamw"
  config.optax = ml_collections.ConfigDict(dict(weight_decay=1e-4))
  config.lr = 1e-3
  config.schedule = ml_collections.ConfigDict(dict(warmup_steps=0, decay_type="cosine"))
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1
  # The classifier head's own weight decay (`optim.make_optimizer`); None: the body's.
  config.wd_head = None
  # Terms added to the task's loss: λ and threshold of the attention diversification loss
  # (`train.regularizers`, Robustifying Token Attention for Vision Transformers; None: no
  # term, threshold 2); λ and r' of MCTF's token reduction consistency (None: no term, r' =
  # ⌊r/2⌋); λ of SPA's selection-label loss; attention transfer from a teacher
  # (`regularizers.with_attention_transfer`): mode "copy" or "distill", teacher dict, λ of
  # distillation (None: 1), last layers (None: all). None, so that a run saved without these
  # keys resumes unchanged.
  config.loss = ml_collections.ConfigDict(dict(
      attention_diversification=None, attention_diversification_threshold=None,
      token_reduction_consistency=None, token_reduction_consistency_r=None, spa_selection=None,
      attention_transfer=None, attention_transfer_teacher=None, attention_transfer_weight=None,
      attention_transfer_layers=None))
  config.total_steps = 1000
  config.log_every = 50
  config.ckpt_every = 500
  config.max_to_keep = 2
  config.evals = ml_collections.ConfigDict()
  config.dry_run = False
  config.resume_policy = "resume"
  # Fine-tuning: weights loaded before step 0 when the workdir has no checkpoint
  # (`big_attn.pretrained.loading`; no `path`: none).
  config.init_from = ml_collections.ConfigDict(dict(path=None, source="big_attn", name=None,
                                                    model_args={}))
  return config


# Keys that may change when a run is started again on its workdir: cadences, the run's length,
# the layout over devices and where the data lives. Any other difference changes the state's
# structure or meaning and is refused unless `resume_policy` says otherwise. A key names itself
# and everything below it. `init_from` is read only before step 0, so a resume ignores it.
RESUMABLE_KEYS = ("total_steps", "log_every", "ckpt_every", "max_to_keep", "evals", "mesh", "mesh_subset",
                  "sharding_rules", "grad_accum_steps", "dry_run", "resume_policy", "init_from",
                  "input.data_dir", "input.root", "input.num_threads", "input.prefetch")
RESUME_POLICIES = ("resume", "accept_changes", "restart")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def config_changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
  """`[(key, old value, new value)]` for each differing key outside `RESUMABLE_KEYS`.

  Both configs are compared as their JSON form (`load_config`'s view of a saved config), so
  tuples and lists are equal; a key absent from one side shows as `<absent>`, and is no change
  where the other side holds None (a setting declared by `declare_model_settings`).
  """
  as_json = lambda c: _flatten(json.loads(c.to_json_best_effort()))  # pylint: disable=unnecessary-lambda-assignment
  old_flat, new_flat = as_json(old), as_json(new)
  resumable = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)  # pylint: disable=unnecessary-lambda-assignment
  return [(k, old_flat.get(k, "<absent>"), new_flat.get(k, "<absent>"))
          for k in sorted(set(old_flat) | set(new_flat))
          if not resumable(k) and old_flat.get(k) != new_flat.get(k)]


CONFIG_FILE = "config.json"


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (meshes, rules, patch sizes)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config` to `workdir/config.json` (atomically: a temporary file, then a rename)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a `big_attn.main` run saved in `workdir` (locked, as on the command line)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not the workdir of a big_attn.main "
                            "run (pass the run's --config instead)")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  config.lock()
  return config


def digits_config(arg: ml_collections.ConfigDict, *, image_size: int = 16,
                  weight_decay: float = 1e-4) -> ml_collections.ConfigDict:
  """`base_config()` for a classifier on the embedded digits, as the `*_digits` configs share it:
  `arg.steps` AdamW steps at 2e-3 (100 warmup, cosine), batch 64, crop augmentation, held-out
  evaluation three times; `arg.runlocal` shrinks it to 20 steps. The caller sets the model."""
  config = base_config()
  config.input.name = "digits"
  config.input.image_size = image_size
  config.input.batch_size = 64
  config.input.augment = dict(crop_padding=2, flip=False)
  config.input.mixup = 0.0
  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.99, weight_decay=weight_decay)
  config.lr = 2e-3
  config.schedule = dict(warmup_steps=2 if arg.runlocal else 100, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 20 if arg.runlocal else arg.steps
  config.log_every = 10 if arg.runlocal else 100
  config.ckpt_every = 10 if arg.runlocal else 500
  config.max_to_keep = 2
  config.evals.eval = dict(type="classification", every=config.total_steps // 3 or 1,
                           split="test", batch_size=128)
  return config


IMAGENET_TRAIN_EXAMPLES = 1_281_167  # ImageNet-2012's training split


def imagenet_config(arg: ml_collections.ConfigDict, *, batch_size: int, weight_decay: float,
                    warmup_epochs: int) -> ml_collections.ConfigDict:
  """`base_config()` for a classifier on ImageNet-2012 (TFDS `imagenet2012` under the user's
  `data_dir`), as the DeiT-style `*_i1k` configs share it: `arg.epochs` epochs of AdamW
  (b2 0.999) at `batch_size`, `warmup_epochs` of warm-up (at most the run), then cosine; random
  flips and mixup 0.8; logs every 50 steps, checkpoints and evaluates on the validation split
  every 1000. `arg.runlocal` shrinks it to 5 steps of batch 8 without mixup (a laptop check of
  the pipeline). The caller sets the model and the learning rate."""
  config = base_config()
  config.input.name = "tfds:imagenet2012"
  config.input.image_size = 224
  config.input.batch_size = 8 if arg.runlocal else batch_size
  config.input.augment = dict(crop_padding=0, flip=True)
  config.input.mixup = 0.0 if arg.runlocal else 0.8
  config.mesh = [("data", -1)]
  config.optax_name = "adamw"
  config.optax = dict(b2=0.999, weight_decay=weight_decay)
  steps = arg.epochs * IMAGENET_TRAIN_EXAMPLES // config.input.batch_size
  warmup = min(warmup_epochs * IMAGENET_TRAIN_EXAMPLES // config.input.batch_size, steps)
  config.schedule = dict(warmup_steps=2 if arg.runlocal else warmup, decay_type="cosine")
  config.grad_clip_norm = 1.0
  config.total_steps = 5 if arg.runlocal else steps
  config.log_every = 1 if arg.runlocal else 50
  config.ckpt_every = 5 if arg.runlocal else 1000
  config.max_to_keep = 3
  config.evals.eval = dict(type="classification", every=5 if arg.runlocal else 1000,
                           split="validation", batch_size=8 if arg.runlocal else 1024)
  return config
