"""PNG figures (matplotlib figures drawn off-screen, whatever the pyplot backend): attention over
an image, relevance heat maps (each with its colour bar), attention distances per head, token
norms, and benchmark curves from CSV/JSON rows."""
from __future__ import annotations

import collections
import csv
import json
import os
import warnings
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


def _colorbar(fig, ax, image) -> None:
  bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
  bar.ax.tick_params(labelsize=5)


def _overlay(fig, ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
  """`heat` with its colour bar and the image's outline (its mid-brightness contour) over it;
  signed maps (AtMan) diverge around zero."""
  h, w = image.shape[:2]
  if heat.min() < 0:
    limit = max(np.abs(heat).max(), 1e-12)
    style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit)
  else:
    style = dict(cmap="viridis")
  shown = ax.imshow(heat, extent=(0, w, h, 0), interpolation="nearest", **style)
  brightness = image if image.ndim == 2 else image.mean(-1)
  if np.ptp(brightness) > 0:
    ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, brightness,
               levels=[(brightness.min() + brightness.max()) / 2], colors="white",
               linewidths=0.8)
  _colorbar(fig, ax, shown)
  ax.set_title(title, fontsize=7)
  ax.axis("off")


def plot_attention_maps(image: Any, maps: dict[str, Any], grid: tuple[int, int], path: str, *,
                        num_prefix: int = 0, query: int | None = None, title: str = "") -> str:
  """One row per layer, one panel per head: the attention to each patch over the image.

  `maps`: `{name: [heads, n, n]}` of one example; the row of token `query`, or with None the
  mean over the patch queries, restricted to the patch keys `num_prefix .. + gh·gw`.
  """
  image = display_image(image)
  gh, gw = grid
  patches = slice(num_prefix, num_prefix + gh * gw)
  heads = max(np.asarray(m).shape[0] for m in maps.values())
  fig = Figure(figsize=(1.9 * heads, 1.7 * len(maps) + 0.5), layout="constrained")
  axes = fig.subplots(len(maps), heads, squeeze=False)
  for row, (name, m) in enumerate(maps.items()):
    m = np.asarray(m, np.float64)
    rows = m[:, query] if query is not None else m[:, patches].mean(1)
    for h in range(heads):
      ax = axes[row, h]
      if h >= m.shape[0]:
        ax.axis("off")
        continue
      _overlay(fig, ax, image, rows[h, patches].reshape(gh, gw), f"{name} h{h}")
  reader = ("the patches (mean)" if query is None
            else "the class token" if query < num_prefix else f"token {query}")
  fig.suptitle("\n".join(filter(None, [title, f"attention of {reader} to each patch"])),
               fontsize=8)
  return _save(fig, path)


def plot_heatmaps(image: Any, heatmaps: dict[str, Any], path: str, *, title: str = "") -> str:
  """The image, then each `[gh, gw]` heat map (rollout, flow, ...) over it, in one row."""
  image = display_image(image)
  fig = Figure(figsize=(2.4 * (len(heatmaps) + 1), 2.6), layout="constrained")
  axes = fig.subplots(1, len(heatmaps) + 1, squeeze=False)
  axes[0, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
  axes[0, 0].set_title("input", fontsize=7)
  axes[0, 0].axis("off")
  for ax, (name, heat) in zip(axes[0, 1:], heatmaps.items()):
    _overlay(fig, ax, image, np.asarray(heat, np.float64), name)
  if title:
    fig.suptitle(title, fontsize=8)
  return _save(fig, path)


def plot_distances(distances: Sequence[Any], path: str, *, title: str = "") -> str:
  """Mean attention distance of every head against depth (ViT's Figure 7): `distances[l]` is
  layer l's `[heads]` distances in pixels; one colour per head, named in the legend."""
  distances = [np.ravel(np.asarray(d, np.float64)) for d in distances]
  heads = max(d.size for d in distances)
  fig = Figure(figsize=(4.8, 3), layout="constrained")
  ax = fig.subplots()
  offsets = 0.25 * (np.arange(heads) - (heads - 1) / 2) / max(heads - 1, 1)
  for h in range(heads):
    layers = [layer for layer, d in enumerate(distances) if h < d.size]
    ax.plot(np.add(layers, offsets[h]), [distances[layer][h] for layer in layers], "o",
            markersize=4, color=f"C{h % 10}", label=f"head {h}")
  ax.set_xticks(range(len(distances)))
  ax.set_xlabel("layer")
  ax.set_ylabel("mean attention distance (pixels)")
  ax.set_ylim(bottom=0)
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  ax.set_title(title, fontsize=8)
  return _save(fig, path)


def token_labels(num_tokens: int, *, num_prefix: int = 0, num_registers: int = 0) -> list[str]:
  """Axis labels of a ViT's tokens: `CLS` (or `prefix i`), patch indices in row-major order,
  then `reg i` for the registers."""
  num_patches = num_tokens - num_prefix - num_registers
  if num_patches < 0:
    raise ValueError(f"num_prefix {num_prefix} + num_registers {num_registers} exceed "
                     f"num_tokens {num_tokens}")
  prefix = ["CLS"] if num_prefix == 1 else [f"prefix {i}" for i in range(num_prefix)]
  return prefix + [str(i) for i in range(num_patches)] + [f"reg {i}"
                                                          for i in range(num_registers)]


def plot_token_norms(norms: dict[str, Any], path: str, *, labels: Sequence[str] | None = None,
                     high_norm: dict[str, Any] | None = None, title: str = "",
                     bins: int | None = None) -> str:
  """The L2 norm of every output token of each block, one bar per token (Vision Transformers
  Need Registers: high-norm artefact tokens stand out).

  `norms`: `{block: [..., n]}`, averaged over any leading (batch) axes; `labels`: the n token
  names (`token_labels`); `high_norm`: `{block: bool [n]}` tokens drawn in red. `bins` is
  deprecated and ignored (the figure was a histogram).
  """
  if bins is not None:
    warnings.warn("plot_token_norms(bins=...) is ignored: token norms are drawn one bar per "
                  "token, not as a histogram", DeprecationWarning, stacklevel=2)
  count = np.asarray(next(iter(norms.values()))).shape[-1]
  labels = list(labels) if labels is not None else [str(i) for i in range(count)]
  if len(labels) != count:
    raise ValueError(f"labels must name the {count} tokens, got {len(labels)}")
  fig = Figure(figsize=(5.5, 1.3 * len(norms) + 0.7), layout="constrained")
  axes = fig.subplots(len(norms), 1, squeeze=False, sharex=True)
  for ax, (name, n) in zip(axes[:, 0], norms.items()):
    n = np.asarray(n, np.float64)
    per_token = n.reshape(-1, n.shape[-1]).mean(0)
    flagged = (np.zeros(per_token.shape, bool) if high_norm is None or name not in high_norm
               else np.asarray(high_norm[name], bool).reshape(per_token.shape))
    ax.bar(np.arange(per_token.size), per_token, color=np.where(flagged, "C3", "C0"))
    ax.set_title(name + (" (red: high-norm)" if flagged.any() else ""), fontsize=7)
    ax.set_ylabel("L2 norm", fontsize=7)
    ax.tick_params(labelsize=6)
  ticks = np.arange(0, count, max(1, count // 32))
  axes[-1, 0].set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if count > 24 else 0,
                         fontsize=6)
  axes[-1, 0].set_xlabel("output token (patches in row-major order)", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
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
