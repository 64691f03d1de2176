"""Every attention op of `big_attn.ops.names()` in every model family that takes one, on
every path: single device, sequence parallel, decoding, fused kernel.

    python experiments/op_matrix.py                    # all cells
    python experiments/op_matrix.py --models=vit,lm --ops=window,softmax --no-write
    python experiments/op_matrix.py --columns=seq_parallel,decode --save=/tmp/lm_paths.json
    python experiments/op_matrix.py --load=/tmp/a.json,/tmp/lm_paths.json   # merge and write

Columns (`--columns`, `COLUMN_MODELS`): a cell is run, never read from the registry.
- "single": every model, one device (below).
- "seq_parallel": the LM (8 heads of dim 4, 2 key/value heads) with its sequence split over 8 devices
  (8 simulated CPU devices) with `seq_strategy="ring"` (each op in its form: block ring,
  recurrent state, convolution inputs, or its heads split); "ok" when loss, logits and
  gradients equal the single-device model's on the same parameters.
- "decode": the LM's `generate` over its KV cache (greedy, 4 new tokens); "ok" when the logits
  each new token was drawn from equal the full forward pass's.
- "kernel": every model with `attention_impl="pallas"` (the Pallas kernels, interpreted on
  CPU): "ok" when the gradient step of "single" passes, the computation contains a
  `pallas_call`, and the output equals the XLA model's; an op without a kernel is refused by
  name. Recorded: the tiny ViT (`vit/kernel`) and the LM (`lm/kernel`).
In these columns a ValueError that names the op, raised while the model is initialised
(before anything runs: a layer refusing an op without that form), is a refusal ("–").
Row keys of the JSON: the model's name for "single", `model/column` for the others.

A "single" cell builds the family's model at tiny sizes with the op by name alone (no op arguments),
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
import functools
import json
import os
import re
import sys
import time
from typing import Any, Callable

SEQ_SHARDS = 8
os.environ["XLA_FLAGS"] = " ".join(  # Before jax is imported: the devices of sequence parallelism.
    [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={SEQ_SHARDS}"]
).strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_attn import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from big_attn import ops  # noqa: E402
from big_attn.ops import spatial  # noqa: E402
from big_attn.models import lm  # noqa: E402
from big_attn.parallel import mesh as mesh_lib  # noqa: E402

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


def _lm_inputs(length: int):
  """rng -> tokens `[2, length]`; the apply arguments: two packed documents a row."""
  return (lambda rng: (jax.random.randint(rng, (2, length), 0, 11),),
          dict(segment_ids=jnp.repeat(jnp.arange(2), length // 2)[None].repeat(2, axis=0)))


def _tiny_models() -> dict[str, tuple[Callable[..., Any], Callable, dict[str, Any]]]:
  """name -> ((op, **fields) -> Model, rng -> call arguments, apply keyword arguments): tiny
  sizes, the digits configs' settings (LayerNorm where a family offers BatchNorm, to stay
  stateless; EfficientViT, LeViT, LIT and DHVT have only BatchNorm, so they run with
  `train=True` on batch statistics, as in training: with the initial running statistics nothing normalises the
  perturbed model's activations); `fields` are further Model fields (`attention_impl`, the
  LM's mesh)."""
  vit_sizes = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(2, 2))
  return {
      "vit": (lambda op, **f: models.get("vit").Model(num_classes=3, attention=op, **vit_sizes,
                                                     **f),
              _image((2, 8, 8, 1)), {}),
      "deit": (lambda op, **f: models.get("deit").Model(num_classes=3, attention=op,
                                                       **vit_sizes, **f),
               _image((2, 8, 8, 1)), dict(train=True)),
      "dit": (lambda op, **f: models.get("dit").Model(
          num_classes=3, width=16, depth=1, num_heads=2, patch_size=(2, 2), learn_sigma=False,
          attention=op, **f),
              lambda rng: (jax.random.normal(rng, (2, 8, 8, 1)), jnp.array([3, 500]),
                           jnp.array([0, 2])), {}),
      "cvt": (lambda op, **f: models.get("cvt").Model(
          num_classes=3, dims=(8, 16), num_heads=(1, 2), depths=(1, 1), patch_size=(3, 3),
          patch_stride=(2, 2), patch_padding=(1, 1), conv_norm="layer", attention=op, **f),
              _image((2, 16, 16, 1)), {}),
      "maxvit": (lambda op, **f: models.get("maxvit").Model(
          num_classes=3, embed_dims=(16, 16), depths=(1, 1), stem_width=8, head_dim=8,
          partition_size=2, block_attention=op, grid_attention=op, conv_norm="layer", **f),
                 _image((2, 16, 16, 1)), {}),
      "hvit": (lambda op, **f: models.get("hvit").Model(
          num_classes=3, family="davit", embed_dims=(8, 8, 16, 16), depths=(1, 1, 1, 1),
          num_heads=(1, 1, 2, 2), mlp_ratios=2, patch_size=2, local_attention=op,
          global_attention=op, **f),
               _image((2, 32, 32, 1)), {}),
      "metaformer": (lambda op, **f: models.get("metaformer").Model(
          num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), mixers="attention",
          attention=op, mixer_args=dict(attention=dict(head_dim=8)), **f),
                     _image((2, 32, 32, 1)), {}),
      "pit": (lambda op, **f: models.get("pit").Model(
          num_classes=3, base_dim=8, num_heads=(1, 2), depths=(1, 1), patch_size=2,
          patch_stride=2, attention=op, **f),
              _image((2, 16, 16, 1)), {}),
      "t2t": (lambda op, **f: models.get("t2t").Model(
          num_classes=3, width=16, depth=1, num_heads=2, mlp_dim=32, token_dim=8,
          split_kernels=(3, 3), split_strides=(2, 2), split_paddings=(1, 1),
          token_attention=op, attention=op, **f),
              _image((2, 16, 16, 1)), {}),
      "mobilevit": (lambda op, **f: models.get("mobilevit").Model(
          num_classes=3, channels=(8, 8, 16, 16, 16), dims=(16, 16, 16), expansion=2,
          head_channels=16, depths=(1, 1, 1), strides=(1, 1, 2, 1, 2, 1), num_heads=2,
          attention=op, **f),
                    _image((2, 16, 16, 1)), {}),
      "crossvit": (lambda op, **f: models.get("crossvit").Model(
          num_classes=3, widths=(8, 12), num_heads=(2, 3), depths=(1, 1), num_stages=1,
          mlp_ratio=2, patch_sizes=(2, 4), attention=op, **f),
                   _image((2, 8, 8, 1)), {}),
      "tnt": (lambda op, **f: models.get("tnt").Model(
          num_classes=3, width=8, depth=1, num_heads=2, inner_width=4, inner_heads=1,
          patch_size=4, pixel_stride=2, mlp_ratio=2, inner_mlp_ratio=2, inner_attention=op,
          attention=op, **f),
              _image((2, 16, 16, 1)), {}),
      "volo": (lambda op, **f: models.get("volo").Model(
          num_classes=3, depths=(1, 1), widths=(8, 16), num_heads=(2, 4), mlp_ratio=2,
          stem_dim=4, patch_size=2, class_blocks=1, attention=op, **f),
               _image((2, 16, 8, 1)), {}),
      "efficientvit": (lambda op, **f: models.get("efficientvit").Model(
          num_classes=3, widths=(8, 12, 16), depths=(1, 1, 1), num_heads=(2, 3, 2), key_dim=4,
          kernel_size=3, window_size=3, patch_size=2, attention=op, **f),
                       _image((2, 8, 16, 1)), dict(train=True)),
      "mvit": (lambda op, **f: models.get("mvit").Model(
          num_classes=3, dims=(8, 16), num_heads=(1, 2), depths=(1, 1), patch_size=3,
          patch_stride=2, patch_padding=1, stride_q=(1, 2), stride_kv=2, attention=op, **f),
               _image((2, 16, 16, 1)), {}),
      "dat": (lambda op, **f: models.get("dat").Model(
          num_classes=3, dims=(8,), depths=(2,), num_heads=(2,), offset_groups=(1,),
          stage_spec=("ND",), strides=(2,), offset_kernels=(3,), patch_size=2, attention=op,
          local_attention=op, **f),
              _image((2, 8, 8, 1)), {}),
      "levit": (lambda op, **f: models.get("levit").Model(
          num_classes=3, widths=(8, 12, 16), key_dim=4, num_heads=(2, 3, 2), depths=(1, 1, 1),
          patch_size=2, attention=op, **f),
                _image((2, 8, 12, 1)), dict(train=True)),
      "lit": (lambda op, **f: models.get("lit").Model(
          num_classes=3, widths=(4, 8, 8, 8), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1),
          patch_size=2, attention=op, **f),
              _image((2, 32, 32, 1)), dict(train=True)),  # attention on 4x4 and 2x2 maps
      "dhvt": (lambda op, **f: models.get("dhvt").Model(
          num_classes=3, width=8, depth=1, num_heads=2, patch_size=2, attention=op, **f),
               _image((2, 8, 8, 1)), dict(train=True)),
      "lm": (lambda op, **f: models.get("lm").Model(
          **{**dict(vocab_size=11, width=16, depth=1, num_heads=2, num_kv_heads=1,
                    qk_norm=True), **f}, attention=op),
             *_lm_inputs(8)),
  }


