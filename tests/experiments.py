"""Loads a script of experiments/ (not a package) as a module, for its tests."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
  """The module of `experiments/<name>.py`."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
