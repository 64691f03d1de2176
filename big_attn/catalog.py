"""What a command line can name: the configs in `configs/`, the model families and the attention
ops, each described by its own docstring (`python -m big_attn.main --list`, `python -m
big_attn.ops`)."""
from __future__ import annotations

import glob
import os
import textwrap
from typing import Any

from big_attn import layers, models, ops
from big_attn.train import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_WIDTH = 100


def summary(doc: str | None) -> str:
  """The first paragraph of a docstring, on one line."""
  return " ".join((doc or "").strip().split("\n\n")[0].split())


def config_rows(config_dir: str = CONFIG_DIR) -> list[dict[str, Any]]:
  """`{"path", "summary", "args"}` of every `config_dir/*.py`: the path as `--config` takes it
  from the repository root, the docstring's first paragraph and the `arg` options with their
  defaults (`config_lib.arg_defaults`)."""
  rows = []
  for path in sorted(glob.glob(os.path.join(config_dir, "*.py"))):
    module = config_lib.load_config_module(path)
    rows.append(dict(path=os.path.join(os.path.basename(config_dir), os.path.basename(path)),
                     summary=summary(module.__doc__),
                     args=config_lib.arg_defaults(module.get_config)))
  return rows


def model_rows() -> list[dict[str, str]]:
  """`{"name", "summary"}` of every model family (`config.model_name`)."""
  return [dict(name=name, summary=summary(models.get(name).__doc__)) for name in models.names()]


def op_rows() -> list[dict[str, Any]]:
  """`{"name", "causal", "params", "summary"}` of every registered op: whether it has a causal
  form, the Linen module owning its learned weights (None without) and its docstring's first
  paragraph (the mechanism and its paper)."""
  rows = []
  for name in ops.names():
    params = layers.params_module(name)
    rows.append(dict(name=name, causal=ops.has_causal_form(name),
                     params=None if params is None else params.__name__,
                     summary=summary(ops.get(name).__doc__)))
  return rows


def _entry(name: str, text: str, indent: int) -> str:
  """`name` padded to `indent` columns, then `text` wrapped under itself."""
  lines = textwrap.wrap(text, _WIDTH - indent) or [""]
  pad = " " * indent
  return "\n".join([f"{name:<{indent - 1}} {lines[0]}".rstrip()] + [pad + l for l in lines[1:]])


def _short(value: Any, limit: int = 30) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def format_ops() -> str:
  """The op table: name, causal form, learned parameters and summary."""
  rows = op_rows()
  name_width = max(len(r["name"]) for r in rows) + 2
  params_width = max(len(r["params"] or "-") for r in rows) + 2
  indent = name_width + 8 + params_width
  header = f"{'op':<{name_width}}{'causal':<8}{'learned params':<{params_width}}paper / mechanism"
  lines = [header, "-" * len(header)]
  for r in rows:
    name = (f"{r['name']:<{name_width}}{'yes' if r['causal'] else 'no':<8}"
            f"{r['params'] or '-':<{params_width}}")
    lines.append(_entry(name.rstrip(), r["summary"], indent))
  return "\n".join(lines)


def format_listing() -> str:
  """Configs with their `arg` options, model families and the op table, for `--list`."""
  configs = config_rows()
  width = max(len(r["path"]) for r in configs) + 3
  out = ["Configs (--config=configs/NAME.py[:ARG]; ARG is option=value,... over the defaults "
         "listed, a bare\noption sets a bool; --config.KEY=VALUE overrides any key):"]
  for r in configs:
    out.append(_entry("  " + r["path"], r["summary"], width))
    args = ", ".join(f"{k}={v!r}" for k, v in r["args"].items()) or "(no options)"
    out.extend(" " * width + l for l in textwrap.wrap(args, _WIDTH - width))
  out.append("\nKeys of every config (base_config's values; each config sets its own):")
  keys = [f"{key}={_short(value)}" for key, value in config_lib.flat_items(
      config_lib.base_config())]
  out.extend("  " + line for line in textwrap.wrap(", ".join(keys), _WIDTH - 2))
  out.append("\nModels (config.model_name):")
  width = max(len(n) for n in models.names()) + 5
  out.extend(_entry("  " + r["name"], r["summary"], width) for r in model_rows())
  out.append("\nAttention ops (the model's attention options; ops.get(NAME)):")
  out.append(textwrap.indent(format_ops(), "  "))
  return "\n".join(out)
