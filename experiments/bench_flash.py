"""Flash-attention benchmark: speed (GPU/TPU) and compiled memory (any platform, CPU included).

  python experiments/bench_flash.py --out=DIR                   # both parts; speed skipped on CPU
  python experiments/bench_flash.py --only=memory               # memory only (runs on CPU)
  python experiments/bench_flash.py --only=speed --seq_lens=1024,8192 --head_dims=128
  python experiments/bench_flash.py --only=speed --smoke        # tiny shapes, any platform

Speed: TFLOP/s of the forward and of forward+backward, bfloat16, head dims 64/128, causal and
not, sequence 1k..16k at a fixed token count per step (batch = tokens // seq, heads =
model_dim // head_dim), side by side: our kernel (`pallas_kernels.flash_attention`, softmax
and sigmoid), `jax.nn.dot_product_attention` (XLA, cuDNN), JAX's bundled Pallas attention
(GPU: the Triton `ops.gpu.attention.mha` and the Mosaic GPU `ops.gpu.attention_mgpu.attention`;
TPU: `ops.tpu.flash_attention`) and tokamax when it imports (its default and each of
`TOKAMAX_IMPLEMENTATIONS`, one column each, so the table says which of them ran). `--impls`
picks a subset. FLOPs count the two forward matmuls (4·b·h·t·s·d, halved when causal) and 2.5x
that for the backward. Before it is timed, each implementation's output (and, with the
backward, dQ) on the first query rows is compared with the float32 reference on those rows
(exact for them: causal masks are top-left aligned, dQ of a row needs only that row); a
mismatch is flagged in the table. A combination that fails (unsupported, out of memory) is
reported as "-" with its error below the table. The table is rewritten after every row, so a
run cut short keeps what it measured.

Memory: `jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes` of forward+backward
against sequence length for our kernel, its plain-JAX reference and `jax.nn` XLA attention (on
CPU the kernel runs in the Pallas interpreter, whose XLA loops hold one block per buffer: the
same asymptotics as the compiled kernel).

Both parts print a markdown table and write it, with a PNG plot, to `--out` (default
experiments/results/; file names carry the platform or device kind; each file starts with
device, versions, date). `--smoke` runs the speed part on tiny shapes (on CPU our kernel in the
Pallas interpreter): it checks the script, not the speed.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import flash_attention, flash_attention_reference  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.interpret import plots  # noqa: E402  pylint: disable=g-import-not-at-top

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _header() -> str:
  dev = jax.devices()[0]
  import jaxlib  # pylint: disable=g-import-not-at-top
  return (f"Device: {dev.platform} / {dev.device_kind} (x{jax.device_count()}); "
          f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.")


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# ---------------------------------------------------------------------------------------------
# Implementations: name -> f(head_dim, causal) returning attention(q, k, v) on [b, t, n, d].
# ---------------------------------------------------------------------------------------------
def _ours(normalizer, interpret=False):
  def make(head_dim, causal):
    del head_dim
    return functools.partial(flash_attention, is_causal=causal, normalizer=normalizer,
                             interpret=interpret)
  return make


def _jax_nn(implementation):
  def make(head_dim, causal):
    del head_dim
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation=implementation)
  return make


def _jax_pallas_triton(head_dim, causal):
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  return lambda q, k, v: attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(head_dim),
                                       causal=causal)


def _jax_pallas_mgpu(head_dim, causal):
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
  config = attention_mgpu.TuningConfig(
      block_q=64, block_kv=128 if head_dim <= 128 else 64, max_concurrent_steps=2, causal=causal,
      block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
  scale = 1 / math.sqrt(head_dim)  # The kernel does not scale: fold it into q.
  # Its shared-memory buffers are float16 (JAX 0.11.2 refuses bfloat16 inputs with a dtype
  # mismatch), so it runs on float16 copies; the casts are inside the timing.
  def fn(q, k, v):
    q, k, v = (x.astype(jnp.float16) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    return attention_mgpu.attention(q, k, v, config)
  return fn


def _jax_pallas_tpu(head_dim, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # pylint: disable=g-import-not-at-top
  def fn(q, k, v):  # Its layout is [b, n, t, d].
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = tpu_flash.flash_attention(q, k, v, causal=causal, sm_scale=1 / math.sqrt(head_dim))
    return out.transpose(0, 2, 1, 3)
  return fn


TOKAMAX_IMPLEMENTATIONS = ("mosaic", "triton", "cudnn", "xla")


def _tokamax(implementation):
  def make(head_dim, causal):
    del head_dim
    import tokamax  # pylint: disable=g-import-not-at-top
    kwargs = {} if implementation is None else dict(implementation=implementation)
    return functools.partial(tokamax.dot_product_attention, is_causal=causal, **kwargs)
  return make


def _implementations(platform: str, interpret: bool = False) -> dict:
  impls = {"ours": _ours("softmax", interpret), "ours_sigmoid": _ours("sigmoid", interpret),
           "xla": _jax_nn("xla")}
  if platform == "gpu":
    impls.update(cudnn=_jax_nn("cudnn"), jax_pallas_triton=_jax_pallas_triton,
                 jax_pallas_mgpu=_jax_pallas_mgpu)
  if platform == "tpu":
    impls.update(jax_pallas_tpu=_jax_pallas_tpu)
  try:
    import tokamax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    impls["tokamax"] = _tokamax(None)
    impls.update({f"tokamax_{name}": _tokamax(name) for name in TOKAMAX_IMPLEMENTATIONS})
  except ImportError:
    pass
  return impls


# ---------------------------------------------------------------------------------------------
# Speed.
# ---------------------------------------------------------------------------------------------
def _inputs(batch, seq, heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys]


def _seconds(fn, args, iters):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _fwd_bwd(attn):
  def step(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)
  return jax.jit(step)


CHECK_ROWS = 128
CHECK_TOL = 3e-2  # bf16 inputs, float32 reference, relative to the largest reference value


@functools.partial(jax.jit, static_argnames=("causal", "normalizer"))
def _reference_rows(q, k, v, do, *, causal, normalizer):
  """The float32 reference's output (and dQ when `do` is given) for the query rows of `q`."""
  def ref(q, k, v):
    return flash_attention_reference(q, k, v, is_causal=causal, normalizer=normalizer)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if do is None:
    return (ref(q, k, v),)
  out, vjp = jax.vjp(ref, q, k, v)
  return out, vjp(do.astype(jnp.float32))[0]


