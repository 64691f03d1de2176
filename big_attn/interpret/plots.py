"""PNG figures (matplotlib figures drawn off-screen, whatever the pyplot backend): attention over
an image, relevance heat maps (each with its colour bar), attention distances per head, token
norms, bertviz's head, model and neuron views, and benchmark curves from CSV/JSON rows."""
from __future__ import annotations

import collections
import csv
import json
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


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


# ------------------------------------------------ bertviz: head, model and neuron views
# A Multiscale Visualization of Attention in the Transformer Model (Vig, 2019).
def _attention_layers(attention: Any) -> list[np.ndarray]:
  """`[layers][heads, q, k]`, `[layers, heads, q, k]` or `{layer: [heads, q, k]}` -> float64
  `[heads, q, k]` per layer."""
  if isinstance(attention, Mapping):
    attention = list(attention.values())
  layers = [np.asarray(a, np.float64) for a in attention]
  if not layers:
    raise ValueError("attention must hold at least one layer, got none")
  for index, weights in enumerate(layers):
    if weights.ndim != 3:
      raise ValueError(f"attention must be [layers][heads, q, k]: layer {index} has shape "
                       f"{weights.shape}")
  return layers


def _token_labels(labels: Sequence[str] | None, count: int, name: str) -> list[str]:
  labels = [str(i) for i in range(count)] if labels is None else [str(t) for t in labels]
  if len(labels) != count:
    raise ValueError(f"{name} must name the {count} tokens, got {len(labels)}")
  return labels


def _check_index(value: int, size: int, name: str) -> int:
  if not -size <= value < size:
    raise ValueError(f"{name} {value} is out of range for {size}")
  return value % size


def _attention_lines(ax, weights: np.ndarray, color: str, query: int | None = None):
  """Lines from query token i (left column, x=0, row i from the top) to key token j (right
  column, x=1), opacity = the weight clipped to [0, 1]; only token `query`'s with an index.
  Returns the `LineCollection`, segments in row-major (i, j) order."""
  rows = range(weights.shape[0]) if query is None else [query]
  segments = [[(0.0, -i), (1.0, -j)] for i in rows for j in range(weights.shape[1])]
  colors = np.tile(to_rgba(color), (len(segments), 1))
  colors[:, 3] = np.clip(weights[list(rows)].ravel(), 0.0, 1.0)
  lines = LineCollection(segments, colors=colors, linewidths=1.5)
  ax.add_collection(lines)
  ax.set_xlim(-0.05, 1.05)
  ax.set_ylim(-max(weights.shape) + 0.5, 0.5)
  ax.axis("off")
  return lines


def plot_head_view(attention: Any, path: str, *, layer: int = 0,
                   heads: Sequence[int] | None = None, labels: Sequence[str] | None = None,
                   query_labels: Sequence[str] | None = None, query: int | None = None,
                   title: str = "") -> str:
  """bertviz's head view (A Multiscale Visualization of Attention in the Transformer Model):
  the attention of one layer as lines from each query token (left) to each key token (right),
  opacity = weight, one colour per head (`C0`, `C1`, ... by head index), the heads overlaid.

  `attention`: `[layers][heads, q, k]` (or `[layers, heads, q, k]`, or `{layer: [heads, q, k]}`)
  of one example; `layer` its index; `heads`
  the heads to draw (default all); `labels` the k key tokens (`token_labels`), `query_labels`
  the q query tokens (default `labels`); `query` draws only that token's lines.
  """
  layers = _attention_layers(attention)
  layer = _check_index(layer, len(layers), "layer")
  weights = layers[layer]
  num_heads, num_queries, num_keys = weights.shape
  heads = list(range(num_heads)) if heads is None else [
      _check_index(h, num_heads, "heads: head") for h in heads]
  keys = _token_labels(labels, num_keys, "labels")
  if query_labels is None and labels is not None and num_queries != num_keys:
    raise ValueError(f"query_labels must name the {num_queries} query tokens: labels names "
                     f"{num_keys} keys")
  queries = _token_labels(query_labels if query_labels is not None else labels, num_queries,
                          "query_labels")
  if query is not None:
    query = _check_index(query, num_queries, "query")
  fig = Figure(figsize=(3.2, 0.6 + 0.22 * max(num_queries, num_keys)), layout="constrained")
  ax = fig.subplots()
  for h in heads:
    _attention_lines(ax, weights[h], f"C{h % 10}", query)
  for i, text in enumerate(queries):
    ax.text(-0.03, -i, text, ha="right", va="center", fontsize=6,
            fontweight="bold" if i == query else "normal")
  for j, text in enumerate(keys):
    ax.text(1.03, -j, text, ha="left", va="center", fontsize=6)
  ax.legend(handles=[Line2D([], [], color=f"C{h % 10}", label=f"head {h}") for h in heads],
            fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
            ncol=min(len(heads), 4))
  fig.suptitle("\n".join(filter(None, [title, f"layer {layer}: query (left) to key (right)"])),
               fontsize=8)
  return _save(fig, path)


