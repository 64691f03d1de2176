"""PNG figures (matplotlib figures drawn off-screen, whatever the pyplot backend): attention over an image, relevance heat maps, attention
distances per head, token-norm histograms, and benchmark curves from CSV/JSON rows."""
from __future__ import annotations

import collections
import csv
import json
import os
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def display_image(image: Any) -> np.ndarray:
  """`[H, W, C]` image in [-1, 1] (the pipelines' range) -> `[H, W]` or `[H, W, 3]` in [0, 1]."""
  image = np.asarray(image, np.float64)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image must be [H, W, 1 or 3], got shape {image.shape}")
  image = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
  return image[..., 0] if image.shape[-1] == 1 else image


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
  h, w = image.shape[:2]
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0))
  ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
  ax.set_title(title, fontsize=7)
  ax.axis("off")


def plot_attention_maps(image: Any, maps: dict[str, Any], grid: tuple[int, int], path: str, *,
                        num_prefix: int = 0, query: int | None = None) -> str:
  """One row per layer, one panel per head: the attention to each patch over the image.

  `maps`: `{name: [heads, n, n]}` of one example; the row of token `query`, or with None the
  mean over the patch queries, restricted to the patch keys `num_prefix .. + gh·gw`.
  """
  image = display_image(image)
  gh, gw = grid
  patches = slice(num_prefix, num_prefix + gh * gw)
  heads = max(np.asarray(m).shape[0] for m in maps.values())
  fig = Figure(figsize=(1.6 * heads, 1.7 * len(maps)))
  axes = fig.subplots(len(maps), heads, squeeze=False)
  for row, (name, m) in enumerate(maps.items()):
    m = np.asarray(m, np.float64)
    rows = m[:, query] if query is not None else m[:, patches].mean(1)
    for h in range(heads):
      ax = axes[row, h]
      if h >= m.shape[0]:
        ax.axis("off")
        continue
      _overlay(ax, image, rows[h, patches].reshape(gh, gw), f"{name} h{h}")
  return _save(fig, path)


def plot_heatmaps(image: Any, heatmaps: dict[str, Any], path: str) -> str:
  """The image, then each `[gh, gw]` heat map (rollout, flow, ...) over it, in one row."""
  image = display_image(image)
  fig = Figure(figsize=(2.2 * (len(heatmaps) + 1), 2.4))
  axes = fig.subplots(1, len(heatmaps) + 1, squeeze=False)
  axes[0, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
  axes[0, 0].set_title("input", fontsize=8)
  axes[0, 0].axis("off")
  for ax, (name, heat) in zip(axes[0, 1:], heatmaps.items()):
    _overlay(ax, image, np.asarray(heat, np.float64), name)
  return _save(fig, path)


def plot_distances(distances: Sequence[Any], path: str, *, title: str = "") -> str:
  """Mean attention distance of every head against depth (ViT's Figure 7): `distances[l]` is
  layer l's `[heads]` distances in pixels."""
  fig = Figure(figsize=(4, 3))
  ax = fig.subplots()
  for layer, d in enumerate(distances):
    d = np.asarray(d)
    ax.scatter(np.full(d.shape, layer), d, s=12, c=np.arange(d.size), cmap="tab10")
  ax.set_xticks(range(len(distances)))
  ax.set_xlabel("layer")
  ax.set_ylabel("mean attention distance (pixels)")
  ax.set_title(title, fontsize=8)
  return _save(fig, path)


def plot_token_norms(norms: dict[str, Any], path: str, *, bins: int = 30) -> str:
  """Histogram of the output token norms of each block (Vision Transformers Need Registers)."""
  fig = Figure(figsize=(4, 1.4 * len(norms) + 0.4))
  axes = fig.subplots(len(norms), 1, squeeze=False)
  fig.subplots_adjust(hspace=0.8)
  for ax, (name, n) in zip(axes[:, 0], norms.items()):
    ax.hist(np.ravel(np.asarray(n)), bins=bins, log=True)
    ax.set_title(name, fontsize=7)
  axes[-1, 0].set_xlabel("token norm")
  return _save(fig, path)


def load_rows(path: str) -> list[dict[str, Any]]:
  """Rows of a benchmark table: `.csv` (numbers parsed), `.jsonl`, or `.json` (a list of objects
  or an object with a `rows` list)."""
  if path.endswith(".csv"):
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f))
    def parse(value):
      try:
        return float(value)
      except (TypeError, ValueError):
        return value
    return [{k: parse(v) for k, v in row.items()} for row in rows]
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    data = json.load(f)
  rows = data.get("rows") if isinstance(data, dict) else data
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a list of rows or an object with `rows`")
  return rows


def plot_curves(rows: Sequence[dict[str, Any]], *, x: str, y: str, path: str,
                by: str | Sequence[str] | None = None, logx: bool = False, logy: bool = False,
                title: str = "") -> str:
  """One line of `y` against `x` per value of the `by` column(s) (e.g. time vs length per op).

  Rows missing `x` or `y` (or with a non-numeric value) are skipped.
  """
  keys = [by] if isinstance(by, str) else list(by or [])
  lines = collections.defaultdict(list)
  for row in rows:
    try:
      point = (float(row[x]), float(row[y]))
    except (KeyError, TypeError, ValueError):
      continue
    lines[", ".join(f"{row.get(k)}" for k in keys)].append(point)
  if not lines:
    raise ValueError(f"no row has numeric {x!r} and {y!r}")
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for label, points in sorted(lines.items()):
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, marker="o", markersize=3, label=label or None)
  ax.set_xscale("log" if logx else "linear")
  ax.set_yscale("log" if logy else "linear")
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title, fontsize=9)
  if keys:
    ax.legend(fontsize=7, title=", ".join(keys), title_fontsize=7)
  return _save(fig, path)
