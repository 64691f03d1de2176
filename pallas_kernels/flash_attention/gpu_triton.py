"""Flash attention for GPUs in Pallas, lowered through Triton: fused forward and backward.

FlashAttention-2 (Dao, 2023): for each query block, stream the key/value blocks and keep the
running row maximum m, row sum l and unnormalised output, all in float32,

  m' = max(m, rowmax(S)),  l' = 2^(m-m') l + rowsum(2^(S-m')),  O' = 2^(m-m') O + 2^(S-m') V,

with S = log2(e) · cap·tanh(scale·QKᵀ/cap) (the soft cap is optional) in base 2, so every
exponential is an `exp2`. The forward saves L = m + log2(l) per row; the backward recomputes
P = 2^(S-L) block by block, with Δ = rowsum(dO ∘ O), dS = P ∘ (dO Vᵀ - Δ), dV = Pᵀ dO,
dK = scale · dSᵀ Q, dQ = scale · dS K. dQ and dK/dV are two kernels, so neither needs atomics:
the dQ kernel walks key blocks for a query block, the dK/dV kernel walks the query blocks of all
query heads that share its key/value head (GQA without repeating K/V).

`normalizer="sigmoid"` is FlashSigmoid (Ramapuram et al., 2024, "Theory, Analysis, and Best
Practices for Sigmoid Self-Attention"): P = σ(S + b), b = -log(kv_len) by default, O = P V with
no row statistics at all, and dS = (dO Vᵀ) ∘ P ∘ (1 - P).

`normalizer="signed"` is Cog attention's signed softmax (Lv et al., 2024, "More Expressive
Attention with Negative Weights"): the online softmax runs on |S| and the weights carry the
signs, W = sign(S) ∘ 2^(|S|-L), O = W V; the backward uses dV = Wᵀ dO and
dS = sign(S) ∘ P ∘ (sign(S) ∘ dO Vᵀ - Δ) with P = 2^(|S|-L) and the same
Δ = rowsum(dO ∘ O).

Masks never become arrays in memory. Causal (query i sees keys j <= i, top-left aligned as in
`jax.nn.dot_product_attention`) and local windows (`(left, right)`: keys in [i-left, i+right])
shorten every loop to the band of blocks that can hold a visible pair: the loop bounds are
computed from the block indices, and blocks outside the band are never loaded. Inside the band,
only the edge blocks (and the ragged tail of a sequence that is not a multiple of the block
size) build a position mask; interior blocks run unmasked. Segment ids (packed sequences) are
compared in every visited block. A query row with nothing to attend to returns zeros.

`flash_block_forward_triton` / `flash_block_backward_triton` run the same kernels as one block
of a blockwise schedule (ring / striped attention): float32 `(out, lse)` of the block, and the
block's gradients from the *global* lse and Δ. Their `causal_offset` c (query i sees keys
j <= i + c) is the causal band with its diagonal shifted by c, skipped block by block as above.

Head dims. Any head dim and value dim from 1 to 256: the kernels' tiles are
`padded_head_dim` wide (a power of two >= 16, Triton's tile rule), loaded with the columns past
the array's head dim masked to zero and stored with them masked off, as JAX's own Pallas
attention does; zero columns leave QKᵀ unchanged, and the head dim costs no padded copy.

What only hardware shows, and what reading settled (first run on an H200 with JAX 0.11.2, 2026-12-04:
compiled, correct, `experiments/results/gpu_2026-12-04.md`):
- Precision: float32 operands under DEFAULT precision lower to TF32 tensor-core matmuls; the
  kernels ask for `FLOAT32_PRECISION` (IEEE float32), so float32 training gets float32 results.
- Shared memory: `shared_memory_bytes` estimates each kernel's tiles (resident, `num_stages`
  pipelined copies of the streamed ones, the P/dS matmul operands); `BlockSizes.get_default`
  halves tiles until all fit `SHARED_MEMORY_BYTES` (227 KiB on Hopper) with double buffering,
  and `compiler_params` picks the deepest pipeline (<= 3 stages) that fits. The old forward
  default (head dim 128, 3 stages) needed ~288 KiB for float32 inputs.
- Tile shapes: for 2-byte inputs every tensor-core matmul has >= 64 rows (one warpgroup's
  wgmma M), the backward's former [32, 128] dK/dV tiles included.
On the H200 every default tile compiled (no shared-memory overflow). Speed: the forward is at
0.61-0.78x cuDNN, the backward the gap (forward+backward 0.38-0.91x cuDNN, lowest at d128):
its tiles and pipeline depth are the next thing to tune on hardware.

Why Triton, and what a Mosaic GPU kernel needs. JAX 0.9+ lowers GPU `pallas_call`s through
Mosaic GPU by default, and JAX 0.11 deprecates the Triton lowering; it still works there, and
`compat.triton_compiler_params` keeps selecting it (every version difference lives in
`big_attn.compat`). Triton takes plain block-level array code, runs unchanged in
`interpret=True` on CPU on JAX 0.10 and 0.11, and picks Hopper MMA instructions itself. A
Mosaic GPU successor (`jax.experimental.pallas.mosaic_gpu`, Hopper sm_90a and later) has to
spell out what Triton decides: a `plgpu.kernel` with explicit SMEM buffers and barriers, TMA
copies of swizzled tiles (rows of 64/128 bytes) pipelined by `plgpu.emit_pipeline`, wgmma on
64-row warpgroup tiles with accumulators in registers, warp specialisation (a producer
warpgroup issuing TMA, consumer warpgroups computing), the ragged tail and masks as explicit
predicates, and GQA / segment ids / windows in the index maps; it has no CPU interpreter, so
its tests run on hardware only (JAX's `ops/gpu/attention_mgpu.py` is the model to follow).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from big_attn import compat
from pallas_kernels import common

MAX_HEAD_DIM = 256
NORMALIZERS = ("softmax", "sigmoid", "signed")
_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # Triton's `tl.dot` needs every matmul dimension >= 16.
# Float32 inputs: DEFAULT precision lowers to TF32 tensor-core matmuls (10-bit mantissa, about
# 1e-3 relative error), which float32 training does not expect; HIGHEST lowers to IEEE float32
# (exact to float32 rounding, slower). bf16/fp16 inputs are unaffected.
FLOAT32_PRECISION = lax.Precision.HIGHEST
# Shared memory one thread block may use on Hopper (H100/H200: 227 KiB), and the software
# pipeline depth the kernels start from before `_fit_stages` shortens it.
SHARED_MEMORY_BYTES = 227 * 1024
MAX_STAGES = 3
MIN_STAGES = 2  # The default tiles keep at least double buffering.
KERNELS = ("forward", "dq", "dkv")


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes of the kernels (powers of two, >= 16; clipped to short sequences).

  Attributes:
    block_q: query rows per program of the forward kernel.
    block_k: key rows per loop step of the forward kernel.
    block_q_dkv: query rows per loop step of the dK/dV kernel.
    block_kv_dkv: key rows per program of the dK/dV kernel.
    block_q_dq: query rows per program of the dQ kernel.
    block_kv_dq: key rows per loop step of the dQ kernel.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 64

  def __post_init__(self):
    for field in dataclasses.fields(self):
      size = getattr(self, field.name)
      if (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < _MIN_BLOCK
          or size & (size - 1)):
        raise ValueError(
            f"BlockSizes.{field.name} must be a power of two >= {_MIN_BLOCK}, got {size!r}")

  @classmethod
  def get_default(cls, head_dim: int = 128, itemsize: int = 2) -> BlockSizes:
    """Starting points for Hopper, not tuned on hardware yet, fitted to shared memory.

    For 2-byte inputs every tensor-core matmul has >= 64 rows (the M of one warpgroup's
    wgmma; smaller tiles fall back to Ampere-style mma); head dims above 128 get half-size
    tiles so that the float32 accumulators fit the registers. Then all tiles are halved
    until every kernel fits `SHARED_MEMORY_BYTES` with a pipeline of `MIN_STAGES` (float32
    inputs, `itemsize=4`, need it: their IEEE matmuls do not use wgmma anyway).
    """
    if padded_head_dim(head_dim) > 128:
      blocks = cls(block_q=64, block_k=32, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                   block_kv_dq=32)
    else:
      blocks = cls()
    while not all(shared_memory_bytes(kernel, blocks, head_dim, head_dim, itemsize, MIN_STAGES)
                  <= SHARED_MEMORY_BYTES for kernel in KERNELS):
      if min(dataclasses.astuple(blocks)) == _MIN_BLOCK:
        break  # Cannot happen for head dims <= 256; `_fit_stages` names the sizes if it does.
      blocks = cls(*(max(_MIN_BLOCK, size // 2) for size in dataclasses.astuple(blocks)))
    return blocks


def shared_memory_bytes(kernel: str, blocks: BlockSizes, head_dim: int, value_dim: int,
                        itemsize: int, num_stages: int) -> int:
  """Estimated shared memory of one program of `kernel` ("forward", "dq" or "dkv").

  Triton keeps `num_stages` copies of the tiles a loop streams (software pipelining), one
  copy of the tiles a program loads once, and stages through shared memory each register
  tile that becomes a matmul operand (P in the forward; P and dS in the backward). Padded
  head dims count (`padded_head_dim`); the per-row float32 statistics are negligible.
  """
  d, dv = padded_head_dim(head_dim), padded_head_dim(value_dim)
  if kernel == "forward":  # Q resident; K, V streamed; P [block_q, block_k].
    rows, streamed_rows = blocks.block_q, blocks.block_k
    resident, streamed, operands = rows * d, streamed_rows * (d + dv), 1
  elif kernel == "dq":  # Q, dO resident; K, V streamed; dS [block_q, block_kv].
    rows, streamed_rows = blocks.block_q_dq, blocks.block_kv_dq
    resident, streamed, operands = rows * (d + dv), streamed_rows * (d + dv), 1
  elif kernel == "dkv":  # K, V resident; Q, dO streamed; P and dS [block_q, block_kv].
    rows, streamed_rows = blocks.block_kv_dkv, blocks.block_q_dkv
    resident, streamed, operands = rows * (d + dv), streamed_rows * (d + dv), 2
  else:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  tiles = resident + num_stages * streamed + operands * rows * streamed_rows
  return tiles * itemsize


def _fit_stages(kernel: str, blocks: BlockSizes, head_dim: int, value_dim: int,
                itemsize: int) -> int:
  """The deepest pipeline (<= MAX_STAGES) whose tiles fit `SHARED_MEMORY_BYTES`; a
  `ValueError` naming the sizes if not even one stage fits."""
  for stages in range(MAX_STAGES, 0, -1):
    if shared_memory_bytes(kernel, blocks, head_dim, value_dim, itemsize,
                           stages) <= SHARED_MEMORY_BYTES:
      return stages
  need = shared_memory_bytes(kernel, blocks, head_dim, value_dim, itemsize, 1)
  raise ValueError(
      f"the {kernel} kernel's tiles need ~{need // 1024} KiB of shared memory with {blocks} "
      f"at head_dim {head_dim}, value_dim {value_dim}, {itemsize}-byte inputs (limit "
      f"{SHARED_MEMORY_BYTES // 1024} KiB): pass smaller block_sizes")


def compiler_params(kernel: str, blocks: BlockSizes, head_dim: int, value_dim: int,
                    itemsize: int):
  """Triton `CompilerParams` of `kernel`: 4 warps up to head_dim 64, else 8, and the
  pipeline depth that fits shared memory."""
  return compat.triton_compiler_params(
      num_warps=4 if padded_head_dim(head_dim) <= 64 else 8,
      num_stages=_fit_stages(kernel, blocks, head_dim, value_dim, itemsize))


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one attention problem, shared by all kernels."""
  q_len: int
  kv_len: int
  scale: float
  left: int | None    # largest visible i - j (None: unbounded)
  right: int | None   # largest visible j - i (None: unbounded; 0 when causal)
  soft_cap: float | None
  sigmoid_bias: float | None  # None: softmax
  signed: bool  # Cog's signed softmax: weights sign(S)·softmax(|S|)
  kv_padded: bool
  head_dim: int   # the arrays' sizes; tiles are `padded_head_dim` wide
  value_dim: int

  @property
  def sigmoid(self) -> bool:
    return self.sigmoid_bias is not None