def check_against_reference(fn, args, *, causal, normalizer="softmax", rows=CHECK_ROWS):
  """Max error of `fn`'s output (and dQ, for a forward+backward `fn`) on the first `rows`
  query rows against the float32 reference on those rows, relative to the largest reference
  value; `(error, ok)`."""
  rows = min(rows, args[0].shape[1])
  got = fn(*args)
  got = (got[0], got[1][0]) if isinstance(got, tuple) else (got,)  # (out, dq) or (out,)
  q, k, v = args[0][:, :rows], args[1], args[2]
  do = args[3][:, :rows] if len(args) == 4 else None
  want = _reference_rows(q, k, v, do, causal=causal, normalizer=normalizer)
  error = 0.0
  for x, y in zip(got, want):
    y = np.asarray(y, np.float32)
    scale = max(1.0, float(np.abs(y).max()))
    error = max(error, float(np.abs(np.asarray(x[:, :rows], np.float32) - y).max()) / scale)
  return error, error <= CHECK_TOL


def run_speed(args) -> None:
  platform = jax.default_backend()
  impls = _implementations(platform, interpret=platform == "cpu")
  if args.impls:
    unknown = set(args.impls) - set(impls)
    if unknown:
      print(f"speed: not available here, skipped: {sorted(unknown)}")
    impls = {n: f for n, f in impls.items() if n in args.impls}
  names = list(impls)
  rows, errors, wrong = [], {}, {}
  stem = os.path.join(args.out, f"flash_speed_{_slug(jax.devices()[0].device_kind)}")
  for head_dim in args.head_dims:
    heads = max(1, args.model_dim // head_dim)
    for causal in (False, True):
      for seq in args.seq_lens:
        batch = max(1, args.tokens // seq)
        q, k, v, do = _inputs(batch, seq, heads, head_dim, jnp.bfloat16)
        flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
        row = dict(head_dim=head_dim, causal=causal, seq=seq, batch=batch)
        for name, make in impls.items():
          for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
            try:
              attn = make(head_dim, causal)
              fn = jax.jit(attn) if mode == "fwd" else _fwd_bwd(attn)
              fn_args = (q, k, v) if mode == "fwd" else (q, k, v, do)
              error, ok = check_against_reference(
                  fn, fn_args, causal=causal,
                  normalizer="sigmoid" if name == "ours_sigmoid" else "softmax")
              if not ok:
                wrong[f"{name} {mode} d={head_dim} causal={causal} seq={seq}"] = error
              row[(name, mode)] = mult * flops / _seconds(fn, fn_args, args.iters) / 1e12
              row[(name, mode, "ok")] = ok
            except Exception as e:  # pylint: disable=broad-except
              row[(name, mode)] = None
              errors.setdefault(f"{name} {mode}", f"{type(e).__name__}: {str(e)[:200]}")
              if args.verbose:
                traceback.print_exc()
        rows.append(row)
        print(f"d={head_dim} causal={causal} seq={seq}: " + ", ".join(
            f"{n}/{m}={'-' if row.get((n, m)) is None else f'{row[(n, m)]:.1f}'}"
            for n in names for m in ("fwd", "fwd_bwd")), flush=True)
        _write(stem + ".md", _speed_table(rows, names, errors, wrong))
  print(_speed_table(rows, names, errors, wrong))
  _speed_plot(rows, names, stem + ".png")


def _write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file, so a reader never sees half a table."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.2f}"


def _speed_table(rows, names, errors, wrong) -> str:
  lines = [f"# Flash attention speed (TFLOP/s, bf16)\n\n{_header()}\n\n"
           f"Each timing follows a check of the output (and dQ) on the first {CHECK_ROWS} "
           f"query rows against the float32 reference; `!` marks a result off by more than "
           f"{CHECK_TOL} (relative), listed below.\n"]
  for mode in ("fwd", "fwd_bwd"):
    baselines = [n for n in ("cudnn", "jax_pallas_triton", "jax_pallas_mgpu", "jax_pallas_tpu",
                             "tokamax") if n in names]
    cols = names + [f"ours/{b}" for b in baselines] + ["sigmoid/ours"]
    lines.append(f"\n## {mode}\n\n| head_dim | causal | seq | batch | " + " | ".join(cols)
                 + " |\n|" + "---|" * (4 + len(cols)))
    for r in rows:
      vals = [r.get((n, mode)) for n in names]
      cells = ["-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.3g}")
               + ("" if r.get((n, mode, "ok"), True) else "!") for n, x in zip(names, vals)]
      cells += [_ratio(r.get(("ours", mode)), r.get((b, mode))) for b in baselines]
      cells.append(_ratio(r.get(("ours_sigmoid", mode)), r.get(("ours", mode))))
      lines.append(f"| {r['head_dim']} | {r['causal']} | {r['seq']} | {r['batch']} | "
                   + " | ".join(cells) + " |")
  if wrong:
    lines.append("\nWrong results (max error relative to the reference):\n")
    lines += [f"- {k}: {v:.3g}" for k, v in sorted(wrong.items())]
  if errors:
    lines.append("\nFailures (first error per implementation and pass):\n")
    lines += [f"- {k}: {v}" for k, v in sorted(errors.items())]
  return "\n".join(lines) + "\n"


def _speed_plot(rows, names, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
  fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False)
  for col, (head_dim, causal) in enumerate(panels):
    sel = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == causal]
    for row_i, mode in enumerate(("fwd", "fwd_bwd")):
      ax = axes[row_i][col]
      for name in names:
        pts = [(r["seq"], r[(name, mode)]) for r in sel if r.get((name, mode)) is not None]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=name)
      ax.set_xscale("log", base=2)
      ax.set_title(f"{mode} d={head_dim} causal={causal}", fontsize=9)
      ax.set_xlabel("sequence length")
      ax.set_ylabel("TFLOP/s")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------
