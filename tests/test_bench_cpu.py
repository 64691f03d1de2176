"""experiments/bench_cpu.py: the smoke run writes both tables (checked rows), the fits, the
loop section's wiring to experiments/bench_train_loop.py."""
import math
import types

import pytest

from tests import experiments


@pytest.fixture(name="bench", scope="module")
def _bench():
  return experiments.load("bench_cpu")


def test_smoke_writes_checked_tables_and_plot(bench, tmp_path, capsys):
  path = bench.main(["--smoke", "--sections=ops,linear", "--cases=causal,segments",
                     "--linear_ops=lightning", f"--out={tmp_path}"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_paths.md", "cpu_paths.png"]
  text = open(path).read()
  assert text.startswith("# CPU attention paths against jax.nn\n\nDevice: cpu")
  assert "shared" in text and "jax 0." in text
  ops_rows = [line for line in text.splitlines() if line.startswith(("| causal |",
                                                                      "| segments |"))]
  assert [row.split(" | ")[1:3] for row in ops_rows] == [
      ["48", "fwd"], ["48", "fwd+bwd"], ["48", "fwd"], ["48", "fwd+bwd"]]
  assert "!" not in "".join(ops_rows)  # Ours and the einsum agree with jax.nn.
  linear_rows = [line.split(" | ") for line in text.splitlines()
                 if line.startswith(("| softmax |", "| lightning |"))]
  assert len(linear_rows) == 16  # (wall, CPU) x 2 ops x causal or not x fwd, fwd+bwd
  for row in linear_rows:
    assert math.isfinite(float(row[-2]))  # The fitted exponent.
  assert "loop" not in capsys.readouterr().out


def test_exponent_and_crossover(bench):
  lengths = [512, 1024, 2048]
  assert bench.fit_exponent(lengths, [n ** 2 * 1e-9 for n in lengths]) == pytest.approx(2.0)
  assert bench.crossover(lengths, [4, 2, 1], [1, 2, 4]) == "1024"
  assert bench.crossover(lengths, [2, 2, 2], [1, 1, 1]) == "> 2048"
  assert bench.crossover(lengths, [1, 1, 1], [2, 2, 2]) == "< 512"


def test_loop_section_calls_measure(bench, monkeypatch):
  calls = []
  def measure(config_name, rounds):
    calls.append((config_name, rounds))
    return {"step ratio": 1.25, "compile s": 3}
  monkeypatch.setattr(bench, "train_loop_module", lambda: types.SimpleNamespace(measure=measure))
  table = bench.run_loop(("vit_digits",), rounds=2)
  assert calls == [("vit_digits", 2)]
  assert table.splitlines()[0] == "| config | step ratio | compile s |"
  assert table.splitlines()[2] == "| vit_digits | 1.25 | 3 |"
  assert hasattr(bench.train_loop_module(), "measure")