def _dot(a, b, *, trans_a=False, trans_b=False):
  """`a @ b` (with either operand transposed) accumulated in float32; float32 operands are
  multiplied in full float32 (`FLOAT32_PRECISION`), not TF32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = FLOAT32_PRECISION if jnp.float32 in (a.dtype, b.dtype) else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _load(ref, idx, size: int):
  """`ref[idx]` (`idx` None: the whole ref) of a tile whose last dim is padded past the array's
  `size` columns: those read as zeros (a masked load, as in JAX's Pallas attention). Python
  ints in `idx` become int32 scalars (the interpreter's masked load takes no literal index)."""
  if idx is not None:
    idx = tuple(jnp.int32(i) if isinstance(i, int) else i for i in idx)
  target = ref if idx is None else ref.at[idx]
  if ref.shape[-1] == size:
    return target[...]
  columns = (jnp.arange(ref.shape[-1]) < size)[None, :]
  return compat.pallas_triton().load(target, mask=columns, other=0)


def _store(ref, value, size: int):
  """`ref[...] = value` for the first `size` columns only (the rest is head-dim padding)."""
  if ref.shape[-1] == size:
    ref[...] = value.astype(ref.dtype)
    return
  columns = (jnp.arange(ref.shape[-1]) < size)[None, :]
  compat.pallas_triton().store(ref, value.astype(ref.dtype), mask=columns)


def _logits(q, k, cfg: _Config):
  """Base-2 logits log2(e)·cap·tanh(scale·qkᵀ/cap) of a tile, and the tanh (None: no cap)."""
  qk = _dot(q, k, trans_b=True)
  if cfg.soft_cap is None:
    return qk * (cfg.scale * _LOG2E), None
  t = jnp.tanh(qk * (cfg.scale / cfg.soft_cap))
  return t * (cfg.soft_cap * _LOG2E), t


def _sigmoid2(s2, cfg: _Config):
  """σ(s + b) from base-2 logits s2 = s·log2(e)."""
  return 1.0 / (1.0 + jnp.exp2(-(s2 + cfg.sigmoid_bias * _LOG2E)))


def _tile_mask(q_pos, k_pos, q_seg, kv_seg, cfg: _Config, positions: bool):
  """Boolean `[len(q_pos), len(k_pos)]` visibility of a tile, or None when all is visible.

  `positions=False` leaves out the causal/window/ragged-tail terms: the caller knows the tile
  lies inside the band, where they are all true.
  """
  mask = None

  def conj(m):
    return m if mask is None else jnp.logical_and(mask, m)

  if positions and cfg.left is not None:
    mask = conj(q_pos[:, None] - k_pos[None, :] <= cfg.left)
  if positions and cfg.right is not None:
    mask = conj(k_pos[None, :] - q_pos[:, None] <= cfg.right)
  if positions and cfg.kv_padded:
    mask = conj(jnp.broadcast_to(k_pos[None, :] < cfg.kv_len, (q_pos.shape[0], k_pos.shape[0])))
  if q_seg is not None:
    mask = conj(q_seg[:, None] == kv_seg[None, :])
  return mask


def _cdiv(x, y: int):
  return lax.div(x + (y - 1), y)  # x >= 0


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _kv_band(q_first, block_q, block_k, cfg: _Config):
  """Key blocks for query rows `q_first .. q_first+block_q-1`, as `(lo, full_lo, full_hi, hi)`.

  `[lo, hi)` holds every block with a visible pair (the rest is never loaded); inside it
  `[full_lo, full_hi)` are the blocks where every pair is visible by position (no causal,
  window or ragged-tail mask needed).
  """
  q_last = jnp.minimum(q_first + block_q - 1, cfg.q_len - 1)
  lo_key = 0 if cfg.left is None else jnp.maximum(q_first - cfg.left, 0)
  hi_key = cfg.kv_len - 1
  if cfg.right is not None:
    hi_key = jnp.minimum(q_last + cfg.right, hi_key)
  lo, hi = lax.div(lo_key, block_k), lax.div(hi_key, block_k) + 1
  full_lo, full_hi = lo, hi
  if cfg.left is not None:  # (q_first + block_q - 1) - k_first <= left.
    full_lo = _cdiv(jnp.maximum(q_first + block_q - 1 - cfg.left, 0), block_k)
  if cfg.right is not None:  # (k_first + block_k - 1) - q_first <= right.
    full_hi = lax.div(q_first + cfg.right + 1, block_k)
  if cfg.kv_padded:
    full_hi = jnp.minimum(full_hi, cfg.kv_len // block_k)
  full_lo = _clip(full_lo, lo, hi)
  return lo, full_lo, _clip(full_hi, full_lo, hi), hi


def _q_band(k_first, block_k, block_q, cfg: _Config):
  """Query blocks that see keys `k_first .. k_first+block_k-1`, as in `_kv_band`."""
  k_last = jnp.minimum(k_first + block_k - 1, cfg.kv_len - 1)
  lo_q = 0 if cfg.right is None else jnp.maximum(k_first - cfg.right, 0)
  hi_q = cfg.q_len - 1
  if cfg.left is not None:
    hi_q = jnp.minimum(k_last + cfg.left, hi_q)
  lo = lax.div(lo_q, block_q)
  hi = jnp.where(k_first < cfg.kv_len, lax.div(hi_q, block_q) + 1, lo)  # Padding sees nothing.
  full_lo, full_hi = lo, hi
  if cfg.right is not None:  # (k_first + block_k - 1) - q_first <= right.
    full_lo = _cdiv(jnp.maximum(k_first + block_k - 1 - cfg.right, 0), block_q)
  if cfg.left is not None:  # (q_first + block_q - 1) - k_first <= left.
    full_hi = lax.div(k_first + cfg.left + 1, block_q)
  if cfg.kv_padded:
    full_hi = jnp.where(k_first + block_k <= cfg.kv_len, full_hi, full_lo)
  full_lo = _clip(full_lo, lo, hi)
  return lo, full_lo, _clip(full_hi, full_lo, hi), hi


def _band_loop(band, body, carry, cfg: _Config, heads: int = 1):
  """`carry = body(block, carry, positions)` over the band: the edge blocks with position
  masks, the blocks in between without.

  With `heads > 1`, `body(block, carry, positions, head)` runs for every head of
  `range(heads)` and block, in one flat loop per part of the band (loops nested in a kernel
  lose the varying-axes type of their refs in the Pallas interpreter under `shard_map`).
  """
  lo, full_lo, full_hi, hi = band

  def part(start, stop, positions, carry):
    if heads == 1:
      return lax.fori_loop(start, stop, lambda i, c: body(i, c, positions), carry)
    num = stop - start
    safe = jnp.maximum(num, 1)
    return lax.fori_loop(
        0, heads * num, lambda i, c: body(start + lax.rem(i, safe), c, positions,
                                          lax.div(i, safe)), carry)

  if cfg.left is None and cfg.right is None and not cfg.kv_padded:
    return part(lo, hi, False, carry)
  carry = part(lo, full_lo, True, carry)
  carry = part(full_lo, full_hi, False, carry)
  return part(full_hi, hi, True, carry)


# ---------------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, *lse_ref,
                cfg: _Config, block_q: int, block_k: int):
  q_first = pl.program_id(0) * block_q
  q_pos = q_first + jnp.arange(block_q)
  q = _load(q_ref, None, cfg.head_dim)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def tile(kb, positions):
    k_first = kb * block_k
    rows = (pl.ds(k_first, block_k), slice(None))
    s2, _ = _logits(q, _load(k_ref, rows, cfg.head_dim), cfg)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[rows[0]]
    mask = _tile_mask(q_pos, k_first + jnp.arange(block_k), q_seg, kv_seg, cfg, positions)
    return s2, _load(v_ref, rows, cfg.value_dim), mask

  def sigmoid_body(kb, acc, positions):
    s2, v, mask = tile(kb, positions)
    p = _sigmoid2(s2, cfg)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    return acc + _dot(p.astype(v.dtype), v)

  def softmax_body(kb, carry, positions):
    acc, m, l = carry
    s2, v, mask = tile(kb, positions)
    sign = jnp.sign(s2) if cfg.signed else None
    if cfg.signed:
      s2 = jnp.abs(s2)
    if mask is not None:
      s2 = jnp.where(mask, s2, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s2, axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s2 - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    l_new = alpha * l + jnp.sum(p, axis=-1)
    w = p if sign is None else sign * p
    acc_new = alpha[:, None] * acc + _dot(w.astype(v.dtype), v)
    return acc_new, m_new, l_new

  band = _kv_band(q_first, block_q, block_k, cfg)
  acc = jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32)
  if cfg.sigmoid:
    _store(o_ref, _band_loop(band, sigmoid_body, acc, cfg), cfg.value_dim)
    return
  m = jnp.full((block_q,), _MASK_VALUE, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = _band_loop(band, softmax_body, (acc, m, l), cfg)
  empty = l == 0.0  # Rows with nothing to attend to: lse = +inf makes P = 2^(S-L) zero.
  _store(o_ref, acc / jnp.where(empty, 1.0, l)[:, None], cfg.value_dim)
  lse_ref[0][...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, q_seg, kv_seg, *, cfg: _Config, blocks: BlockSizes, interpret: bool,
             out_dtype=None):
  """Padded `[b, t, n, d]` inputs -> (output in `out_dtype` (default: the query's), base-2
  log-sum-exp `[b, n, t]` (+inf for a row with no key) or None)."""
  batch, q_pad, num_heads, _ = q.shape
  kv_pad, num_kv_heads = k.shape[1], k.shape[2]
  head_dim, value_dim = padded_head_dim(cfg.head_dim), padded_head_dim(cfg.value_dim)
  groups = num_heads // num_kv_heads
  block_q, block_k = blocks.block_q, blocks.block_k
  in_specs = [
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
      pl.BlockSpec((None, kv_pad, None, value_dim), lambda i, b, h: (b, 0, h // groups, 0)),
      None if q_seg is None else pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      None if kv_seg is None else pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
  ]
  out_shape = [compat.pallas_out_struct((batch, q_pad, num_heads, cfg.value_dim),
                                        out_dtype or q.dtype, q, k, v)]
  out_specs = [pl.BlockSpec((None, block_q, None, value_dim), lambda i, b, h: (b, i, h, 0))]
  if not cfg.sigmoid:
    out_shape.append(compat.pallas_out_struct((batch, num_heads, q_pad), jnp.float32, q, k, v))
    out_specs.append(pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, block_q=block_q, block_k=block_k),
      grid=(q_pad // block_q, batch, num_heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params("forward", blocks, head_dim, value_dim, q.dtype.itemsize),
      interpret=interpret,
      name="flash_attention_triton_fwd",
  )(q, k, v, q_seg, kv_seg)
  return outs[0], (None if cfg.sigmoid else outs[1])


# ---------------------------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------------------------
def _grad_logits(q, k, v, do, lse, delta, mask, cfg: _Config):
  """(W, dS) of a tile: the weights W of the values (P, or sign(S)·P for the signed
  normalizer) and dS, the gradient w.r.t. scale·qkᵀ (before the soft cap)."""
  s2, t = _logits(q, k, cfg)
  if cfg.sigmoid:
    p = _sigmoid2(s2, cfg)
  else:
    p = jnp.exp2((jnp.abs(s2) if cfg.signed else s2) - lse[:, None])
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = _dot(do, v, trans_b=True)
  if cfg.sigmoid:
    ds = dp * p * (1.0 - p)
  elif cfg.signed:
    sign = jnp.sign(s2)
    ds = sign * p * (sign * dp - delta[:, None])
    p = sign * p
  else:
    ds = p * (dp - delta[:, None])
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref,
               *, cfg: _Config, block_q: int, block_k: int):
  q_first = pl.program_id(0) * block_q
  q_pos = q_first + jnp.arange(block_q)
  q, do = _load(q_ref, None, cfg.head_dim), _load(do_ref, None, cfg.value_dim)
  lse = None if lse_ref is None else lse_ref[...]
  delta = None if delta_ref is None else delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(kb, dq, positions):
    k_first = kb * block_k
    rows = (pl.ds(k_first, block_k), slice(None))
    k = _load(k_ref, rows, cfg.head_dim)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[rows[0]]
    mask = _tile_mask(q_pos, k_first + jnp.arange(block_k), q_seg, kv_seg, cfg, positions)
    _, ds = _grad_logits(q, k, _load(v_ref, rows, cfg.value_dim), do, lse, delta, mask, cfg)
    return dq + _dot(ds.astype(k.dtype), k)

  band = _kv_band(q_first, block_q, block_k, cfg)
  dq = _band_loop(band, body, jnp.zeros(dq_ref.shape, jnp.float32), cfg)
  _store(dq_ref, dq * cfg.scale, cfg.head_dim)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_ref, dv_ref, *, cfg: _Config, block_q: int, block_k: int, groups: int):
  k_first = pl.program_id(0) * block_k
  k_pos = k_first + jnp.arange(block_k)
  k, v = _load(k_ref, None, cfg.head_dim), _load(v_ref, None, cfg.value_dim)
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  band = _q_band(k_first, block_k, block_q, cfg)

  def body(qb, carry, positions, g=0):  # Sums over the query heads g sharing this kv head.
    dk, dv = carry
    q_first = qb * block_q
    q_slice = pl.ds(q_first, block_q)
    rows = (q_slice, g, slice(None))
    q, do = _load(q_ref, rows, cfg.head_dim), _load(do_ref, rows, cfg.value_dim)
    lse = None if lse_ref is None else lse_ref[g, q_slice]
    delta = None if delta_ref is None else delta_ref[g, q_slice]
    q_seg = None if q_seg_ref is None else q_seg_ref[q_slice]
    mask = _tile_mask(q_first + jnp.arange(block_q), k_pos, q_seg, kv_seg, cfg, positions)
    p, ds = _grad_logits(q, k, v, do, lse, delta, mask, cfg)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  dk = jnp.zeros(dk_ref.shape, jnp.float32)
  dv = jnp.zeros(dv_ref.shape, jnp.float32)
  dk, dv = _band_loop(band, body, (dk, dv), cfg, heads=groups)
  _store(dk_ref, dk * cfg.scale, cfg.head_dim)
  _store(dv_ref, dv, cfg.value_dim)


def _backward(q, k, v, q_seg, kv_seg, lse, delta, do, *, cfg: _Config, blocks: BlockSizes,
              interpret: bool, grad_dtype=None):
  """(dq, dk, dv) of padded inputs from the base-2 `lse` and `delta = rowsum(dO ∘ O)`, both
  `[b, n, t]` (None for the sigmoid normalizer); gradients in `grad_dtype` (default: the
  inputs' dtypes)."""
  batch, q_pad, num_heads, _ = q.shape
  kv_pad, num_kv_heads = k.shape[1], k.shape[2]
  head_dim, value_dim = padded_head_dim(cfg.head_dim), padded_head_dim(cfg.value_dim)
  groups = num_heads // num_kv_heads

  bq, bk = blocks.block_q_dq, blocks.block_kv_dq
  row = None if cfg.sigmoid else pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk),
      grid=(q_pad // bq, batch, num_heads),
      in_specs=[
          pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
          pl.BlockSpec((None, kv_pad, None, value_dim), lambda i, b, h: (b, 0, h // groups, 0)),
          pl.BlockSpec((None, bq, None, value_dim), lambda i, b, h: (b, i, h, 0)),
          row, row,
          None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
          None if kv_seg is None else pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      out_shape=compat.pallas_out_struct(q.shape, grad_dtype or q.dtype, q, k, v, do),
      compiler_params=compiler_params("dq", blocks, head_dim, value_dim, q.dtype.itemsize),
      interpret=interpret,
      name="flash_attention_triton_dq",
  )(q, k, v, do, lse, delta, q_seg, kv_seg)

  bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
  rows = None if cfg.sigmoid else pl.BlockSpec((None, groups, q_pad), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, block_q=bq, block_k=bk, groups=groups),
      grid=(kv_pad // bk, batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((None, q_pad, groups, head_dim), lambda j, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, value_dim), lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, q_pad, groups, value_dim), lambda j, b, h: (b, 0, h, 0)),
          rows, rows,
          None if q_seg is None else pl.BlockSpec((None, q_pad), lambda j, b, h: (b, 0)),
          None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, value_dim), lambda j, b, h: (b, j, h, 0))],
      out_shape=[compat.pallas_out_struct(k.shape, grad_dtype or k.dtype, q, k, v, do),
                 compat.pallas_out_struct(v.shape, grad_dtype or v.dtype, q, k, v, do)],
      compiler_params=compiler_params("dkv", blocks, head_dim, value_dim, q.dtype.itemsize),
      interpret=interpret,
      name="flash_attention_triton_dkv",
  )(q, k, v, do, lse, delta, q_seg, kv_seg)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom_vjp over padded arrays, and the public wrapper.
# ---------------------------------------------------------------------------------------------
def row_delta(out, do):
  """Δ = rowsum(dO ∘ O) `[b, n, t]` in float32: an elementwise product and a sum (no
  matmul, so no TF32 on GPU), fused by XLA into one pass."""
  return jnp.swapaxes(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_seg, kv_seg, cfg, blocks, interpret):
  """(output, base-2 lse or None): the lse is handed out as a residual, not differentiated."""
  return _forward(q, k, v, q_seg, kv_seg, cfg=cfg, blocks=blocks, interpret=interpret)


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg, blocks, interpret):
  out, lse = _forward(q, k, v, q_seg, kv_seg, cfg=cfg, blocks=blocks, interpret=interpret)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, blocks, interpret, res, cotangents):
  do, _ = cotangents
  q, k, v, q_seg, kv_seg, out, lse = res
  delta = None if cfg.sigmoid else row_delta(out, do)
  dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, lse, delta, do, cfg=cfg, blocks=blocks,
                         interpret=interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _fit(block: int, length: int) -> int:
  """A block no longer than needed for `length` rows (a power of two >= 16)."""
  return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def padded_head_dim(size: int) -> int:
  """The width of the kernels' head-dim tiles: a power of two >= 16 (Triton's tile rule); the
  columns past the array's head dim load as zeros (leaving QKᵀ unchanged) and are not stored."""
  return max(_MIN_BLOCK, pl.next_power_of_2(size))


