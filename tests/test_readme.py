"""The README's examples work as written.

Each ```python block runs alone in a fresh namespace, as a reader pastes it; the ```bash blocks'
commands name modules, scripts, configs (with their `:ARG` and `--config.KEY=VALUE` overrides)
and extras that exist, checked without running them.
"""
import importlib.util
import os
import pathlib
import re
import runpy
import shlex
from unittest import mock

from absl import flags
import jax
import numpy as np
import pytest
import setuptools
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[tuple[str, str]]:
  """`(section heading, code)` of each fenced block in `language`, in order."""
  blocks, section = [], ""
  for match in re.finditer(r"^## ([^\n]+)$|^```(\w*)\n(.*?)^```", README, re.M | re.S):
    if match[1]:
      section = match[1]
    elif match[2] == language:
      blocks.append((section, match[3]))
  return blocks


SNIPPETS = _blocks("python")

# Section -> the shapes of the arrays its snippet defines.
EXPECTED = {
    "Ops: one pure function per mechanism": {"out": (2, 128, 8, 64)},
    "Layers": {"x": (2, 16, 64), "y": (2, 16, 64)},
    "Pallas kernels": {"out": (2, 128, 4, 64), "lse": (2, 128, 4)},
    "Sequence parallelism": {"out": (2, 64, 4, 16), "grads": (2, 64, 4, 16)},
    "Interpretability": {"rollout": (1, 17, 17)},
}


def test_expected_snippets_exist():
  assert set(EXPECTED) <= {section for section, _ in SNIPPETS}


@pytest.mark.slow
@pytest.mark.parametrize("section, code", SNIPPETS, ids=[section for section, _ in SNIPPETS])
def test_python_snippet_runs_alone(section, code, monkeypatch):
  # A snippet may set environment variables for a fresh process (the 8 devices conftest.py
  # already gave this one): they must not leak into other tests.
  monkeypatch.setattr(os, "environ", os.environ.copy())
  namespace = {"__name__": "__readme__"}
  exec(compile(code, f"README.md ({section})", "exec"), namespace)  # pylint: disable=exec-used
  arrays = {k: v for k, v in namespace.items() if isinstance(v, (jax.Array, np.ndarray))}
  assert arrays, "a snippet defines the arrays it computes"
  for name, value in arrays.items():
    assert np.all(np.isfinite(np.asarray(value, np.float32))), name
  for name, shape in EXPECTED.get(section, {}).items():
    assert arrays[name].shape == shape, name
  if "XLA_FLAGS" in code:
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    assert len(jax.devices()) == 8


def _split(tokens: list[str]) -> list[list[str]]:
  """`a && b` -> [a, b]; a quoted command passed on (`--command="cd x && python ..."`) too."""
  commands, current = [], []
  for token in tokens + ["&&"]:
    if token != "&&":
      current.append(token)
    elif current:
      commands.append(current)
      current = []
  for command in list(commands):
    for token in command:
      if " " in token:
        commands += _split(shlex.split(token.partition("=")[2]))
  return commands


def _commands() -> list[list[str]]:
  """The bash blocks' commands as argument lists (comments dropped, continuation lines joined)."""
  return [command for _, code in _blocks("bash")
          for line in code.replace("\\\n", " ").splitlines()
          for command in _split(shlex.split(line, comments=True))]


def _extras() -> dict[str, list[str]]:
  with mock.patch.object(setuptools, "setup") as setup:
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py reads README.md from the working directory, as pip runs it
    try:
      runpy.run_path(str(ROOT / "setup.py"))
    finally:
      os.chdir(cwd)
  return setup.call_args.kwargs["extras_require"]


def _load_config(args: list[str]):
  # As `big_attn.main` parses them: importing it registers its parsers for list and None keys.
  importlib.import_module("big_attn.main")
  argv = ["main"] + args
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections'
def test_shell_commands_name_what_exists():
  commands = _commands()
  checked = 0
  for command in commands:
    if "python" not in command:
      continue
    args = command[command.index("python") + 1:]
    if args[:2] == ["-m", "pytest"] or args[0] == "-c":
      continue
    if args[0] == "-m":
      assert importlib.util.find_spec(args[1]) is not None, command
    else:
      assert (ROOT / args[0]).is_file(), command
    config = [a for a in args if a.startswith("--config=") and a != "--config=..."]
    if config:
      path = config[0].removeprefix("--config=")
      overrides = [a for a in args if a.startswith("--config.")]
      assert _load_config([f"--config={ROOT / path}"] + overrides) is not None, command
      checked += 1
  assert checked >= 10
  for command in commands:
    if command[0] == "bash":
      assert (ROOT / command[1]).is_file(), command


def test_readme_names_every_extra():
  extras = _extras()
  named = set(re.findall(r"\.\[(\w+)\]", README))
  assert named <= set(extras), named - set(extras)
  for extra in extras:
    assert re.search(rf"`\.\[{extra}\]`", README), f"README does not describe the [{extra}] extra"
  assert set(extras["all"]) == {r for name, reqs in extras.items()
                                if name not in ("all", "test") for r in reqs}
