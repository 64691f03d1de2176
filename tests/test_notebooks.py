"""Executes the notebooks of experiments/notebooks top to bottom, so they never rot.

Each notebook asserts its own claims in its cells; here a failing cell fails the test, and the
plots it promises must be in its outputs.
"""
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")


def _execute(name: str) -> nbformat.NotebookNode:
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  # The kernel is a fresh process: the 8-device flag of conftest.py does not reach it.
  env.pop("XLA_FLAGS", None)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute(env=env)
  return notebook


def _images(notebook: nbformat.NotebookNode) -> int:
  return sum("image/png" in output.get("data", {})
             for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []))


# Notebook -> the least number of plots it draws.
EXPECTED = {"ops_tour.ipynb": 2, "vit_digits_attention.ipynb": 4}


def test_every_notebook_is_tested():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_plots(name):
  notebook = _execute(name)
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert _images(notebook) >= EXPECTED[name]