def _natural_lse(lse2):
  """Base-2 log-sum-exp (+inf: no visible key) -> natural log (-inf: no visible key)."""
  return jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * math.log(2.0))


def _pad_inputs(query, key, value, q_pad: int, kv_pad: int):
  """Sequences padded with zeros to whole blocks (head dims are padded inside the kernels)."""
  return _pad_to(query, q_pad, 1), _pad_to(key, kv_pad, 1), _pad_to(value, kv_pad, 1)


def _pad_to(x: Any, length: int, axis: int):
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _setup(q_len, kv_len, head_dim, value_dim, *, scale, left, right, logits_soft_cap,
           sigmoid_bias, block_sizes, signed=False):
  """Tiles fitted to the lengths, the padded lengths and the kernels' `_Config`."""
  blocks = BlockSizes(
      block_q=_fit(block_sizes.block_q, q_len), block_k=_fit(block_sizes.block_k, kv_len),
      block_q_dkv=_fit(block_sizes.block_q_dkv, q_len),
      block_kv_dkv=_fit(block_sizes.block_kv_dkv, kv_len),
      block_q_dq=_fit(block_sizes.block_q_dq, q_len),
      block_kv_dq=_fit(block_sizes.block_kv_dq, kv_len))
  # Powers of two: the largest block is a multiple of the others.
  q_pad = pl.cdiv(q_len, m := max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)) * m
  kv_pad = pl.cdiv(kv_len, m := max(blocks.block_k, blocks.block_kv_dkv, blocks.block_kv_dq)) * m
  cfg = _Config(q_len=q_len, kv_len=kv_len, scale=scale, left=left, right=right,
                soft_cap=logits_soft_cap, sigmoid_bias=sigmoid_bias, signed=signed,
                kv_padded=kv_pad != kv_len,
                head_dim=head_dim, value_dim=value_dim)
  return blocks, q_pad, kv_pad, cfg


