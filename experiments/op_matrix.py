"""Every attention op of `big_attn.ops.names()` in every model family that takes one.

    python experiments/op_matrix.py                    # all cells (~10 min on 2 cores)
    python experiments/op_matrix.py --models=vit,lm --ops=window,softmax --no-write

A cell builds the family's model at tiny sizes with the op by name alone (no op arguments),
initialises it, perturbs every parameter (so zero-initialised heads and adaLN gates pass a
gradient), and computes a random linear loss of the outputs and its gradient under `jit`. It
passes ("ok") when the loss is finite, every gradient is finite and some attention parameter
(a query projection) has a nonzero gradient. A model refuses an op that is not meaningful in
it (`big_attn.ops.spatial.OpRefused`: a 2-D op in the LM, a non-causal op in the LM) before
tracing; any other exception, a non-finite value or a zero attention gradient fails the cell.
The LM runs causally on two packed documents a row (`segment_ids`), as in training.

Writes `experiments/results/op_matrix.md` (counts per model and every cell with its reason),
`experiments/results/op_matrix.json` (the cells, the expectation `tests/test_op_matrix.py`
holds the tree to) and the README table between the `op-matrix` markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_attn import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from big_attn import ops  # noqa: E402
from big_attn.ops import spatial  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
README = os.path.join(ROOT, "README.md")
MARKERS = ("<!-- op-matrix:start -->", "<!-- op-matrix:end -->")
FORM_MARKERS = ("<!-- op-forms:start -->", "<!-- op-forms:end -->")
# Ops working by name alone before models passed their grid and extra tokens (issue 20's table,
# the digits configs on commit 57662f2; this script reproduces vit/deit/dit there).
BEFORE = {"vit": 20, "deit": 20, "dit": 20, "cvt": 15, "maxvit": 24, "hvit": 22,
          "metaformer": 22, "lm": 18}


def _image(shape):
  return lambda rng: (jax.random.normal(rng, shape, jnp.float32),)


def _tiny_models() -> dict[str, tuple[Callable[[str], Any], Callable, dict[str, Any]]]:
  """name -> (op -> Model, rng -> call arguments, apply keyword arguments): tiny sizes, the
  digits configs' settings (LayerNorm where a family offers BatchNorm, to stay stateless)."""
  vit_sizes = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(2, 2))
  return {
      "vit": (lambda op: models.get("vit").Model(num_classes=3, attention=op, **vit_sizes),
              _image((2, 8, 8, 1)), {}),
      "deit": (lambda op: models.get("deit").Model(num_classes=3, attention=op, **vit_sizes),
               _image((2, 8, 8, 1)), dict(train=True)),
      "dit": (lambda op: models.get("dit").Model(
          num_classes=3, width=16, depth=1, num_heads=2, patch_size=(2, 2), learn_sigma=False,
          attention=op),
              lambda rng: (jax.random.normal(rng, (2, 8, 8, 1)), jnp.array([3, 500]),
                           jnp.array([0, 2])), {}),
      "cvt": (lambda op: models.get("cvt").Model(
          num_classes=3, dims=(8, 16), num_heads=(1, 2), depths=(1, 1), patch_size=(3, 3),
          patch_stride=(2, 2), patch_padding=(1, 1), conv_norm="layer", attention=op),
              _image((2, 16, 16, 1)), {}),
      "maxvit": (lambda op: models.get("maxvit").Model(
          num_classes=3, embed_dims=(16, 16), depths=(1, 1), stem_width=8, head_dim=8,
          partition_size=2, block_attention=op, grid_attention=op, conv_norm="layer"),
                 _image((2, 16, 16, 1)), {}),
      "hvit": (lambda op: models.get("hvit").Model(
          num_classes=3, family="davit", embed_dims=(8, 8, 16, 16), depths=(1, 1, 1, 1),
          num_heads=(1, 1, 2, 2), mlp_ratios=2, patch_size=2, local_attention=op,
          global_attention=op),
               _image((2, 32, 32, 1)), {}),
      "metaformer": (lambda op: models.get("metaformer").Model(
          num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), mixers="attention",
          attention=op, mixer_args=dict(attention=dict(head_dim=8))),
                     _image((2, 32, 32, 1)), {}),
      "lm": (lambda op: models.get("lm").Model(
          vocab_size=11, width=16, depth=1, num_heads=2, num_kv_heads=1, qk_norm=True,
          attention=op),
             lambda rng: (jax.random.randint(rng, (2, 8), 0, 11),), dict(
                 segment_ids=jnp.repeat(jnp.arange(2), 4)[None].repeat(2, axis=0))),
  }