MODELS = tuple(_tiny_models())
COLUMNS = ("single", "seq_parallel", "decode", "kernel")
# The models each column runs: sequence parallelism and decoding are the LM's.
COLUMN_MODELS = {"single": MODELS, "seq_parallel": ("lm",), "decode": ("lm",),
                 "kernel": MODELS}
# Relative tolerance of the comparisons with the single-device XLA model (float32).
TOLERANCE = 2e-4


def row_key(model_name: str, column: str) -> str:
  """The JSON row of a (model, column): the model's name for "single", else `model/column`."""
  return model_name if column == "single" else f"{model_name}/{column}"


def split_key(key: str) -> tuple[str, str]:
  model_name, _, column = key.partition("/")
  return model_name, column or "single"


def _attention_grad_norm(grads) -> float:
  """Largest |gradient| over the query projections (the attention's own parameters): a `query`
  module, or EfficientViT's per-head `query_kernel`."""
  leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
            if any(getattr(k, "key", None) in ("query", "query_kernel") for k in path)]
  return max((float(jnp.max(jnp.abs(x))) for x in leaves), default=0.0)


def _perturbed(params, rng):
  """Every parameter plus 0.05·N(0, 1) noise (zero-initialised heads and gates pass a
  gradient)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def _close(got, want) -> bool:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return got.shape == want.shape and bool(np.allclose(
      got, want, rtol=TOLERANCE, atol=TOLERANCE * max(1.0, float(np.max(np.abs(want))))))


def _apply(model, variables, inputs, kwargs, rng):
  """`model.apply` of the cell: in training mode (`train=True`) batch statistics are computed
  from the batch and their update dropped."""
  mutable = ["batch_stats"] if kwargs.get("train") and "batch_stats" in variables else False
  out = model.apply(variables, *inputs, **kwargs, rngs={"dropout": rng}, mutable=mutable)
  return out[0] if mutable else out


def _column_model(column: str, make_model, op: str):
  if column == "seq_parallel":
    return make_model(op, mesh=mesh_lib.make_mesh([("seq", SEQ_SHARDS)]), seq_strategy="ring")
  if column == "kernel":
    return make_model(op, attention_impl="pallas")
  return make_model(op)


def run_cell(model_name: str, op: str, jit: bool = False, trace_only: bool = False,
             column: str = "single") -> tuple[str, str]:
  """`(status, reason)` of op `op` in model `model_name` on path `column`: "ok", "refused" or
  "fail". Eager (`jit=False`) shares the compiled primitives across cells, which is faster at
  tiny sizes; `jit` compiles the initialisation, the parameters' perturbation, the gradient and
  its single-device reference as whole programs (one compile each, not one per primitive).
  `trace_only` traces init, forward and gradient (`jax.eval_shape`) without running them: "ok"
  then says that every argument check passed (reason "traced, not run")."""
  if column not in COLUMNS:
    raise ValueError(f"column must be one of {COLUMNS}, got {column!r}")
  if model_name not in COLUMN_MODELS[column]:
    raise ValueError(f"column {column!r} runs in {COLUMN_MODELS[column]}, got {model_name!r}")
  make_model, make_inputs, kwargs = _tiny_models()[model_name]
  if column == "seq_parallel":
    make_inputs, kwargs = _lm_inputs(2 * SEQ_SHARDS)
    # As many heads as shards (GQA 4:1), so that ops which split their heads can; head dim 4.
    make_model = functools.partial(make_model, num_heads=SEQ_SHARDS, num_kv_heads=2,
                                   width=4 * SEQ_SHARDS)
  if column in ("seq_parallel", "decode"):
    kwargs = {}  # one document a row: what decoding and state passing take (packed rows:
    # the single-device column and the tests of each path)
  rng_init, rng_in, rng_noise, rng_target = jax.random.split(jax.random.key(0), 4)
  inputs = make_inputs(rng_in)
  try:  # Up front: building and initialising the model (or its decoder), where refusals are.
    model = _column_model(column, make_model, op)
    if column == "decode":
      jax.eval_shape(lambda: model.clone(decode=True, cache_len=8).init(
          rng_init, inputs[0][:, :1], positions=jnp.zeros((2, 1), jnp.int32)))
    if trace_only:
      variables = jax.eval_shape(lambda: model.init(rng_init, *inputs, **kwargs))
    else:
      init = functools.partial(model.init, **kwargs)  # static keywords (train=True)
      variables = (jax.jit(init) if jit else init)(rng_init, *inputs)
  except spatial.OpRefused as e:
    return "refused", str(e)
  except ValueError as e:
    if column != "single" and repr(op) in str(e):
      return "refused", " ".join(str(e).split())
    return "fail", f"{type(e).__name__}: {_first_line(e)}"
  except Exception as e:  # pylint: disable=broad-except
    return "fail", f"{type(e).__name__}: {_first_line(e)}"
  try:
    if trace_only:
      jax.eval_shape(jax.grad(lambda params, others: jnp.sum(jnp.concatenate([
          jnp.ravel(o) for o in jax.tree.leaves(_apply(
              model, dict(others, params=params), inputs, kwargs, rng_init))]))),
                     variables["params"], {k: v for k, v in variables.items() if k != "params"})
      return "ok", "traced, not run"
    params = (jax.jit(_perturbed) if jit else _perturbed)(variables["params"], rng_noise)
    if column == "decode":
      return _check_decode(model, params, inputs[0])
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, model=model):
      out = _apply(model, {"params": params, **others}, inputs, kwargs, rng_init)
      out = jnp.concatenate([jnp.ravel(o) for o in jax.tree.leaves(out)])
      target = jax.random.normal(rng_target, out.shape, jnp.float32)
      return jnp.sum(out * target), out

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, out), grads = (jax.jit(grad_fn) if jit else grad_fn)(params)
    if column in ("seq_parallel", "kernel"):
      if column == "kernel" and "pallas_call" not in str(jax.make_jaxpr(loss)(params)):
        return "fail", "no pallas_call: the kernel is not reached"
      reference = functools.partial(grad_fn, model=make_model(op))
      (_, want), want_grads = (jax.jit(reference) if jit else reference)(params)
      if not _close(out, want):
        return "fail", f"output differs from the single-device XLA model's by " \
                       f"{float(jnp.max(jnp.abs(out - want))):.2g}"
      if not all(_close(g, w) for g, w in zip(jax.tree.leaves(grads),
                                              jax.tree.leaves(want_grads))):
        return "fail", "gradient differs from the single-device XLA model's"
  except Exception as e:  # pylint: disable=broad-except
    return "fail", f"{type(e).__name__}: {_first_line(e)}"
  if not np.isfinite(float(value)):
    return "fail", f"loss {float(value)}"
  if not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)):
    return "fail", "non-finite gradient"
  if _attention_grad_norm(grads) == 0.0:
    return "fail", "zero attention gradient"
  return "ok", ""


def _check_decode(model, params, tokens) -> tuple[str, str]:
  """Greedy `lm.generate` of 4 tokens after a 4-token prompt against the full forward pass of
  the 8 tokens, the decoder's `cache_len` (ops whose constants or tables are sized by the
  sequence length see the same length in both)."""
  out, logits = lm.generate(model, params, tokens[:, :4], 4, temperature=0.0,
                            return_logits=True)
  full = model.apply({"params": params}, out)[:, 3:-1]
  if not np.all(np.isfinite(np.asarray(logits))):
    return "fail", "non-finite decoding logits"
  if not _close(logits, full):
    return "fail", (f"decoding logits differ from the full forward pass by "
                    f"{float(jnp.max(jnp.abs(logits - full))):.2g}")
  return "ok", ""


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return re.sub(r"\s+", " ", text[0] if text else "")[:200]


def run(model_names, op_names, columns=("single",), log=print, trace_only=False, save=""
        ) -> dict[str, dict[str, list[str]]]:
  """`{row_key: {op: [status, reason]}}` of every cell of `columns` x `model_names` (the models
  each column runs) x `op_names`, the paths other than "single" under `jit`; with `save`, the
  cells so far are dumped after each cell."""
  cells: dict[str, dict[str, list[str]]] = {}
  for column in columns:
    for model_name in (m for m in model_names if m in COLUMN_MODELS[column]):
      key = row_key(model_name, column)
      cells[key] = {}
      for op in op_names:
        start = time.perf_counter()
        status, reason = run_cell(model_name, op, jit=column != "single",
                                  trace_only=trace_only, column=column)
        cells[key][op] = [status, reason]
        log(f"{key:18s} {op:18s} {status:7s} {time.perf_counter() - start:5.1f}s {reason}",
            flush=True)
        if save:
          with open(save, "w", encoding="utf-8") as f:
            json.dump(cells, f)
  return cells


def ordered(cells) -> dict[str, dict[str, list[str]]]:
  """`cells` with its rows in column, then model order."""
  keys = [row_key(m, c) for c in COLUMNS for m in COLUMN_MODELS[c]]
  return {k: cells[k] for k in keys if k in cells}


def counts(cells) -> dict[str, dict[str, int]]:
  return {m: {s: sum(v[0] == s for v in row.values()) for s in ("ok", "refused", "fail")}
          for m, row in cells.items()}


def readme_table(cells) -> str:
  """The op x model table (single device), then the op x path table (sequence parallel,
  decoding, kernel): ✓ works, – refused up front (not meaningful), ✗ fails."""
  single = {k: row for k, row in cells.items() if split_key(k)[1] == "single"}
  paths = {k: row for k, row in cells.items() if split_key(k)[1] != "single"}
  return "\n\n".join(_table(part) for part in (single, paths) if part)


def _table(cells) -> str:
  names = list(cells)
  op_names = sorted({op for row in cells.values() for op in row})
  mark = {"ok": "✓", "refused": "–", "fail": "✗"}
  header = [" ".join(split_key(k)[::-1]) if "/" in k else k for k in names]
  lines = ["| op | " + " | ".join(header) + " |", "|---|" + "---|" * len(names)]
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
  kernels = {"softmax": "flash softmax, cuDNN", "sigmoid": "FlashSigmoid",
             "cog": "flash signed softmax"}
  parallel_names = {"block": "ring / striped / all_gather",
                    "state": "state passing (LASP), contiguous",
                    "convolution": "conv inputs over ring / striped / all_gather",
                    "heads": "heads split (all-to-all), any order",
                    "cascade": "heads in turn, each over ring / striped / all_gather",
                    None: "–"}
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
  lines = ["# Every op in every model and path (`python experiments/op_matrix.py`)", "",
           header, "",
           "| model / path | works | refused | fails | works before |", "|---|---|---|---|---|"]
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
  parser.add_argument("--ops", default="", help="comma-separated ops (default: all registered)")
  parser.add_argument("--columns", default=",".join(COLUMNS),
                      help=f"comma-separated paths of {COLUMNS}")
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
  columns = [c for c in args.columns.split(",") if c]
  for name, given, known in (("models", model_names, MODELS), ("columns", columns, COLUMNS),
                             ("ops", op_names, ops.names())):
    unknown = sorted(set(given) - set(known))
    if unknown:
      parser.error(f"unknown {name} {unknown}; known: {', '.join(known)}")
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
    cells = ordered(cells)
  else:
    cells = run(model_names, op_names, columns, trace_only=args.trace_only, save=args.save)
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
