"""Flash attention for TPU: Pallas kernels lowered through Mosaic TPU.

FlashAttention (Dao et al., 2022) with the FlashAttention-2 work split (Dao, 2023): the
`[q_len, kv_len]` logits are never materialised. With S = cap·tanh(scale·Q Kᵀ / cap) (the cap is
optional), each query block walks its key blocks with the online softmax

  m' = max(m, rowmax S_j),  l' = e^(m - m') l + rowsum e^(S_j - m'),
  acc' = e^(m - m') acc + e^(S_j - m') V_j,   O = acc / l,   lse = m + log l,

and saves the log-sum-exp for the backward pass, which recomputes P = e^(S - lse) block by block:

  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - rowsum(dO ∘ O)),  dQ = scale·dS' K,  dK = scale·dS'ᵀ Q,

where dS' = dS ∘ (1 - tanh²) under the soft cap. `normalizer="sigmoid"` is sigmoid attention
(FlashSigmoid; Ramapuram et al., 2024, "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention"): O = σ(S + b) V with b = -log(kv_len) by default, so the kernel keeps no row
statistics at all and dS = dP ∘ σ(1 - σ).

Three kernels, in the shape of `jax.experimental.pallas.ops.tpu.flash_attention`: the forward
and dQ kernels run on a grid (batch, heads, q_blocks, kv_steps) with float32 VMEM accumulators; the
dK/dV kernel on (batch, kv_heads, kv_blocks, group, q_steps), so that the gradients of grouped
query heads are summed into their shared K/V head without K/V ever being repeated. The dK/dV
kernel computes in the transposed orientation (kv rows, q lanes), which needs no transposes in
VMEM.

Causal and local-window masks define a band of allowed (query, key) positions; the reduction axis
of every grid visits only the blocks that meet the band (the grid is as long as the widest band,
not the whole sequence), steps past the band are skipped with `pl.when` and their index maps clamp
to a block already in VMEM, so they cost neither compute nor DMA. Blocks entirely inside the band
skip the element-wise mask. Sequences are padded to whole blocks outside the kernels and the
ragged tail of the keys is masked inside them. Query rows with nothing to attend to give zeros.

`flash_block_forward_tpu` / `flash_block_backward_tpu` run the same kernels as one block of a
blockwise schedule (ring / striped attention): float32 `(out, lse)` of the block, and its
gradients from the *global* lse and rowsum(dO ∘ O). Their `causal_offset` c (query i sees keys
j <= i + c) is the causal band with its diagonal shifted by c, visited and skipped as above.

Inputs stay `[batch, seq, heads, head_dim]` in HBM when head_dim is a multiple of 128 (the kernels
read a head's tile straight out of the `[batch, seq, heads·head_dim]` view); smaller head dims
are transposed to `[batch, heads, seq, head_dim]` first, as TPU tiles need the full minor dim.
`interpret=True` runs the kernels in the Pallas TPU interpreter (`pltpu.InterpretParams`), which
simulates VMEM scratch and the pipeline on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from big_attn import compat
from pallas_kernels import common

NUM_LANES = 128
NUM_SUBLANES = 8
MAX_HEAD_DIM = 256
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NORMALIZERS = ("softmax", "sigmoid")
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ bᵀ


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels; they change speed, not results.

  Rows of the logits tile are sublanes (multiples of 8), columns are lanes (multiples of 128):
  the forward and dQ kernels put queries on rows and keys on lanes, the dK/dV kernel the other
  way round. `block_k_compute` splits the forward's key block into sub-blocks computed one after
  the other (a large DMA tile, a small vreg working set); it must divide `block_k`.
  """
  block_q: int = 512
  block_k: int = 512
  block_k_compute: int | None = None
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    rules = (("block_q", NUM_SUBLANES), ("block_k", NUM_LANES),
             ("block_q_dkv", NUM_LANES), ("block_k_dkv", NUM_SUBLANES),
             ("block_q_dq", NUM_SUBLANES), ("block_k_dq", NUM_LANES))
    if self.block_k_compute is not None:
      rules += (("block_k_compute", NUM_LANES),)
    for name, multiple in rules:
      size = getattr(self, name)
      if (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0
          or size % multiple):
        raise ValueError(
            f"BlockSizes.{name} must be a positive multiple of {multiple} (TPU tiling), "
            f"got {size!r}")
    if self.block_k_compute is not None and self.block_k % self.block_k_compute:
      raise ValueError(
          f"BlockSizes.block_k_compute={self.block_k_compute} must divide "
          f"block_k={self.block_k}")

  @property
  def k_compute(self) -> int:
    return self.block_k if self.block_k_compute is None else self.block_k_compute

  @classmethod
  def get_default(cls, q_len: int | None = None, kv_len: int | None = None) -> BlockSizes:
    """512-row tiles, shrunk to the sequence (rounded up to 128) for short sequences."""
    def fit(length):
      return 512 if length is None else min(512, _round_up(length, NUM_LANES))
    bq, bk = fit(q_len), fit(kv_len)
    return cls(block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk, block_q_dq=bq,
               block_k_dq=bk)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call: sizes, mask band, normalizer, tiles."""
  batch: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_dim: int
  q_len: int
  kv_len: int
  q_padded_len: int  # lengths padded to whole blocks of every kernel
  kv_padded_len: int
  scale: float
  left: int | None  # query i may see keys j >= i - left (None: no limit)
  right: int | None  # query i may see keys j <= i + right (None: no limit)
  soft_cap: float | None
  normalizer: str
  sigmoid_bias: float | None
  block_sizes: BlockSizes

  @property
  def banded(self) -> bool:
    return self.left is not None or self.right is not None

  @property
  def kv_padded(self) -> bool:
    return self.kv_padded_len != self.kv_len

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv_heads


# Layout in HBM. A `[b, t, h, d]` array whose head_dim is lane-aligned is viewed as
# `[b, t, h·d]` (a free reshape) and a head's `(block, d)` tile is the block at column h;
# other head dims are transposed to `[b, h, t, d]`. Either way a kernel sees `(block, d)` tiles.


def _to_kernel_layout(x, length):
  b, t, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, 0)))
  return x.reshape(b, length, h * d) if d % NUM_LANES == 0 else jnp.swapaxes(x, 1, 2)


def _from_kernel_layout(x, num_heads):
  """Kernel layout -> `[b, padded_len, h, d]`."""
  if x.ndim == 3:
    b, length, hd = x.shape
    return x.reshape(b, length, num_heads, hd // num_heads)
  return jnp.swapaxes(x, 1, 2)


def _kernel_shape(batch, heads, length, dim, dtype, *like):
  shape = (batch, length, heads * dim) if dim % NUM_LANES == 0 else (batch, heads, length, dim)
  return compat.pallas_out_struct(shape, dtype, *like)


def _tile(block, dim, index_map):
  """BlockSpec of the `(block, dim)` tile `index_map(*grid) = (batch, head, seq_block)`."""
  if dim % NUM_LANES == 0:
    def fused(*grid):
      bi, h, i = index_map(*grid)
      return bi, i, h
    return pl.BlockSpec((None, block, dim), fused)

  def heads_major(*grid):
    bi, h, i = index_map(*grid)
    return bi, h, i, 0
  return pl.BlockSpec((None, None, block, dim), heads_major)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _lanes(x, width):
  """A lane-replicated `[rows, 128]` statistic laid out as `[rows, width]`."""
  repeats = -(-width // NUM_LANES)
  x = x if repeats == 1 else jnp.tile(x, (1, repeats))
  return x if width == x.shape[1] else x[:, :width]


# Block bookkeeping. A block of `size` positions starting at `idx * size` on one axis meets the
# band in the blocks [lo, hi] of the other axis; `behind`/`ahead` bound how far (in positions)
# the other axis may lag or lead. Works on NumPy arrays (static grid sizes) and on traced ints.


def _span(idx, size, other_size, other_len, behind, ahead):
  # Every quantity divided is non-negative (`behind`, `ahead` >= 0, or a causal offset `ahead`
  # above -size), so truncating division (`lax.div`, no sign ops in the kernel) equals floor
  # division. (With a lower offset a block that sees nothing may still be visited, masked.)
  static = isinstance(idx, np.ndarray)
  xp = np if static else jnp
  div = (lambda a, b: a // b) if static else lax.div
  start = idx * size
  lo = 0 * idx if behind is None else div(xp.maximum(start - behind, 0), other_size)
  last = other_len - 1
  hi = last + 0 * idx if ahead is None else xp.minimum(start + size - 1 + ahead, last)
  return lo, div(hi, other_size)


def _num_steps(num_blocks, size, other_size, other_len, behind, ahead) -> int:
  """The most blocks of the other axis that any block of this axis must visit."""
  lo, hi = _span(np.arange(num_blocks), size, other_size, other_len, behind, ahead)
  return max(1, int(np.max(np.asarray(hi) - np.asarray(lo) + 1)))


def _cost(spec, num_blocks, size, other_size, other_len, behind, ahead, *, matmul_dims, args,
          out_shape):
  """`pl.CostEstimate` of a kernel from the tiles it computes (per head and batch row)."""
  lo, hi = _span(np.arange(num_blocks), size, other_size, other_len, behind, ahead)
  tiles = int(np.sum(np.maximum(np.asarray(hi) - np.asarray(lo) + 1, 0)))
  pairs = spec.batch * spec.num_heads * tiles * size * other_size
  arrays = [*args, *jax.tree.leaves(out_shape)]
  return pl.CostEstimate(
      flops=2 * pairs * matmul_dims, transcendentals=pairs * (2 if spec.soft_cap else 1),
      bytes_accessed=sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in arrays))


def _visit(idx, step, size, other_size, other_len, behind, ahead):
  """(block of the other axis to load at `step`, whether to compute it).

  Past the end of the span the block index stays at the last block of the span, so the pipeline
  issues no new DMA for steps that compute nothing.
  """
  lo, hi = _span(idx, size, other_size, other_len, behind, ahead)
  last_block = (other_len - 1) // other_size
  return jnp.minimum(lo + step, jnp.clip(hi, lo, last_block)), lo + step <= hi


def _kv_visit(spec, i, step, block_q, block_k):
  return _visit(i, step, block_q, block_k, spec.kv_len, spec.left, spec.right)


def _q_visit(spec, j, step, block_k, block_q):
  return _visit(j, step, block_k, block_q, spec.q_len, spec.right, spec.left)


def _can_mask(spec: _Spec, has_segments: bool) -> bool:
  return has_segments or spec.banded or spec.kv_padded


def _needs_mask(spec, has_segments, q_start, q_size, k_start, k_size):
  """Whether a tile needs the element-wise mask (it is not entirely inside the band)."""
  if has_segments:
    return True
  needs = False
  if spec.kv_padded:
    needs = jnp.logical_or(needs, k_start + k_size > spec.kv_len)
  if spec.right is not None:
    needs = jnp.logical_or(needs, k_start + k_size - 1 - q_start > spec.right)
  if spec.left is not None:
    needs = jnp.logical_or(needs, q_start + q_size - 1 - k_start > spec.left)
  return needs


def _mask(spec, q_pos, k_pos, q_ids, kv_ids):
  """Element-wise: may the query at `q_pos` attend the key at `k_pos`? (any orientation)."""
  conds = []
  if spec.kv_padded:
    conds.append(k_pos < spec.kv_len)
  if spec.right is not None:
    conds.append(k_pos - q_pos <= spec.right)
  if spec.left is not None:
    conds.append(q_pos - k_pos <= spec.left)
  if q_ids is not None:
    conds.append(q_ids == kv_ids)
  return functools.reduce(jnp.logical_and, conds)


def _logits(a, b, spec):
  """`scale·a bᵀ` in float32, soft-capped; also tanh of the cap (None without a cap)."""
  s = lax.dot_general(a, b, NT_DIMS, preferred_element_type=jnp.float32) * spec.scale
  if spec.soft_cap is None:
    return s, None
  t = jnp.tanh(s / spec.soft_cap)
  return spec.soft_cap * t, t


def _weights_and_dlogits(spec, s, t, mask, lse, dp, di):
  """Recomputed attention weights P and dL/d(scale·a bᵀ) for one tile of the backward pass."""
  if spec.normalizer == "sigmoid":
    p = jax.nn.sigmoid(s + spec.sigmoid_bias)
  else:
    p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  ds = dp * p * (1.0 - p) if spec.normalizer == "sigmoid" else p * (dp - di)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _masked_or_not(spec, has_segments, run, needs_mask, body):
  """Runs `body(masked)` under `pl.when`, with the element-wise mask only where needed."""
  if not _can_mask(spec, has_segments):
    pl.when(run)(lambda: body(False))
    return
  pl.when(jnp.logical_and(run, needs_mask))(lambda: body(True))
  pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: body(False))


def _dim_semantics(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, spec: _Spec, has_segments: bool, num_steps: int):
  if has_segments:
    q_ids_ref, kv_ids_ref, *refs = refs
  else:
    q_ids_ref = kv_ids_ref = None
  softmax = spec.normalizer == "softmax"
  if softmax:
    o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
  else:
    o_ref, acc_ref = refs
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  block_c = spec.block_sizes.k_compute
  i, step = pl.program_id(2), pl.program_id(3)
  kv_block, run = _kv_visit(spec, i, step, block_q, block_k)

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if softmax:
      m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
      l_ref[...] = jnp.zeros_like(l_ref)

  def body(masked):
    q = q_ref[...]

    def sub_block(c, carry):
      start = pl.multiple_of(c * block_c, block_c)
      k = k_ref[pl.ds(start, block_c), :]
      v = v_ref[pl.ds(start, block_c), :]
      s, _ = _logits(q, k, spec)
      mask = None
      if masked:
        shape = (block_q, block_c)
        q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = kv_block * block_k + start + lax.broadcasted_iota(jnp.int32, shape, 1)
        q_ids = kv_ids = None
        if has_segments:
          q_ids = jnp.tile(q_ids_ref[...], (1, block_c // NUM_LANES))
          kv_ids = kv_ids_ref[:1, pl.ds(start, block_c)]
        mask = _mask(spec, q_pos, k_pos, q_ids, kv_ids)
      if not softmax:
        p = jax.nn.sigmoid(s + spec.sigmoid_bias)
        if mask is not None:
          p = jnp.where(mask, p, 0.0)
        acc_ref[...] += jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return carry
      if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
      m_prev, l_prev = m_ref[...], l_ref[...]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp(s - _lanes(m_next, block_c))
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      alpha = jnp.exp(m_prev - m_next)
      m_ref[...] = m_next
      l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      acc_ref[...] = _lanes(alpha, acc_ref.shape[1]) * acc_ref[...] + pv
      return carry

    lax.fori_loop(0, block_k // block_c, sub_block, None, unroll=True)

  needs_mask = _needs_mask(spec, has_segments, i * block_q, block_q, kv_block * block_k,
                           block_k)
  _masked_or_not(spec, has_segments, run, needs_mask, body)

  @pl.when(step == num_steps - 1)
  def _finish():
    if not softmax:
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)
      return
    l = l_ref[...]
    empty = l == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_ref[...] * _lanes(inv, acc_ref.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _segment_inputs(q_seg, kv_seg):
  """Segment ids laid out for the kernels: queries `[b, tq, 128]`, keys `[b, 8, tk]`."""
  b, tq = q_seg.shape
  tk = kv_seg.shape[1]
  return (lax.broadcast_in_dim(q_seg, (b, tq, NUM_LANES), (0, 1)),
          lax.broadcast_in_dim(kv_seg, (b, NUM_SUBLANES, tk), (0, 2)))


def _forward(q, k, v, q_seg, kv_seg, spec: _Spec, interpret, out_dtype=None):
  """Padded inputs in kernel layout -> output in `out_dtype` (default: the query's) and, for
  softmax, the `[b, n, tq]` lse (+inf for a row with no key, so that P = e^(S - lse) = 0)."""
  b, n, d, dv, tq = spec.batch, spec.num_heads, spec.head_dim, spec.value_dim, spec.q_padded_len
  bq, bk = spec.block_sizes.block_q, spec.block_sizes.block_k
  num_q = tq // bq
  steps = _num_steps(num_q, bq, bk, spec.kv_len, spec.left, spec.right)
  has_segments = q_seg is not None

  def q_map(bi, h, i, step):
    del step
    return bi, h, i

  def kv_map(bi, h, i, step):
    return bi, lax.div(h, spec.groups), _kv_visit(spec, i, step, bq, bk)[0]

  def lse_map(bi, h, i, step):
    del step
    return bi, h, i, 0

  in_specs = [_tile(bq, d, q_map), _tile(bk, d, kv_map), _tile(bk, dv, kv_map)]
  args = [q, k, v]
  if has_segments:
    in_specs += [
        pl.BlockSpec((None, bq, NUM_LANES), lambda bi, h, i, step: (bi, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, bk),
                     lambda bi, h, i, step: (bi, 0, _kv_visit(spec, i, step, bq, bk)[0]))]
    args += _segment_inputs(q_seg, kv_seg)
  out_shape = [_kernel_shape(b, n, tq, dv, out_dtype or q.dtype, q, k, v)]
  out_specs = [_tile(bq, dv, q_map)]
  scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
  if spec.normalizer == "softmax":
    out_shape.append(compat.pallas_out_struct((b, n, tq, NUM_LANES), jnp.float32, q, k, v))
    out_specs.append(pl.BlockSpec((None, None, bq, NUM_LANES), lse_map))
    scratch += [pltpu.VMEM((bq, NUM_LANES), jnp.float32)] * 2
  kernel = functools.partial(_fwd_kernel, spec=spec, has_segments=has_segments,
                             num_steps=steps)
  cost = _cost(spec, num_q, bq, bk, spec.kv_len, spec.left, spec.right, matmul_dims=d + dv,
               args=args, out_shape=out_shape)
  outs = pl.pallas_call(
      kernel, grid=(b, n, num_q, steps), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=scratch,
      compiler_params=_dim_semantics("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=cost, interpret=interpret, name="flash_attention_fwd")(*args)
  if spec.normalizer == "softmax":
    return outs[0], outs[1][..., 0]
  return outs[0], None


# Backward: dK and dV (kv rows on sublanes, queries on lanes).


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, *refs, spec: _Spec, has_segments: bool,
                num_steps: int):
  if has_segments:
    q_ids_ref, kv_ids_ref, *refs = refs
  if spec.normalizer == "softmax":
    lse_ref, di_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
  else:
    dk_ref, dv_ref, dk_acc, dv_acc = refs
  block_k, block_q = k_ref.shape[0], q_ref.shape[0]
  j, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_block, run = _q_visit(spec, j, step, block_k, block_q)

  @pl.when(jnp.logical_and(g == 0, step == 0))
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  def body(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, t = _logits(k, q, spec)  # [block_k, block_q]
    mask = None
    if masked:
      shape = (block_k, block_q)
      k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 0)
      q_pos = q_block * block_q + lax.broadcasted_iota(jnp.int32, shape, 1)
      q_ids = kv_ids = None
      if has_segments:
        q_ids = q_ids_ref[:1, :]
        kv_ids = jnp.tile(kv_ids_ref[...], (1, block_q // NUM_LANES))
      mask = _mask(spec, q_pos, k_pos, q_ids, kv_ids)
    dp = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
    if spec.normalizer == "softmax":
      lse, di = lse_ref[:1, :], di_ref[:1, :]
    else:
      lse = di = None
    p, ds = _weights_and_dlogits(spec, s, t, mask, lse, dp, di)
    dv_acc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_acc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

  needs_mask = _needs_mask(spec, has_segments, q_block * block_q, block_q, j * block_k,
                           block_k)
  _masked_or_not(spec, has_segments, run, needs_mask, body)

  @pl.when(jnp.logical_and(g == spec.groups - 1, step == num_steps - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, do, q_seg, kv_seg, lse, di, spec: _Spec, interpret, grad_dtype=None):
  b, n, d, dv = spec.batch, spec.num_heads, spec.head_dim, spec.value_dim
  num_kv_heads, groups = spec.num_kv_heads, spec.groups
  tq, tk = spec.q_padded_len, spec.kv_padded_len
  bq, bk = spec.block_sizes.block_q_dkv, spec.block_sizes.block_k_dkv
  num_k = tk // bk
  steps = _num_steps(num_k, bk, bq, spec.q_len, spec.right, spec.left)
  has_segments = q_seg is not None

  def kv_map(bi, h, j, g, step):
    del g, step
    return bi, h, j

  def q_block(j, step):
    return _q_visit(spec, j, step, bk, bq)[0]

  def q_map(bi, h, j, g, step):
    return bi, h * groups + g, q_block(j, step)

  def row_map(bi, h, j, g, step):
    return bi, h * groups + g, 0, q_block(j, step)

  in_specs = [_tile(bq, d, q_map), _tile(bk, d, kv_map), _tile(bk, dv, kv_map),
              _tile(bq, dv, q_map)]
  args = [q, k, v, do]
  if has_segments:
    q_ids = lax.broadcast_in_dim(q_seg, (b, NUM_SUBLANES, tq), (0, 2))
    kv_ids = lax.broadcast_in_dim(kv_seg, (b, tk, NUM_LANES), (0, 1))
    in_specs += [
        pl.BlockSpec((None, NUM_SUBLANES, bq),
                     lambda bi, h, j, g, step: (bi, 0, q_block(j, step))),
        pl.BlockSpec((None, bk, NUM_LANES), lambda bi, h, j, g, step: (bi, j, 0))]
    args += [q_ids, kv_ids]
  if spec.normalizer == "softmax":
    rows = lambda x: lax.broadcast_in_dim(x, (b, n, NUM_SUBLANES, tq), (0, 1, 3))
    in_specs += [pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_map)] * 2
    args += [rows(lse), rows(di)]
  kernel = functools.partial(_dkv_kernel, spec=spec, has_segments=has_segments,
                             num_steps=steps)
  out_shape = [compat.pallas_out_struct(k.shape, grad_dtype or k.dtype, q, k, v, do),
               compat.pallas_out_struct(v.shape, grad_dtype or v.dtype, q, k, v, do)]
  cost = _cost(spec, num_k, bk, bq, spec.q_len, spec.right, spec.left,
               matmul_dims=2 * (d + dv), args=args, out_shape=out_shape)
  return pl.pallas_call(
      kernel, grid=(b, num_kv_heads, num_k, groups, steps), in_specs=in_specs,
      out_specs=[_tile(bk, d, kv_map), _tile(bk, dv, kv_map)], out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
      compiler_params=_dim_semantics("parallel", "parallel", "parallel", "arbitrary",
                                     "arbitrary"),
      cost_estimate=cost, interpret=interpret, name="flash_attention_bwd_dkv")(*args)


# Backward: dQ (queries on sublanes, keys on lanes, as the forward).


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, *refs, spec: _Spec, has_segments: bool,
               num_steps: int):
  if has_segments:
    q_ids_ref, kv_ids_ref, *refs = refs
  if spec.normalizer == "softmax":
    lse_ref, di_ref, dq_ref, dq_acc = refs
  else:
    dq_ref, dq_acc = refs
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  i, step = pl.program_id(2), pl.program_id(3)
  kv_block, run = _kv_visit(spec, i, step, block_q, block_k)

  @pl.when(step == 0)
  def _init():
    dq_acc[...] = jnp.zeros_like(dq_acc)

  def body(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, t = _logits(q, k, spec)  # [block_q, block_k]
    mask = None
    if masked:
      shape = (block_q, block_k)
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
      k_pos = kv_block * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
      q_ids = kv_ids = None
      if has_segments:
        q_ids = jnp.tile(q_ids_ref[...], (1, block_k // NUM_LANES))
        kv_ids = kv_ids_ref[:1, :]
      mask = _mask(spec, q_pos, k_pos, q_ids, kv_ids)
    dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
    if spec.normalizer == "softmax":
      lse, di = _lanes(lse_ref[...], block_k), _lanes(di_ref[...], block_k)
    else:
      lse = di = None
    _, ds = _weights_and_dlogits(spec, s, t, mask, lse, dp, di)
    dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  needs_mask = _needs_mask(spec, has_segments, i * block_q, block_q, kv_block * block_k,
                           block_k)
  _masked_or_not(spec, has_segments, run, needs_mask, body)

  @pl.when(step == num_steps - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * spec.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, do, q_seg, kv_seg, lse, di, spec: _Spec, interpret, grad_dtype=None):
  b, n, d, dv, tq = spec.batch, spec.num_heads, spec.head_dim, spec.value_dim, spec.q_padded_len
  bq, bk = spec.block_sizes.block_q_dq, spec.block_sizes.block_k_dq
  num_q = tq // bq
  steps = _num_steps(num_q, bq, bk, spec.kv_len, spec.left, spec.right)
  has_segments = q_seg is not None

  def q_map(bi, h, i, step):
    del step
    return bi, h, i

  def kv_map(bi, h, i, step):
    return bi, lax.div(h, spec.groups), _kv_visit(spec, i, step, bq, bk)[0]

  def col_map(bi, h, i, step):
    del step
    return bi, h, i, 0

  in_specs = [_tile(bq, d, q_map), _tile(bk, d, kv_map), _tile(bk, dv, kv_map),
              _tile(bq, dv, q_map)]
  args = [q, k, v, do]
  if has_segments:
    in_specs += [
        pl.BlockSpec((None, bq, NUM_LANES), lambda bi, h, i, step: (bi, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, bk),
                     lambda bi, h, i, step: (bi, 0, _kv_visit(spec, i, step, bq, bk)[0]))]
    args += _segment_inputs(q_seg, kv_seg)
  if spec.normalizer == "softmax":
    cols = lambda x: lax.broadcast_in_dim(x, (b, n, tq, NUM_LANES), (0, 1, 2))
    in_specs += [pl.BlockSpec((None, None, bq, NUM_LANES), col_map)] * 2
    args += [cols(lse), cols(di)]
  kernel = functools.partial(_dq_kernel, spec=spec, has_segments=has_segments,
                             num_steps=steps)
  out_shape = compat.pallas_out_struct(q.shape, grad_dtype or q.dtype, q, k, v, do)
  cost = _cost(spec, num_q, bq, bk, spec.kv_len, spec.left, spec.right,
               matmul_dims=2 * d + dv, args=args, out_shape=out_shape)
  return pl.pallas_call(
      kernel, grid=(b, n, num_q, steps), in_specs=in_specs, out_specs=_tile(bq, d, q_map),
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_dim_semantics("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=cost, interpret=interpret, name="flash_attention_bwd_dq")(*args)


# custom_vjp over padded arrays in kernel layout.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_seg, kv_seg, spec, interpret):
  return _forward(q, k, v, q_seg, kv_seg, spec, interpret)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, spec, interpret):
  out, lse = _forward(q, k, v, q_seg, kv_seg, spec, interpret)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(spec, interpret, residuals, d_out):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  di = None
  if spec.normalizer == "softmax":
    products = out.astype(jnp.float32) * d_out.astype(jnp.float32)
    di = jnp.swapaxes(jnp.sum(_from_kernel_layout(products, spec.num_heads), axis=-1), 1, 2)
  dk, dv = _backward_dkv(q, k, v, d_out, q_seg, kv_seg, lse, di, spec, interpret)
  dq = _backward_dq(q, k, v, d_out, q_seg, kv_seg, lse, di, spec, interpret)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_segments(q_seg, kv_seg, spec: _Spec):
  """Segment ids padded to whole blocks: padding gets ids of its own (the key tail is masked
  by position anyway)."""
  if q_seg is None:
    return None, None
  q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, spec.q_padded_len - spec.q_len)),
                  constant_values=-1)
  kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, spec.kv_padded_len - spec.kv_len)),
                   constant_values=-2)
  return q_seg, kv_seg


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _flash(query, key, value, q_seg, kv_seg, *, spec: _Spec, interpret):
  tq, tk = spec.q_padded_len, spec.kv_padded_len
  q = _to_kernel_layout(query, tq)
  k, v = _to_kernel_layout(key, tk), _to_kernel_layout(value, tk)
  q_seg, kv_seg = _pad_segments(q_seg, kv_seg, spec)
  out = _attention(q, k, v, q_seg, kv_seg, spec, interpret)
  return _from_kernel_layout(out, spec.num_heads)[:, :spec.q_len]


def _check_head_dim(name: str, size: int) -> None:
  if size % NUM_SUBLANES or size > MAX_HEAD_DIM:
    raise ValueError(
        f"{name} must be a multiple of {NUM_SUBLANES} no larger than {MAX_HEAD_DIM} "
        f"(64, 128 and 256 are the fast ones), got {size}")


def _check_inputs(query, key, value) -> common.Dims:
  dims = common.check_qkv(query, key, value)
  if not dims.q_len or not dims.kv_len:
    raise ValueError(
        f"query and key sequences must be non-empty, got q_len={dims.q_len}, "
        f"kv_len={dims.kv_len}")
  _check_head_dim("head_dim", dims.head_dim)
  _check_head_dim("value head_dim", dims.value_dim)
  return dims


def _make_spec(dims: common.Dims, *, scale, left, right, soft_cap, normalizer, sigmoid_bias,
               block_sizes) -> _Spec:
  """The static `_Spec` of a call (block sizes checked, lengths padded to whole blocks)."""
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(dims.q_len, dims.kv_len)
  elif not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a tpu.BlockSizes, got {type(block_sizes).__name__}")
  sizes = block_sizes
  return _Spec(
      batch=dims.batch, num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
      head_dim=dims.head_dim, value_dim=dims.value_dim, q_len=dims.q_len, kv_len=dims.kv_len,
      q_padded_len=_round_up(
          dims.q_len, math.lcm(sizes.block_q, sizes.block_q_dkv, sizes.block_q_dq)),
      kv_padded_len=_round_up(
          dims.kv_len, math.lcm(sizes.block_k, sizes.block_k_dkv, sizes.block_k_dq)),
      scale=common.default_scale(dims.head_dim, scale), left=left, right=right,
      soft_cap=soft_cap, normalizer=normalizer, sigmoid_bias=sigmoid_bias,
      block_sizes=block_sizes)


def flash_attention_tpu(query, key, value, *, segment_ids=None, is_causal=False, scale=None,
                        local_window_size=None, logits_soft_cap=None, normalizer="softmax",
                        sigmoid_bias=None, block_sizes: BlockSizes | None = None,
                        interpret=False):
  """Flash attention on TPU (Mosaic), `[batch, seq, heads, head_dim]` in and out.

  Softmax: O = softmax(cap·tanh(scale·QKᵀ/cap), masked) V; sigmoid: O = σ(S + b) V, masked
  weights zero. Same semantics as `big_attn.ops.dot_product_attention`; differentiable.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`, float32 or bfloat16.
    key: `[batch, kv_len, num_kv_heads, head_dim]`, `num_heads % num_kv_heads == 0` (GQA).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    segment_ids: `[batch, seq]` ints or a pair `(q_segment_ids, kv_segment_ids)`.
    is_causal: query i attends keys j <= i (top-left aligned).
    scale: logit scale, `1/sqrt(head_dim)` when None.
    local_window_size: int or `(left, right)`: query i attends keys in `[i-left, i+right]`.
    logits_soft_cap: if set, logits become `cap * tanh(logits / cap)`.
    normalizer: "softmax" or "sigmoid".
    sigmoid_bias: the b of the sigmoid normalizer, `-log(kv_len)` when None.
    block_sizes: `BlockSizes`; `BlockSizes.get_default(q_len, kv_len)` when None.
    interpret: run the kernels in the Pallas TPU interpreter (on CPU); True or an
      `pltpu.InterpretParams`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = _check_inputs(query, key, value)
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  if sigmoid_bias is not None and normalizer != "sigmoid":
    raise ValueError("sigmoid_bias is only meaningful with normalizer='sigmoid'")
  if logits_soft_cap is not None and logits_soft_cap <= 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  window = common.normalize_window(local_window_size)
  segments = common.normalize_segment_ids(segment_ids, dims)
  left, right = window if window is not None else (None, None)
  if is_causal:
    right = 0 if right is None else min(right, 0)
  if normalizer == "sigmoid" and sigmoid_bias is None:
    sigmoid_bias = -math.log(dims.kv_len)
  spec = _make_spec(dims, scale=scale, left=left, right=right,
                    soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                    normalizer=normalizer,
                    sigmoid_bias=None if sigmoid_bias is None else float(sigmoid_bias),
                    block_sizes=block_sizes)
  q_seg, kv_seg = segments if segments is not None else (None, None)
  return _flash(query, key, value, q_seg, kv_seg, spec=spec,
                interpret=compat.tpu_interpret_mode(interpret))


# Block level: one (query block, key/value block) pair of a blockwise schedule (ring attention).


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _block_forward(query, key, value, q_seg, kv_seg, *, spec: _Spec, interpret):
  q = _to_kernel_layout(query, spec.q_padded_len)
  k = _to_kernel_layout(key, spec.kv_padded_len)
  v = _to_kernel_layout(value, spec.kv_padded_len)
  q_seg, kv_seg = _pad_segments(q_seg, kv_seg, spec)
  out, lse = _forward(q, k, v, q_seg, kv_seg, spec, interpret, out_dtype=jnp.float32)
  out = _from_kernel_layout(out, spec.num_heads)[:, :spec.q_len]
  return out, jnp.where(lse == jnp.inf, -jnp.inf, lse)[..., :spec.q_len]


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _block_backward(query, key, value, lse, delta, dout, q_seg, kv_seg, *, spec: _Spec,
                    interpret):
  tq, tk = spec.q_padded_len, spec.kv_padded_len
  q, do = _to_kernel_layout(query, tq), _to_kernel_layout(dout, tq)
  k, v = _to_kernel_layout(key, tk), _to_kernel_layout(value, tk)
  q_seg, kv_seg = _pad_segments(q_seg, kv_seg, spec)
  pad = ((0, 0), (0, 0), (0, tq - spec.q_len))
  # -inf (no key anywhere) -> +inf, the kernels' convention: P = e^(S - lse) = 0.
  lse = jnp.pad(jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32), jnp.inf), pad,
                constant_values=jnp.inf)
  delta = jnp.pad(delta.astype(jnp.float32), pad)
  dk, dv = _backward_dkv(q, k, v, do, q_seg, kv_seg, lse, delta, spec, interpret,
                         grad_dtype=jnp.float32)
  dq = _backward_dq(q, k, v, do, q_seg, kv_seg, lse, delta, spec, interpret,
                    grad_dtype=jnp.float32)
  return (_from_kernel_layout(dq, spec.num_heads)[:, :spec.q_len],
          _from_kernel_layout(dk, spec.num_kv_heads)[:, :spec.kv_len],
          _from_kernel_layout(dv, spec.num_kv_heads)[:, :spec.kv_len])


def _block_spec(query, key, value, causal_offset, segment_ids, scale, block_sizes):
  dims = _check_inputs(query, key, value)
  spec = _make_spec(dims, scale=scale, left=None, right=causal_offset, soft_cap=None,
                    normalizer="softmax", sigmoid_bias=None, block_sizes=block_sizes)
  segments = common.normalize_segment_ids(segment_ids, dims)
  return spec, *(segments if segments is not None else (None, None))


def flash_block_forward_tpu(query, key, value, *, causal_offset=None, segment_ids=None,
                            scale=None, block_sizes=None, interpret=False):
  """Block forward on TPU: float32 `out [b, t, n, dv]` normalised within the block and its
  `lse [b, n, t]` (-inf for a row with no visible key); no custom_vjp.

  `causal_offset=c` (a Python int, or None) admits key j for query i iff j <= i + c: the
  causal band with its diagonal shifted by c, so the grid skips the blocks it leaves out.
  """
  spec, q_seg, kv_seg = _block_spec(query, key, value, causal_offset, segment_ids, scale,
                                    block_sizes)
  return _block_forward(query, key, value, q_seg, kv_seg, spec=spec,
                        interpret=compat.tpu_interpret_mode(interpret))


def flash_block_backward_tpu(query, key, value, lse, delta, dout, *, causal_offset=None,
                             segment_ids=None, scale=None, block_sizes=None, interpret=False):
  """Block gradients on TPU from the *global* `lse` and `delta = rowsum(dO ∘ O)` (both
  `[b, n, t]`): float32 `(dq, dk, dv)` in the shapes of the inputs."""
  spec, q_seg, kv_seg = _block_spec(query, key, value, causal_offset, segment_ids, scale,
                                    block_sizes)
  return _block_backward(query, key, value, lse, delta, dout, q_seg, kv_seg, spec=spec,
                         interpret=compat.tpu_interpret_mode(interpret))