def _pad_segments(segments, q_pad: int, kv_pad: int):
  q_seg, kv_seg = (None, None) if segments is None else segments
  q_seg = None if q_seg is None else _pad_to(q_seg.astype(jnp.int32), q_pad, 1)
  kv_seg = None if kv_seg is None else _pad_to(kv_seg.astype(jnp.int32), kv_pad, 1)
  return q_seg, kv_seg


@functools.partial(jax.jit, static_argnames=(
    "is_causal", "scale", "window", "logits_soft_cap", "sigmoid_bias", "signed", "block_sizes",
    "interpret", "return_residuals"))
def _flash_attention(query, key, value, segments, *, is_causal, scale, window, logits_soft_cap,
                     sigmoid_bias, signed, block_sizes, interpret, return_residuals):
  q_len, kv_len = query.shape[1], key.shape[1]
  left, right = window if window is not None else (None, None)
  if is_causal:
    right = 0 if right is None else min(right, 0)
  blocks, q_pad, kv_pad, cfg = _setup(
      q_len, kv_len, query.shape[3], value.shape[3], scale=scale, left=left, right=right, logits_soft_cap=logits_soft_cap,
      sigmoid_bias=sigmoid_bias, block_sizes=block_sizes, signed=signed)
  q_seg, kv_seg = _pad_segments(segments, q_pad, kv_pad)
  out, lse2 = _flash(*_pad_inputs(query, key, value, q_pad, kv_pad), q_seg, kv_seg, cfg, blocks,
                     interpret)
  out = out[:, :q_len]
  if not return_residuals:
    return out
  lse = jnp.swapaxes(_natural_lse(lse2[..., :q_len]), 1, 2)
  return out, lax.stop_gradient(lse)


