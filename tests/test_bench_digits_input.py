"""experiments/bench_digits_input.py: one tiny round runs, checks both paths agree, prints both."""
from tests import experiments


def test_one_round_prints_both_paths_and_their_ratio(capsys):
  experiments.load("bench_digits_input").main(["--rounds=1", "--batches=1", "--batch_size=8"])
  out = capsys.readouterr().out
  assert "CPU ms per batch of 8 (32x32, crop_padding 2)" in out
  assert "per-example: median" in out and "batch: median" in out and "ratio per-example" in out
