"""experiments/repro.py: the smoke mode runs end to end and writes tables with the right rows."""
import os

import numpy as np
import pytest

from tests import experiments


@pytest.fixture(scope="module")
def repro():
  return experiments.load("repro")


def _rows(text):
  """The table's body rows, split into cells."""
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]


@pytest.mark.slow
def test_smoke_trains_and_writes_tables(repro, tmp_path):
  written = repro.main(["--smoke", "--which=cog,registers,striped",
                        f"--results_dir={tmp_path}"])
  assert sorted(os.listdir(tmp_path)) == ["repro_cog.md", "repro_registers.md",
                                          "repro_striped.md"]
  for name, text in written.items():
    assert (tmp_path / f"repro_{name}.md").read_text() == text
    assert "Command: `python experiments/repro.py --smoke" in text
    assert "jax " in text and "cores" in text and "UTC" in text

  cog = _rows(written["cog"])
  assert [r[0] for r in cog] == ["`softmax`", "`cog`"]
  accuracy = [float(r[1]) for r in cog]
  assert all(0.0 <= a <= 1.0 for a in accuracy)
  negative, mass = float(cog[1][4]), float(cog[1][5])
  assert 0.0 < negative < 1.0 and 0.0 < mass < 1.0  # cog weights take both signs

  registers = _rows(written["registers"])
  assert [r[0] for r in registers] == ["0", "4"]
  for row in registers:
    top, median, ratio = (float(c) for c in row[2:5])
    assert top >= median > 0 and ratio == pytest.approx(top / median, rel=1e-3)

  striped = _rows(written["striped"])
  assert [r[0] for r in striped] == ["2", "4"]
  # Causal ring: step s has P - s devices with work; striped: every device at every step.
  assert striped[1][1:3] == ["4 3 2 1", "4 4 4 4"]
  assert all(float(r[-1]) > 1.0 for r in striped)


def test_trained_tables_have_one_row_per_mechanism(repro, tmp_path, monkeypatch):
  """sigmoid and linear rows, with the training replaced by fixed results (no compile)."""
  def fake_get(self, attention, seed, num_registers=0):
    del self, num_registers
    return dict(accuracy=0.5 + 0.01 * seed + 0.001 * len(attention), loss=1.0)

  monkeypatch.setattr(repro.Runs, "get", fake_get)
  written = repro.main(["--which=sigmoid,linear", "--seeds=0,1", "--steps=7",
                        f"--results_dir={tmp_path}"])
  sigmoid, linear = _rows(written["sigmoid"]), _rows(written["linear"])
  assert [r[0] for r in sigmoid] == ["`softmax`", "`sigmoid`"]
  assert [r[0] for r in linear] == ["`softmax`", "`performer`", "`focused_linear`",
                                    "`lightning`", "`lognormal_linear`"]
  assert linear[0][1] == f"{np.mean([0.507, 0.517]):.4f} ± {np.std([0.507, 0.517], ddof=1):.4f}"
  assert "7 training steps per run, seeds 0, 1" in written["linear"]


def test_bad_arguments(repro, tmp_path):
  with pytest.raises(ValueError, match="--which"):
    repro.main(["--which=sigmoid,nonsense", f"--results_dir={tmp_path}"])
  with pytest.raises(ValueError, match="steps"):
    repro.main(["--which=striped", "--steps=0", f"--results_dir={tmp_path}"])
