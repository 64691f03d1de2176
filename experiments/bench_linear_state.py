"""Recurrent state form of the causal linear ops: decoding cost and LASP memory.

  python experiments/bench_linear_state.py                       # ~3 min on 2 idle cores
  python experiments/bench_linear_state.py --ops=lightning --lengths=256 --rounds=3

Decoding: the time to produce the output of one new token at prefix length n, with the state
(`ops.recurrent.state_form(...).append`, constant work) against recomputing the causal op over
the n + 1 tokens (what a model without a cache does), as the ratio of medians over alternating
rounds in one run; and the bytes a layer keeps: the state against a key/value cache of n tokens.

LASP: per-device temporary memory (`memory_analysis().temp_size_in_bytes`) of the compiled
forward+backward of `parallel.linear_state.linear_state_attention` on 8 simulated CPU devices,
against the single-device causal op over the whole sequence.

Results (markdown, device and versions on top) go to experiments/results/linear_state.md.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import argparse  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_attn import compat, ops  # noqa: E402  pylint: disable=g-import-not-at-top
from big_attn.ops import recurrent  # noqa: E402
from big_attn.parallel import linear_state  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADS, HEAD_DIM = 8, 64


def _op_args(name: str) -> dict:
  return {"performer": dict(feature_key=0, num_features=HEAD_DIM),
          "lightning": dict(decay=0.99),
          "latte": dict(latents=jnp.ones((HEADS, 16, HEAD_DIM)) / HEAD_DIM)}.get(name, {})


def _inputs(length: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, length, HEADS, HEAD_DIM)) for key in keys)


def _seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _decode_rows(names, lengths, rounds):
  rows = []
  for name in names:
    args = _op_args(name)
    for length in lengths:
      q, k, v = _inputs(length + 1)
      form = recurrent.state_form(name, q[:, :1], k[:, :1], v[:, :1], **args)
      state = jax.jit(lambda q, k, v, form=form: form.append(form.initial, q, k, v)[1])(
          q[:, :length], k[:, :length], v[:, :length])
      step = jax.jit(form.append)
      full = jax.jit(lambda q, k, v, name=name, args=args: ops.get(name)(
          q, k, v, is_causal=True, **args)[:, -1:])
      new = (q[:, -1:], k[:, -1:], v[:, -1:])
      want = full(q, k, v)
      got = step(state, *new)[0]
      error = float(jnp.max(jnp.abs(got - want)))
      times = {"state": [], "full": []}
      for _ in range(rounds):  # Alternating rounds: the host's load hits both alike.
        times["state"].append(_seconds(step, state, *new))
        times["full"].append(_seconds(full, q, k, v))
      state_ms, full_ms = (1e3 * float(np.median(times[key])) for key in ("state", "full"))
      state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
      cache_bytes = k[:, :length].nbytes + v[:, :length].nbytes
      rows.append(f"| `{name}` | {length} | {state_ms:.3f} | {full_ms:.3f} | "
                  f"{full_ms / state_ms:.1f}x | {state_bytes / 1024:.0f} | "
                  f"{cache_bytes / 1024:.0f} | {error:.1e} |")
      print(rows[-1], flush=True)
  return rows


def _memory_rows(names, length):
  mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = P(None, "seq")
  q, k, v = _inputs(length)
  rows = []
  for name in names:
    args = _op_args(name)
    lasp = compat.shard_map(
        lambda q, k, v, name=name, args=args: linear_state.linear_state_attention(
            q, k, v, op=name, axis_name="seq", **args),
        mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    single = lambda q, k, v, name=name, args=args: ops.get(name)(  # noqa: E731
        q, k, v, is_causal=True, **args)
    temp = []
    for fn in (lasp, single):
      grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
      temp.append(grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes)
    rows.append(f"| `{name}` | {length} | {temp[0] / 2**20:.1f} | {temp[1] / 2**20:.1f} |")
    print(rows[-1], flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ops", default=",".join(recurrent.STATE_FORMS))
  parser.add_argument("--lengths", default="256,1024,4096")
  parser.add_argument("--memory_length", type=int, default=8192)
  parser.add_argument("--rounds", type=int, default=7)
  flags = parser.parse_args()
  names = flags.ops.split(",")
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  header = (f"Device: {device.platform} / {device.device_kind} (x{jax.device_count()}, "
            f"{os.cpu_count()} host cores, load average {os.getloadavg()[0]:.1f}); jax "
            f"{jax.__version__}, jaxlib {jaxlib.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
            f"Batch 1, {HEADS} heads, head_dim {HEAD_DIM}, float32.")
  decode = _decode_rows(names, [int(n) for n in flags.lengths.split(",")], flags.rounds)
  memory = _memory_rows(names, flags.memory_length)
  text = "\n".join([
      "# Recurrent state form: decoding and LASP", "", header, "",
      "## Decoding one token after a prefix of n tokens",
      "", "Median ms per token over alternating rounds; state and KV-cache sizes in KiB; "
      "error: max |append − full causal op| of the new token.", "",
      "| op | n | state ms | recompute ms | ratio | state KiB | KV cache KiB | error |",
      "|---|---|---|---|---|---|---|---|", *decode, "",
      "## LASP forward+backward temporary memory per device (8 shards) vs one device", "",
      "| op | tokens | LASP MiB / device | single device MiB |", "|---|---|---|---|", *memory,
      "", "The single-device op runs with its default arguments: `retention`'s default "
      "(chunk_size=None) is RetNet's parallel O(n²) form, so its recompute time and memory "
      "are those of that form; the state form and LASP use its chunkwise form.", ""])
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "linear_state.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