def plot_model_view(attention: Any, path: str, *, layer_names: Sequence[str] | None = None,
                    title: str = "") -> str:
  """bertviz's model view: rows = layers, columns = heads, each cell the head view's lines of
  that head in small (query tokens left, key tokens right, opacity = weight).

  `attention`: `[layers][heads, q, k]` (or `[layers, heads, q, k]`, or `{layer: [heads, q, k]}`
  whose keys name the rows unless `layer_names` does) of one example; a layer with fewer heads
  leaves its last cells empty.
  """
  layers = _attention_layers(attention)
  if layer_names is None:
    layer_names = (list(attention) if isinstance(attention, Mapping)
                   else [f"layer {i}" for i in range(len(layers))])
  names = [str(n) for n in layer_names]
  if len(names) != len(layers):
    raise ValueError(f"layer_names must name the {len(layers)} layers, got {len(names)}")
  heads = max(w.shape[0] for w in layers)
  name_width = 0.06 * max(len(n) for n in names)
  fig = Figure(figsize=(0.9 * heads + name_width + 0.3, 0.9 * len(layers) + 0.5),
               layout="constrained")
  axes = fig.subplots(len(layers), heads, squeeze=False)
  for row, (name, weights) in enumerate(zip(names, layers)):
    for h in range(heads):
      ax = axes[row, h]
      if h < weights.shape[0]:
        _attention_lines(ax, weights[h], f"C{h % 10}")
      ax.axis("off")
      if row == 0:
        ax.set_title(f"head {h}", fontsize=6)
    axes[row, 0].text(-0.1, 0.5, name, transform=axes[row, 0].transAxes, ha="right",
                      va="center", fontsize=6)
  fig.suptitle("\n".join(filter(None, [title, "attention of every layer (rows) and head"])),
               fontsize=8)
  return _save(fig, path)


def neuron_view_values(query: Any, key: Any, token: int, *, scale: float | None = None
                       ) -> dict[str, np.ndarray]:
  """What bertviz's neuron view shows for query token `token` of one head, in float64.

  `query` `[q, d]`, `key` `[k, d]` (one head of `interpret.query_key_vectors`' vectors):
  `{"query": q_i [d], "keys": k_j [k, d], "products": q_i ⊙ k_j [k, d], "scores":
  scale·q_i·k_j [k], "weights": softmax(scores) [k]}`, `scale` 1/√d by default.
  """
  query, key = np.asarray(query, np.float64), np.asarray(key, np.float64)
  if query.ndim != 2 or key.ndim != 2 or query.shape[1] != key.shape[1]:
    raise ValueError(f"query and key must be [tokens, dim] with the same dim, got shapes "
                     f"{query.shape} and {key.shape}")
  token = _check_index(token, query.shape[0], "token")
  scale = 1.0 / np.sqrt(query.shape[1]) if scale is None else float(scale)
  products = query[token] * key
  scores = scale * products.sum(-1)
  weights = np.exp(scores - scores.max())
  return dict(query=query[token], keys=key, products=products, scores=scores,
              weights=weights / weights.sum())


def plot_neuron_view(query: Any, key: Any, token: int, path: str, *, scale: float | None = None,
                     labels: Sequence[str] | None = None, title: str = "") -> str:
  """bertviz's neuron view of one head and query token i (`neuron_view_values`) as heat-map
  strips: q_i on top; below, one row per key token j: k_j, q_i ⊙ k_j, the scaled score
  q_i·k_j and the softmax weight (both written in their cells), each with its colour bar.

  `query` `[q, d]`, `key` `[k, d]`; `labels` the k key tokens (`token_labels`).
  """
  values = neuron_view_values(query, key, token, scale=scale)
  num_keys, dim = values["keys"].shape
  keys = _token_labels(labels, num_keys, "labels")
  fig = Figure(figsize=(2.0 + 0.12 * 2 * dim + 1.6, 0.9 + 0.2 * num_keys), layout="constrained")
  axes = fig.subplots(2, 4, height_ratios=[1, max(num_keys, 1)],
                      width_ratios=[dim, dim, 2, 2])
  signed = lambda a: dict(cmap="RdBu_r", vmin=-max(np.abs(a).max(), 1e-12),
                          vmax=max(np.abs(a).max(), 1e-12))
  vectors = np.concatenate([values["query"], values["keys"].ravel()])
  panels = [(axes[0, 0], values["query"][None], "query q_i", signed(vectors)),
            (axes[1, 0], values["keys"], "keys k_j", signed(vectors)),
            (axes[1, 1], values["products"], "q_i ⊙ k_j", signed(values["products"])),
            (axes[1, 2], values["scores"][:, None], "q_i·k_j scaled", signed(values["scores"])),
            (axes[1, 3], values["weights"][:, None], "softmax", dict(cmap="Blues", vmin=0,
                                                                      vmax=1))]
  for ax, data, name, style in panels:
    shown = ax.imshow(data, aspect="auto", interpolation="nearest", **style)
    _colorbar(fig, ax, shown)
    ax.set_title(name, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  for ax, name in ((axes[1, 2], "scores"), (axes[1, 3], "weights")):
    dark = np.abs(values[name]) > 0.6 * ax.images[0].get_clim()[1]
    for j, v in enumerate(values[name]):
      ax.text(0, j, f"{v:.2f}", ha="center", va="center", fontsize=5,
              color="white" if dark[j] else "black")
  axes[1, 0].set_yticks(range(num_keys), keys, fontsize=6)
  for ax in axes[0, 1:]:
    ax.axis("off")
  fig.suptitle("\n".join(filter(None, [title, f"neuron view of query token {token}"])),
               fontsize=8)
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