def _temp_bytes(attn, shape, dtype) -> int:
  x = jax.ShapeDtypeStruct(shape, dtype)
  step = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)))
  return step.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def run_memory(args) -> None:
  platform = jax.default_backend()
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  interpret = platform == "cpu"
  impls = {
      "ours": functools.partial(flash_attention, is_causal=True, interpret=interpret),
      "reference": functools.partial(flash_attention_reference, is_causal=True),
      "jax.nn xla": functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                      implementation="xla"),
  }
  if platform == "gpu":
    impls["jax.nn cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                              implementation="cudnn")
  rows = []
  for seq in args.memory_seq_lens:
    shape = (1, seq, args.memory_heads, args.memory_head_dim)
    row = {"seq": seq}
    for name, attn in impls.items():
      try:
        row[name] = _temp_bytes(attn, shape, dtype)
      except Exception as e:  # pylint: disable=broad-except
        row[name] = None
        print(f"{name} seq={seq}: {type(e).__name__}: {str(e)[:200]}")
    rows.append(row)
    print(f"seq={seq}: " + ", ".join(f"{n}={row[n]}" for n in impls), flush=True)
  names = list(impls)
  lines = [
      "# Flash attention: compiled temporary memory of forward+backward\n",
      _header(),
      f"\nCausal, batch 1, {args.memory_heads} heads, head_dim {args.memory_head_dim}, "
      f"{jnp.dtype(dtype).name}; `memory_analysis().temp_size_in_bytes` of "
      "`jit(grad(sum(attention)))`, in MiB, with the growth factor from the previous length. "
      + ("On CPU the kernel runs in the Pallas interpreter: XLA loops over the grid that "
         "carry whole operands (padded inputs, output, residuals) through the loop, so the "
         "absolute sizes overstate a compiled kernel's; the growth factor is the point. "
         if interpret else "")
      + "The reference and XLA build the [q_len, kv_len] matrix: 4x per doubling; the kernel "
      "keeps tiles and per-row statistics: 2x.\n",
      "| seq | " + " | ".join(f"{n} MiB | x" for n in names) + " |",
      "|" + "---|" * (1 + 2 * len(names)),
  ]
  for i, row in enumerate(rows):
    cells = []
    for n in names:
      prev = rows[i - 1].get(n) if i else None
      cells += ["-" if row[n] is None else f"{row[n] / 2**20:.2f}",
                "" if prev is None or row[n] is None else f"{row[n] / prev:.2f}"]
    lines.append(f"| {row['seq']} | " + " | ".join(cells) + " |")
  table = "\n".join(lines) + "\n"
  print(table)
  stem = os.path.join(args.out, f"flash_memory_{platform}")
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(table)
  plots.plot_curves(
      [{"sequence length": r["seq"], "temp MiB (fwd+bwd)": r[n] / 2**20, "implementation": n}
       for r in rows for n in names if r[n]],
      x="sequence length", y="temp MiB (fwd+bwd)", by="implementation", logx=True, logy=True,
      title=f"compiled temporaries, {platform}", path=stem + ".png")


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
  return [x for x in text.split(",") if x]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=("speed", "memory"), default=None)
  parser.add_argument("--out", default=RESULTS, help="directory for tables and plots")
  parser.add_argument("--impls", type=_names, default=None,
                      help="comma-separated implementations to time (default: all available)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes and one iteration: checks the script, not the speed")
  parser.add_argument("--seq_lens", type=_ints, default=_ints("1024,4096,16384"))
  parser.add_argument("--head_dims", type=_ints, default=_ints("64,128"))
  parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
  parser.add_argument("--model_dim", type=int, default=2048, help="heads = model_dim // d")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--memory_seq_lens", type=_ints, default=_ints("512,1024,2048,4096,8192"))
  parser.add_argument("--memory_heads", type=int, default=4)
  parser.add_argument("--memory_head_dim", type=int, default=64)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  if args.smoke:
    args.seq_lens, args.head_dims, args.tokens, args.model_dim, args.iters = [48], [16], 48, 32, 1
    args.memory_seq_lens = [64, 128]
  os.makedirs(args.out, exist_ok=True)
  if args.only in (None, "memory"):
    run_memory(args)
  if args.only in (None, "speed"):
    if jax.default_backend() == "cpu" and not args.smoke:
      print("speed: skipped, no GPU or TPU (Pallas kernels only interpret on CPU; --smoke "
            "runs tiny shapes)")
    else:
      run_speed(args)


if __name__ == "__main__":
  main()
