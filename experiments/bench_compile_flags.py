r"""CPU seconds XLA spends lowering and compiling a fixed set of the tests' programs, per set of
XLA flags: the tests are compile-bound, so this ranks the flags that could make the suite
cheaper. Each flag set runs in a fresh process, the sets alternate over the rounds.

    python experiments/bench_compile_flags.py --rounds=2 \
        --flags="--xla_backend_optimization_level=1" \
        --flags="--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"

The programs: forward+gradient of eight ops (causal where they have a causal form, 13 tokens or
an 8×8 grid) and the gradient of a 2-block ViT. A flag set that compiles faster must still pass
the whole suite (numerics change with code generation) before conftest.py adopts it.
"""
import argparse
import os
import subprocess
import sys
import time

OPS = ("softmax", "retention", "performer", "lightning", "sigmoid", "window", "neighborhood",
       "cog")


def measure() -> tuple[float, float]:
  """(lowering, compiling) CPU seconds of the programs in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from big_attn import ops  # pylint: disable=g-import-not-at-top
  from big_attn.models import vit  # pylint: disable=g-import-not-at-top
  totals = [0.0, 0.0]

  def add(fn, *args):
    start = time.process_time()
    lowered = jax.jit(fn).lower(*args)
    middle = time.process_time()
    lowered.compile()
    totals[0] += middle - start
    totals[1] += time.process_time() - middle

  x = jax.random.normal(jax.random.key(0), (2, 64, 4, 8))
  for name in OPS:
    op, spec = ops.get(name), ops.spec(name)
    kwargs, q = ({"grid": (8, 8)}, x) if spec.grid else ({"is_causal": spec.causal}, x[:, :13])
    add(jax.grad(lambda q, op=op, kwargs=kwargs: op(q, q, q, **kwargs).sum()), q)
  model = vit.Model(num_classes=10, width=32, depth=2, mlp_dim=64, num_heads=2,
                    patch_size=(4, 4))
  images = jnp.zeros((4, 8, 8, 1))
  params = model.init(jax.random.key(0), images)
  add(jax.grad(lambda p: model.apply(p, images).sum()), params)
  return totals[0], totals[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--flags", action="append", required=True, help="one XLA_FLAGS set")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(*measure())
    return
  results = {flags: [] for flags in args.flags}
  for _ in range(args.rounds):
    for flags in args.flags:
      env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
      out = subprocess.run([sys.executable, __file__, "--child", f"--flags={flags}"], env=env,
                           check=True, capture_output=True, text=True).stdout.split()
      results[flags].append(tuple(map(float, out[-2:])))
  print("| XLA_FLAGS | lowering s | compiling s (each round) |\n|---|---|---|")
  for flags, rounds in results.items():
    print(f"| `{flags}` | {min(r[0] for r in rounds):.2f} | "
          f"{', '.join(f'{r[1]:.2f}' for r in rounds)} |")


if __name__ == "__main__":
  main()