MODELS = tuple(_tiny_models())


def _attention_grad_norm(grads) -> float:
  """Largest |gradient| over the query projections (the attention's own parameters)."""
  leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
            if any(getattr(k, "key", None) == "query" for k in path)]
  return max((float(jnp.max(jnp.abs(x))) for x in leaves), default=0.0)


def run_cell(model_name: str, op: str, jit: bool = False, trace_only: bool = False
             ) -> tuple[str, str]:
  """`(status, reason)` of op `op` in model `model_name`: "ok", "refused" or "fail". Eager
  (`jit=False`) shares the compiled primitives across cells, which is faster at tiny sizes.
  `trace_only` traces init, forward and gradient (`jax.eval_shape`) without running them:
  "ok" then says that every argument check passed (reason "traced, not run")."""
  make_model, make_inputs, kwargs = _tiny_models()[model_name]
  rng_init, rng_in, rng_noise, rng_target = jax.random.split(jax.random.key(0), 4)
  try:
    model = make_model(op)
    inputs = make_inputs(rng_in)
    if trace_only:
      variables = jax.eval_shape(lambda: model.init(rng_init, *inputs, **kwargs))
      jax.eval_shape(jax.grad(lambda params: jnp.sum(jnp.concatenate([jnp.ravel(o) for o in (
          jax.tree.leaves(model.apply(dict(variables, params=params), *inputs, **kwargs,
                                      rngs={"dropout": rng_init})))]))), variables["params"])
      return "ok", "traced, not run"
    variables = model.init(rng_init, *inputs, **kwargs)
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(rng_noise, len(leaves))
    params = jax.tree.unflatten(tree, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
      out = model.apply({"params": params, **others}, *inputs, **kwargs,
                        rngs={"dropout": rng_init})
      out = jnp.concatenate([jnp.ravel(o) for o in jax.tree.leaves(out)])
      target = jax.random.normal(rng_target, out.shape, jnp.float32)
      return jnp.sum(out * target)

    value, grads = (jax.jit(jax.value_and_grad(loss)) if jit else jax.value_and_grad(loss))(
        params)
  except spatial.OpRefused as e:
    return "refused", str(e)
  except Exception as e:  # pylint: disable=broad-except
    return "fail", f"{type(e).__name__}: {_first_line(e)}"
  if not np.isfinite(float(value)):
    return "fail", f"loss {float(value)}"
  if not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)):
    return "fail", "non-finite gradient"
  if _attention_grad_norm(grads) == 0.0:
    return "fail", "zero attention gradient"
  return "ok", ""


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return re.sub(r"\s+", " ", text[0] if text else "")[:200]


def run(model_names, op_names, log=print, trace_only=False) -> dict[str, dict[str, list[str]]]:
  """`{model: {op: [status, reason]}}` of every cell."""
  cells: dict[str, dict[str, list[str]]] = {}
  for model_name in model_names:
    cells[model_name] = {}
    for op in op_names:
      start = time.perf_counter()
      status, reason = run_cell(model_name, op, trace_only=trace_only)
      cells[model_name][op] = [status, reason]
      log(f"{model_name:10s} {op:18s} {status:7s} {time.perf_counter() - start:5.1f}s {reason}")
  return cells


def counts(cells) -> dict[str, dict[str, int]]:
  return {m: {s: sum(v[0] == s for v in row.values()) for s in ("ok", "refused", "fail")}
          for m, row in cells.items()}


def readme_table(cells) -> str:
  """The op x model table: ✓ works, – refused up front (not meaningful), ✗ fails."""
  names = list(cells)
  op_names = sorted({op for row in cells.values() for op in row})
  mark = {"ok": "✓", "refused": "–", "fail": "✗"}
  lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for op in op_names:
    lines.append(f"| `{op}` | " + " | ".join(mark[cells[m][op][0]] if op in cells[m] else " "
                                              for m in names) + " |")
  total = counts(cells)
  lines.append("| **works** | " + " | ".join(f"{total[m]['ok']}/{len(cells[m])}" for m in names)
               + " |")
  return "\n".join(lines)