def check_args(query, key, value, *, segment_ids, scale, local_window_size, logits_soft_cap,
               normalizer, sigmoid_bias, block_sizes, max_head_dim=MAX_HEAD_DIM,
               return_residuals=False):
  """Validates the arguments of a flash-attention call; returns them normalised.

  Returns `(dims, segments, scale, window, logits_soft_cap, sigmoid_bias, block_sizes)` with
  `segments` a `(q_ids, kv_ids)` pair or None, `window` a `(left, right)` pair or None and
  `sigmoid_bias` a float for the sigmoid normalizer (None for softmax). `max_head_dim` bounds
  the head dims (None: any).
  """
  dims = common.check_qkv(query, key, value, same_head_dim=True)
  for name, size in (("head_dim", dims.head_dim), ("value head_dim", dims.value_dim)):
    if max_head_dim is not None and not 1 <= size <= max_head_dim:
      raise ValueError(f"flash attention supports {name} from 1 to {max_head_dim}, got {size}")
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  if return_residuals and normalizer != "softmax":
    raise ValueError("return_residuals=True needs normalizer='softmax' (the log-sum-exp is "
                     f"that of the softmax), got normalizer={normalizer!r}")
  if logits_soft_cap is not None:
    logits_soft_cap = float(logits_soft_cap)
    if not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  if normalizer == "sigmoid":
    sigmoid_bias = -math.log(dims.kv_len) if sigmoid_bias is None else float(sigmoid_bias)
  elif sigmoid_bias is not None:
    raise ValueError("sigmoid_bias is only meaningful with normalizer='sigmoid'")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(max(dims.head_dim, dims.value_dim),
                                         query.dtype.itemsize)
  elif not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  segments = common.normalize_segment_ids(segment_ids, dims)
  window = common.normalize_window(local_window_size)
  return (dims, segments, common.default_scale(dims.head_dim, scale), window, logits_soft_cap,
          sigmoid_bias, block_sizes)


