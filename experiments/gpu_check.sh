#!/usr/bin/env bash
# One command for a machine with one GPU: GPU-only tests, every kernel against the reference
# (forward and gradients, all features, GQA, segments, float32 and bf16), and the speed table
# on the headline shapes (bf16, d64/d128, causal and not, 1k-16k; vs cuDNN, XLA, JAX's bundled
# Pallas `mha`, tokamax if it imports). Every step has its own `timeout`, so a hang costs that
# step only; the two test steps run side by side (6 pytest workers each: the time is Triton and
# XLA compiles on the CPU; on an H200 each test took 7-85 s), so the whole run stays within
# 8 minutes (step limits 20 + 200 + 230 s = 7.5 min).
#
#   bash experiments/gpu_check.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT if set, else experiments/results/gpu_<UTC date>/. It receives
# env.log (device, versions), one log per step, the speed table and plot
# (flash_speed_<device>.md/.png) and summary.txt (each step's exit status; 124 = timed out).
# Record a run by committing OUT_DIR; flip a case in big_attn/ops/softmax.py:KERNEL_RUNS only
# where its table shows our kernel correct and at least as fast as cuDNN.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${OUT:-$ROOT/experiments/results/gpu_$(date -u +%Y-%m-%d)}}"
mkdir -p "$DEST"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cuda  # fail fast instead of falling back to CPU
# tests/conftest.py's CPU code-generation flags are for the CPU suite, not for GPU compiles.
export XLA_FLAGS="${XLA_FLAGS:-}"
# The GPU machines' image has JAX in `python3` (no `python`); PYTHON overrides.
PY="${PYTHON:-python3}"
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"

# step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, logs to $DEST/NAME.log.
step() {
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start))s" | tee -a "$SUMMARY"
  tail -n 5 "$DEST/$name.log"
}

step env 20 "$PY" -c "
import jax, jaxlib
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)
for d in jax.devices(): print(d.platform, d.device_kind)
try:
  import tokamax; print('tokamax', getattr(tokamax, '__version__', '?'))
except ImportError as e: print('tokamax: not importable:', e)
"

# GPU-only tests: the compiled kernels (default block sizes, bf16, ragged lengths, GQA,
# segments, windows, soft cap, sigmoid) against the reference, forward and gradients.
TESTS=(env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -n 6 --durations=20)
step gpu_tests 200 "${TESTS[@]}" -m gpu_only tests/test_flash_attention.py &

# Every kernel (forward, dQ, dK/dV; whole-sequence and block API) on the GPU in float32 and
# bf16 against the float64 references (ragged lengths, GQA/MQA, causal, windows, segments, soft
# cap, sigmoid, empty rows, residuals, block skipping, shifted causal blocks): the CPU suite's
# comparisons, which compile the kernels when the backend is a GPU.
CASES="float64_reference or bfloat16 or fully_masked or residuals or outside_the_band"
CASES="$CASES or block_api_causal or blocks_merge"
step kernel_vs_reference 200 "${TESTS[@]}" tests/test_flash_attention.py -k "$CASES" &
wait

# Speed: headline shapes; each timing preceded by a correctness check on the first rows.
# d128 first: the headline; a row is written as soon as it is measured.
step bench_flash 230 "$PY" experiments/bench_flash.py --only=speed --out="$DEST" \
  --head_dims=128,64 --seq_lens=1024,4096,16384 --tokens=16384 --iters=5 \
  --impls=ours,ours_sigmoid,cudnn,xla,jax_pallas_triton,jax_pallas_mgpu,tokamax

echo "results in $DEST"
cat "$SUMMARY"
! grep -qv "exit 0" "$SUMMARY"
