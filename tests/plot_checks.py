"""Checks that the plot test files share: a file is a PNG, and the figures a test saves."""
import os

import matplotlib.image

from big_attn.interpret import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  """`path` is a PNG image more than 10 pixels high and wide."""
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 10 and image.shape[1] > 10


def keep_figures(monkeypatch) -> dict:
  """`{file name: Figure}`, filled with every plot `plots` saves while `monkeypatch` holds."""
  kept = {}
  save = plots._save  # pylint: disable=protected-access

  def keep_and_save(fig, path):
    kept[os.path.basename(path)] = fig
    return save(fig, path)

  monkeypatch.setattr(plots, "_save", keep_and_save)
  return kept