def flash_attention_triton(query, key, value, *, segment_ids=None, is_causal=False, scale=None,
                           local_window_size=None, logits_soft_cap=None, normalizer="softmax",
                           sigmoid_bias=None, block_sizes=None, interpret=False,
                           return_residuals=False):
  """Flash attention on GPU (Pallas, Triton lowering); the arguments of `flash_attention`.

  `[batch, seq, heads, head_dim]` in and out; differentiable (fused backward). `sigmoid_bias`
  is the constant b of `normalizer="sigmoid"` (a Python number; -log(kv_len) when None).
  `interpret=True` runs the kernels in the Pallas interpreter (any backend, CPU included).
  `return_residuals=True` also returns the float32 natural-log log-sum-exp `[batch, q_len,
  num_heads]` (-inf for a row with nothing to attend to; not differentiated). An empty query
  gives an empty output, an empty key sequence zeros (nothing to attend to), without a kernel.
  """
  dims, segments, scale, window, cap, sigmoid_bias, block_sizes = check_args(
      query, key, value, segment_ids=segment_ids, scale=scale,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      normalizer=normalizer, sigmoid_bias=sigmoid_bias, block_sizes=block_sizes,
      return_residuals=return_residuals)
  if not dims.q_len or not dims.kv_len:
    out = jnp.zeros((dims.batch, dims.q_len, dims.num_heads, dims.value_dim), query.dtype)
    lse = jnp.full((dims.batch, dims.q_len, dims.num_heads), -jnp.inf, jnp.float32)
    return (out, lse) if return_residuals else out
  return _flash_attention(
      query, key, value, segments, is_causal=bool(is_causal), scale=scale, window=window,
      logits_soft_cap=cap, sigmoid_bias=sigmoid_bias, signed=normalizer == "signed",
      block_sizes=block_sizes, interpret=bool(interpret), return_residuals=bool(return_residuals))


