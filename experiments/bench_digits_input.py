"""CPU time per batch of the digits training input: the per-example path against the batch path.

  python experiments/bench_digits_input.py                 # vit_digits' input: 32x32, batch 64
  python experiments/bench_digits_input.py --rounds=5 --batches=40 --batch_size=128

On one thread, without grain's reader threads: the per-example path is grain's `random_map` of
`_Preprocess` over the shuffled stream, stacked into a batch (what TFDS data take, and what the
digits took before `_ArrayBatches`); the batch path is `_ArrayBatches`, which `get_dataset` uses
for the digits. Both build the same batches (checked here on the first, and bit for bit in
tests/test_data.py). Rounds alternate the two; the ratio is of the medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=protected-access,g-import-not-at-top
from big_attn.data import batching, digits, pipeline  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  spec = pipeline._Spec.parse(dict(name="digits"))
  source, bs, seed = spec.source("train"), args.batch_size, args.seed
  stream = grain.MapDataset.source(source).shuffle(seed=batching.seed(seed, 0)).repeat()
  stream = stream.random_map(pipeline._Preprocess(spec, digits.NUM_CLASSES),
                             seed=batching.seed(seed, 1))

  def per_example(b):
    examples = [stream[b * bs + r] for r in range(bs)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  start = time.process_time()
  make = pipeline._ArrayBatches(spec, source, digits.NUM_CLASSES, batch_size=bs, seed=seed,
                                train=True)
  setup_ms = 1e3 * (time.process_time() - start)
  rows = np.arange(bs)
  paths = {"per-example": per_example, "batch": lambda b: make(b, rows)}
  for key, value in paths["per-example"](0).items():
    np.testing.assert_array_equal(paths["batch"](0)[key], value)

  times = {name: [] for name in paths}
  for _ in range(args.rounds):
    for name, build in paths.items():
      start = time.process_time()
      for b in range(args.batches):
        build(b)
      times[name].append(1e3 * (time.process_time() - start) / args.batches)
  print(f"CPU ms per batch of {bs} ({spec.image_size}x{spec.image_size}, crop_padding "
        f"{spec.crop_padding}), {args.rounds} rounds of {args.batches} batches; load average "
        f"{os.getloadavg()[0]:.1f}")
  for name, values in times.items():
    print(f"  {name}: median {statistics.median(values):.2f} ("
          + ", ".join(f"{v:.2f}" for v in values) + ")")
  print(f"  ratio per-example / batch: "
        f"{statistics.median(times['per-example']) / statistics.median(times['batch']):.2f}; "
        f"batch path setup {setup_ms:.0f} ms once per get_dataset call")


if __name__ == "__main__":
  main()