def forms_table() -> str:
  """Per op, from the registry's declarations: its causal form, how it runs with the sequence
  split over devices and in decoding, and the fused kernel it reaches (tested in
  tests/test_registry_layers.py, tests/test_parallel_linear_state.py and the LM tests)."""
  lines = ["| op | causal | sequence-parallel | decoding | kernel |", "|---|---|---|---|---|"]
  kernels = {"softmax": "flash softmax, cuDNN", "sigmoid": "FlashSigmoid"}
  parallel_names = {"block": "ring / striped / all_gather",
                    "state": "state passing (LASP), contiguous", None: "–"}
  decode_names = {"kv_cache": "KV cache", "state": "recurrent state",
                  "inputs": "cached layer inputs", None: "–"}
  for op in ops.names():
    spec = ops.spec(op)
    parallel = parallel_names[ops.sequence_parallel_form(op)]
    decode = decode_names[ops.decoding_form(op)]
    kernel = kernels.get(op, "via softmax" if spec.implementation else "–")
    lines.append(f"| `{op}` | {'✓' if spec.causal else '–'} | {parallel} | {decode} | "
                 f"{kernel} |")
  return "\n".join(lines)


def _replace_between(text: str, markers: tuple[str, str], table: str) -> str:
  start, end = (text.index(m) for m in markers)
  return text[:start + len(markers[0])] + "\n" + table + "\n" + text[end:]


def write_forms() -> None:
  with open(README, encoding="utf-8") as f:
    text = f.read()
  with open(README, "w", encoding="utf-8") as f:
    f.write(_replace_between(text, FORM_MARKERS, forms_table()))


def write(cells, header: str) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "op_matrix.json"), "w", encoding="utf-8") as f:
    json.dump(cells, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write("\n")
  total = counts(cells)
  lines = ["# Every op in every model (`python experiments/op_matrix.py`)", "", header, "",
           "| model | works | refused | fails | works before |", "|---|---|---|---|---|"]
  lines += [f"| {m} | {c['ok']} | {c['refused']} | {c['fail']} | {BEFORE.get(m, '')} |"
            for m, c in total.items()]
  lines += ["", readme_table(cells), "", "## Refusals and failures", ""]
  for m, row in cells.items():
    for op, (status, reason) in row.items():
      if status != "ok":
        lines.append(f"- {m} / `{op}`: {status}: {reason}")
  with open(os.path.join(RESULTS, "op_matrix.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(README, encoding="utf-8") as f:
    text = f.read()
  with open(README, "w", encoding="utf-8") as f:
    f.write(_replace_between(text, MARKERS, readme_table(cells)))
  write_forms()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--ops", default="")
  parser.add_argument("--no-write", action="store_true", help="print only")
  parser.add_argument("--forms-only", action="store_true",
                      help="only rewrite the README's table of forms (from the registry)")
  parser.add_argument("--trace-only", action="store_true",
                      help="trace the cells (argument checks, shapes) without running them")
  parser.add_argument("--save", default="", help="also dump the cells run to this JSON file")
  parser.add_argument("--load", default="",
                      help="comma-separated JSON dumps (--save) to write instead of running; "
                      "a later file's cells replace an earlier's")
  args = parser.parse_args(argv)
  if args.forms_only:
    write_forms()
    return
  model_names = [m for m in args.models.split(",") if m]
  op_names = [o for o in args.ops.split(",") if o] or ops.names()
  start = time.perf_counter()
  header = "jax {version}, {now:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s on {cores} cores."
  if args.load:
    header = ("jax {version}, {now:%Y-%m-%d %H:%M} UTC, merged from runs of parts of the matrix; "
              "a cell whose reason is \"traced, not run\" was traced (`--trace-only`).")
    cells = {}
    for path in args.load.split(","):
      with open(path, encoding="utf-8") as f:
        for model_name, row in json.load(f).items():
          cells.setdefault(model_name, {}).update(row)
    cells = {m: cells[m] for m in MODELS if m in cells}
  else:
    cells = run(model_names, op_names, trace_only=args.trace_only)
  if args.save:
    with open(args.save, "w", encoding="utf-8") as f:
      json.dump(cells, f)
  for m, c in counts(cells).items():
    print(f"{m}: {c['ok']} ok, {c['refused']} refused, {c['fail']} fail of {len(cells[m])}")
  if not args.no_write:
    write(cells, header.format(version=jax.__version__,
                               now=datetime.datetime.now(datetime.timezone.utc),
                               seconds=time.perf_counter() - start, cores=os.cpu_count()))


if __name__ == "__main__":
  main()