# ---------------------------------------------------------------------------------------------
# Block level: one (query block, key/value block) pair of a blockwise schedule (ring attention).
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("causal_offset", "scale", "block_sizes",
                                             "interpret"))
def _block_forward(query, key, value, segments, *, causal_offset, scale, block_sizes, interpret):
  q_len, kv_len = query.shape[1], key.shape[1]
  blocks, q_pad, kv_pad, cfg = _setup(
      q_len, kv_len, query.shape[3], value.shape[3], scale=scale, left=None, right=causal_offset, logits_soft_cap=None,
      sigmoid_bias=None, block_sizes=block_sizes)
  q_seg, kv_seg = _pad_segments(segments, q_pad, kv_pad)
  out, lse2 = _forward(*_pad_inputs(query, key, value, q_pad, kv_pad), q_seg, kv_seg, cfg=cfg,
                       blocks=blocks, interpret=interpret, out_dtype=jnp.float32)
  return out[:, :q_len], _natural_lse(lse2[..., :q_len])


@functools.partial(jax.jit, static_argnames=("causal_offset", "scale", "block_sizes",
                                             "interpret"))
def _block_backward(query, key, value, lse, delta, dout, segments, *, causal_offset, scale,
                    block_sizes, interpret):
  q_len, kv_len = query.shape[1], key.shape[1]
  blocks, q_pad, kv_pad, cfg = _setup(
      q_len, kv_len, query.shape[3], value.shape[3], scale=scale, left=None, right=causal_offset, logits_soft_cap=None,
      sigmoid_bias=None, block_sizes=block_sizes)
  q_seg, kv_seg = _pad_segments(segments, q_pad, kv_pad)
  # Natural-log lse (-inf: no key) -> the kernels' base 2 (+inf: no key, so P = 0).
  lse2 = jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32) * _LOG2E, jnp.inf)
  lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, q_pad - q_len)), constant_values=jnp.inf)
  delta = _pad_to(delta.astype(jnp.float32), q_pad, 2)
  dq, dk, dv = _backward(*_pad_inputs(query, key, value, q_pad, kv_pad), q_seg, kv_seg, lse2,
                         delta, _pad_to(dout, q_pad, 1), cfg=cfg, blocks=blocks,
                         interpret=interpret, grad_dtype=jnp.float32)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


