"""The notebooks of experiments/notebooks run top to bottom from any working directory, so they
never rot, and are committed with their outputs.

Each notebook asserts its own claims in its cells; here a failing cell fails the test, and the
plots it promises must be in its outputs. Under test the digits ViT trains `STEPS` steps
(`BIG_ATTN_NOTEBOOK_STEPS`), not the 400 of the committed outputs.
"""
import os

import nbclient
import nbformat
import pytest

from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")

# Notebook -> the least number of plots it draws.
EXPECTED = {"ops_tour.ipynb": 2, "vit_digits_attention.ipynb": 5}
MAX_BYTES = 1 << 20
STEPS = 150


def execute(path: str, working_dir: str) -> nbformat.NotebookNode:
  """Runs the notebook at `path` in a fresh kernel started in `working_dir`; returns it with
  its outputs (the file is not changed)."""
  notebook = nbformat.read(path, as_version=4)
  env = dict(os.environ, BIG_ATTN_NOTEBOOK_STEPS=str(STEPS), PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  # The kernel is a fresh process with one device, as a user's; conftest.py's other XLA flags
  # (cheaper compiles) reach it.
  env["XLA_FLAGS"] = processes.xla_flags()
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   record_timing=False,
                                   resources={"metadata": {"path": working_dir}})
  client.execute(env=env)
  return notebook


def _code_outputs(notebook: nbformat.NotebookNode) -> list[dict]:
  return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _images(notebook: nbformat.NotebookNode) -> int:
  return sum("image/png" in o.get("data", {}) for o in _code_outputs(notebook))


def test_every_notebook_is_tested():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_committed_executed_with_its_plots(name):
  path = os.path.join(NOTEBOOKS, name)
  assert os.path.getsize(path) < MAX_BYTES
  notebook = nbformat.read(path, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one clean run
  assert not [o for o in _code_outputs(notebook) if o.get("output_type") == "error"]
  assert _images(notebook) >= EXPECTED[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_plots_from_another_directory(name, tmp_path):
  notebook = execute(os.path.join(NOTEBOOKS, name), str(tmp_path))
  assert not [o for o in _code_outputs(notebook) if o.get("output_type") == "error"]
  assert _images(notebook) >= EXPECTED[name]