def check_causal_offset(causal_offset) -> int | None:
  """None, or the causal offset as a Python int (a `ValueError`/`TypeError` otherwise)."""
  if causal_offset is None:
    return None
  if isinstance(causal_offset, bool) or not isinstance(causal_offset, (int, np.integer)):
    raise TypeError(
        f"causal_offset must be None or a Python int (static: the kernels skip blocks by it), "
        f"got {causal_offset!r}")
  return int(causal_offset)


def _check_block_args(query, key, value, segment_ids, scale, block_sizes):
  dims, segments, scale, _, _, _, block_sizes = check_args(
      query, key, value, segment_ids=segment_ids, scale=scale, local_window_size=None,
      logits_soft_cap=None, normalizer="softmax", sigmoid_bias=None, block_sizes=block_sizes)
  if not dims.q_len or not dims.kv_len:
    raise ValueError(f"a block needs non-empty query and key/value sequences, got "
                     f"q_len={dims.q_len}, kv_len={dims.kv_len}")
  return segments, scale, block_sizes


def flash_block_forward_triton(query, key, value, *, causal_offset=None, segment_ids=None,
                               scale=None, block_sizes=None, interpret=False):
  """Block forward on GPU: float32 `out [b, t, n, dv]` normalised within the block and its
  natural-log `lse [b, n, t]` (-inf for a row with no visible key); no custom_vjp.

  `causal_offset=c` admits key j for query i iff j <= i + c (None: no causal rule); the band
  of key blocks each query block visits is shifted by c, as a causal mask with its diagonal
  moved.
  """
  segments, scale, block_sizes = _check_block_args(query, key, value, segment_ids, scale,
                                                   block_sizes)
  return _block_forward(query, key, value, segments,
                        causal_offset=check_causal_offset(causal_offset), scale=scale,
                        block_sizes=block_sizes, interpret=bool(interpret))


def flash_block_backward_triton(query, key, value, lse, delta, dout, *, causal_offset=None,
                                segment_ids=None, scale=None, block_sizes=None,
                                interpret=False):
  """Block gradients on GPU from the *global* natural-log `lse` and `delta = rowsum(dO ∘ O)`
  (both `[b, n, t]`): float32 `(dq, dk, dv)` in the shapes of the inputs."""
  segments, scale, block_sizes = _check_block_args(query, key, value, segment_ids, scale,
                                                   block_sizes)
  return _block_backward(query, key, value, lse, delta, dout, segments,
                         causal_offset=check_causal_offset(causal_offset), scale=scale,
                         block_sizes=block_sizes, interpret=bool(interpret))
