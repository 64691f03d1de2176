"""Sequence parallelism in one place: the layout rule, the per-shard strategies and the global
wrapper.

- `SeqParallel(mesh, axis, strategy)`: where the sequence is split, the one rule for the other
  dimensions (batch over the mesh axes "data" and "fsdp", heads over "tensor") and
  `SeqParallel.attention` for arrays already in the strategy's token order (a model stripes its
  inputs once; `big_attn.layers.Attention(seq_parallel=...)` calls it).
- `shard_attention`: the strategy switch for the per-shard function inside `jax.shard_map`
  ("ring", "striped" or "all_gather").
- `sequence_parallel_attention`: global arrays in natural order in and out.
- `SeqParallel.linear_state` and `SeqParallel.convolution`: the ops that pass a recurrent state
  (`linear_state.py`) or their convolutions' inputs (hyena, `convolution.py`) between shards.
- `SeqParallel.heads`: ops with independent heads that need the whole row, run on a split of
  the heads between two all-to-alls (`heads.py`); `SeqParallel.cascade`: cascaded group
  attention, its heads one after the other, each a pass of the ring (`cascade.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_attn import compat
from big_attn import ops
from big_attn.ops import common
from big_attn.ops.registry import BlockForm
from big_attn.ops.softmax import dot_product_attention
from big_attn.parallel import merge
from big_attn.parallel.cascade import cascade_shard_attention
from big_attn.parallel.convolution import hyena_shard_attention
from big_attn.parallel.heads import head_parallel_attention
from big_attn.parallel.linear_state import linear_state_attention
from big_attn.parallel.ring import ring_attention
from big_attn.parallel.striped import stripe, striped_attention

Array = jax.Array

STRATEGIES = ("ring", "striped", "all_gather")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def all_gather_attention(query: Array, key: Array, value: Array, *, axis_name,
                         is_causal: bool = False, segment_ids=None,
                         scale: float | None = None) -> Array:
  """Per-shard softmax attention of the local queries against all keys/values gathered over
  `axis_name` (contiguous shards; call inside `jax.shard_map`). `segment_ids`: None or the
  local `(q_segment_ids, kv_segment_ids)`."""
  t = query.shape[1]
  gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
  key, value = gather(key), gather(value)
  mask = None
  if is_causal:
    q_pos = lax.axis_index(axis_name) * t + jnp.arange(t)
    mask = (jnp.arange(key.shape[1])[None, :] <= q_pos[:, None])[None, None]
  segments = None if segment_ids is None else (segment_ids[0], gather(segment_ids[1]))
  return dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=False,
                               segment_ids=segments, implementation="xla")


def shard_attention(query: Array, key: Array, value: Array, *, axis_name, strategy: str,
                    is_causal: bool = False, segment_ids=None, scale: float | None = None,
                    rule: merge.Rule | None = None, pair_arrays=None) -> Array:
  """The per-shard function of `strategy` inside `jax.shard_map` over `axis_name`:
  `ring_attention` ("ring", contiguous shards), `striped_attention` ("striped", striped token
  order) or `all_gather_attention` ("all_gather", contiguous shards). `segment_ids`: None or
  the local `(q_segment_ids, kv_segment_ids)`. `rule`: the block-merge rule of a softmax-family
  op (`merge.Rule`, `merge.rule_ring_attention` / `merge.rule_all_gather_attention`); None:
  softmax. `pair_arrays`: the local arrays of the rule's position terms (`Rule.pair`)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not merge.is_plain_softmax(rule):
    kwargs = dict(axis_name=axis_name, rule=rule, is_causal=is_causal,
                  segment_ids=segment_ids, scale=scale, pair_arrays=pair_arrays)
    if strategy == "all_gather":
      return merge.rule_all_gather_attention(query, key, value, **kwargs)
    return merge.rule_ring_attention(strategy, query, key, value, **kwargs)
  attend = {"ring": ring_attention, "striped": striped_attention,
            "all_gather": all_gather_attention}[strategy]
  return attend(query, key, value, axis_name=axis_name, is_causal=is_causal,
                segment_ids=segment_ids, scale=scale)


def _working_mesh(mesh, *arrays):
  """`mesh`, or its Auto-axes view when neither the inputs' types nor a `jax.set_mesh`
  context carry Explicit axes.

  An output typed as sharded over Explicit axes can only be used where a mesh context exists
  (`jax.grad` builds its cotangent from the output's type), so the result's type follows the
  caller: Explicit in, Explicit out; unsharded in (an Explicit `jax.make_mesh` passed without
  `jax.set_mesh`), an array laid out on the mesh whose type is unsharded.
  """
  explicit = jax.sharding.AxisType.Explicit
  if explicit not in tuple(getattr(mesh, "axis_types", ())):
    return mesh
  typed = [jax.typeof(x).sharding.mesh for x in arrays if x is not None]
  if any(explicit in tuple(m.axis_types) for m in typed + [jax.sharding.get_abstract_mesh()]
         if not m.empty):
    return mesh
  return mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def _gated(out: Array, gate_logits: Array | None) -> Array:
  """σ(gate_logits)[..., None] · out in float32, in out's dtype (gated attention's gate,
  applied to the merged output)."""
  if gate_logits is None:
    return out
  gate = jax.nn.sigmoid(gate_logits.astype(jnp.float32))[..., None]
  return (gate * out.astype(jnp.float32)).astype(out.dtype)


def _mapped(fn, x: Array) -> Array:
  """`fn(x)`, or x when `fn` is None (a `BlockForm`'s value map)."""
  return x if fn is None else fn(x)


@dataclasses.dataclass(frozen=True)
class SeqParallel:
  """Sequence parallelism: the sequence split over mesh axis `axis` with `strategy`.

  The one layout rule (`layout`): the batch is split over the mesh axes "data" and "fsdp", the
  heads over "tensor" (those present with size > 1, other than `axis`); every other mesh axis
  replicates.
  """
  mesh: Any
  axis: str = "seq"
  strategy: str = "striped"

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.axis not in self.mesh.axis_names:
      raise ValueError(f"seq_axis {self.axis!r} is not an axis of the mesh (axes "
                       f"{tuple(self.mesh.axis_names)})")

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.axis]

  def _used(self, axis: str) -> bool:
    return axis in self.mesh.axis_names and axis != self.axis and self.mesh.shape[axis] > 1

  def layout(self, batch: int, *num_heads: int, strict: bool = False):
    """`(batch_axes or None, head_axis or None)` for a batch of `batch` and head counts
    `num_heads` (queries, keys/values). A size that the mesh axes do not divide raises a
    `ValueError` with `strict`, and is replicated otherwise (a model initialised on one
    example)."""
    batch_axes = tuple(a for a in BATCH_AXES if self._used(a))
    num_batch = math.prod(self.mesh.shape[a] for a in batch_axes)
    if batch % num_batch:
      if strict:
        raise ValueError(f"batch size {batch} is not divisible by the mesh axes {batch_axes} "
                         f"it is sharded over (size {num_batch})")
      batch_axes = ()
    head_axis = HEAD_AXIS if self._used(HEAD_AXIS) else None
    if head_axis is not None and any(n % self.mesh.shape[head_axis] for n in num_heads):
      if strict:
        raise ValueError(f"head counts {num_heads} must be divisible by the size "
                         f"{self.mesh.shape[head_axis]} of mesh axis {head_axis!r} they are "
                         "sharded over")
      head_axis = None
    return batch_axes or None, head_axis

  def constrain(self, x: Array) -> Array:
    """`[batch, length, ...]` activations sharded over the batch axes and the sequence axis."""
    spec = P(self.layout(x.shape[0])[0], self.axis, *([None] * (x.ndim - 2)))
    return lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def attention(self, query: Array, key: Array, value: Array, *, is_causal: bool = False,
                segment_ids: Array | None = None, scale: float | None = None,
                rule: merge.Rule | None = None, gate_logits: Array | None = None,
                pair_arrays=None) -> Array:
    """Softmax attention (or the softmax-family op of block-merge `rule`, then the gate
    σ(`gate_logits` `[batch, q_len, num_heads]`) if given) with the sequence split over
    `axis`, of arrays in the strategy's token order (striped for "striped", natural
    otherwise): the inputs laid out by `layout`, then `jax.shard_map` of `shard_attention`
    (Explicit or Auto mesh axes, as `sequence_parallel_attention`). `segment_ids`:
    `[batch, seq]` for self-attention, or None. `pair_arrays`: the arrays of the rule's
    position terms (heads leading), split with the heads (and the hard rule's keys, `[heads,
    batch]`, with the batch too: `merge.pair_arrays_spec`)."""
    batch_axes, heads = self.layout(query.shape[0], query.shape[2], key.shape[2])
    qkv_spec, seg_spec = P(batch_axes, self.axis, heads, None), P(batch_axes, self.axis)
    mesh = _working_mesh(self.mesh, query, key, value)

    def per_shard(q, k, v, pair, *seg):
      return shard_attention(q, k, v, axis_name=self.axis, strategy=self.strategy,
                             is_causal=is_causal, segment_ids=(seg[0], seg[0]) if seg else None,
                             scale=scale, rule=rule, pair_arrays=pair)

    args = (query, key, value) + (() if segment_ids is None else (segment_ids,))
    specs = (qkv_spec,) * 3 + (() if segment_ids is None else (seg_spec,))
    args = [compat.constrain(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs)]
    pair_spec = merge.pair_arrays_spec(rule, heads, batch_axes)
    out = compat.shard_map(per_shard, mesh=mesh, in_specs=specs[:3] + (pair_spec,) + specs[3:],
                           out_specs=qkv_spec)(*args[:3], pair_arrays, *args[3:])
    return _gated(out, gate_logits)

  def positions(self, length: int) -> np.ndarray:
    """The global positions `[length]` of a sequence in the strategy's token order."""
    natural = np.arange(length)
    return stripe(natural, self.num_shards, axis=0) if self.strategy == "striped" else natural

  def attend_form(self, form: BlockForm, value: Array, *, is_causal: bool = False,
                  segment_ids: Array | None = None) -> Array:
    """`attention` of an op's `BlockForm` (`ops.spec(op).block_form(...)`) and `value`, with
    the form's value and output maps around it; a form that depends on its tokens' global
    positions (`BlockForm.at_positions`) is taken at those of the strategy's token order."""
    if form.at_positions is not None:
      q_pos, k_pos = (self.positions(x.shape[1]) for x in (form.query, form.key))
      form = form.at_positions(q_pos, k_pos)
    out = self.attention(form.query, form.key, _mapped(form.value_map, value),
                         is_causal=is_causal, segment_ids=segment_ids, scale=form.scale,
                         rule=merge.make_rule(form.merge, form.params, form.pair_terms,
                                              form.pair_scores),
                         gate_logits=form.gate_logits, pair_arrays=form.pair_arrays)
    return out if form.output_map is None else form.output_map(out, value)

  def check_linear_state(self, op: str) -> None:
    """A `ValueError` naming op `op` unless the strategy keeps the contiguous token order that
    passing a recurrent state needs (not "striped")."""
    if self.strategy == "striped":
      raise ValueError(
          f"attention op {op!r} runs sequence-parallel by passing its recurrent state between "
          "contiguous shards (LASP); strategy 'striped' breaks the token order it needs: use "
          "strategy 'ring' or 'all_gather'")

  def linear_state(self, op: str, query: Array, key: Array, value: Array, *,
                   is_causal: bool = True, segment_ids: Array | None = None,
                   **op_args) -> Array:
    """Causal op `op` with a recurrent state form (`big_attn.ops.recurrent`) with the sequence
    split over `axis` in contiguous shards: `linear_state_attention` (LASP) inside
    `jax.shard_map`. `segment_ids`: `[batch, seq]` packed rows, or None. The batch is laid out
    by `layout`; heads and the op's array arguments (its weights) are replicated. The
    "striped" strategy is refused: the recurrence runs in token order (see
    `big_attn.parallel.linear_state`)."""
    self.check_linear_state(op)
    return self._shard_map_op(
        functools.partial(linear_state_attention, op=op, axis_name=self.axis,
                          is_causal=is_causal), query, key, value, segment_ids, op_args)

  def _shard_map_op(self, per_shard, query: Array, key: Array, value: Array,
                    segment_ids: Array | None, op_args: dict[str, Any],
                    token_args: dict[str, int] | None = None) -> Array:
    """`per_shard(q, k, v, segment_ids=..., **op_args)` inside `jax.shard_map` over the mesh:
    query, key, value and `segment_ids` split along the sequence over `axis` (the batch by
    `layout`); the op's arguments named in `token_args` (name: the axis of their batch, which
    their sequence follows) split as the tokens, its other array arguments (weights)
    replicated, the rest static."""
    batch_axes, _ = self.layout(query.shape[0])
    qkv_spec, seg_spec = P(batch_axes, self.axis, None, None), P(batch_axes, self.axis)
    mesh = _working_mesh(self.mesh, query, key, value)
    op_args = dict(op_args)
    token_args = token_args or {}
    split = {k: op_args.pop(k) for k in token_args if op_args.get(k) is not None}
    split_specs = {k: P(*(None,) * token_args[k], batch_axes, self.axis,
                        *(None,) * (v.ndim - token_args[k] - 2)) for k, v in split.items()}
    split = {k: compat.constrain(v, NamedSharding(mesh, split_specs[k]))
             for k, v in split.items()}
    weights = {k: v for k, v in op_args.items() if isinstance(v, (jax.Array, np.ndarray))}
    static = {k: v for k, v in op_args.items() if k not in weights}

    def shard(q, k, v, w, t, *seg):
      return per_shard(q, k, v, segment_ids=seg[0] if seg else None, **w, **t, **static)

    args = [compat.constrain(x, NamedSharding(mesh, qkv_spec)) for x in (query, key, value)]
    segs, seg_specs = (), ()
    if segment_ids is not None:
      segs, seg_specs = (compat.constrain(segment_ids, NamedSharding(mesh, seg_spec)),), (seg_spec,)
    return compat.shard_map(
        shard, mesh=mesh, in_specs=(qkv_spec,) * 3 + (P(), split_specs) + seg_specs,
        out_specs=qkv_spec)(*args, weights, split, *segs)

  def convolution(self, op: str, query: Array, key: Array, value: Array, *,
                  is_causal: bool = True, segment_ids: Array | None = None,
                  **op_args) -> Array:
    """Op `op` of `ops.forms.CONVOLUTION_FORMS` (hyena) with the sequence split over `axis`,
    of arrays in the strategy's token order: `hyena_shard_attention` inside `jax.shard_map`,
    its convolutions' inputs passed around the ring ("ring", "striped") or all-gathered
    ("all_gather"). `segment_ids`: `[batch, seq]` packed rows, or None. The batch is laid out
    by `layout`; heads and the op's weights are replicated, its `gates` `[N − 2, batch, seq,
    heads, head_dim]` split as the tokens."""
    if ops.sequence_parallel_form(op) != "convolution":
      raise ValueError(f"attention op {op!r} has no convolution form (ops with one: "
                       f"{', '.join(ops.forms.CONVOLUTION_FORMS)})")
    return self._shard_map_op(
        functools.partial(hyena_shard_attention, axis_name=self.axis, strategy=self.strategy,
                          is_causal=is_causal), query, key, value, segment_ids, op_args,
        token_args={"gates": 1})

  def cascade(self, op: str, query: Array, key: Array, value: Array, *,
              is_causal: bool = True, segment_ids: Array | None = None, **op_args) -> Array:
    """Op `op` of `ops.forms.CASCADE_FORMS` (cascaded_group_attention) with the sequence split
    over `axis`, of arrays in the strategy's token order: `cascade_shard_attention` inside
    `jax.shard_map`, each head one pass of the strategy's `shard_attention`, the query
    convolution on all-gathered queries. `segment_ids`: `[batch, seq]` packed rows, or None.
    The batch is laid out by `layout`; heads and the op's weights are replicated."""
    if ops.sequence_parallel_form(op) != "cascade":
      raise ValueError(f"attention op {op!r} has no cascade form (ops with one: "
                       f"{', '.join(ops.forms.CASCADE_FORMS)})")
    attend = functools.partial(shard_attention, axis_name=self.axis, strategy=self.strategy)
    return self._shard_map_op(
        functools.partial(cascade_shard_attention, axis_name=self.axis, shard_attend=attend,
                          striped=self.strategy == "striped", is_causal=is_causal),
        query, key, value, segment_ids, op_args)

  def heads(self, op: str, query: Array, key: Array, value: Array, *, is_causal: bool = True,
            segment_ids: Array | None = None, **op_args) -> Array:
    """Op `op` with independent heads (registered with `head_args`) with the sequence split
    over `axis`, of arrays in the strategy's token order: `head_parallel_attention` inside
    `jax.shard_map`, an all-to-all to a split of the heads and back (any strategy; the
    query heads must divide by the number of shards). `segment_ids`: `[batch, seq]` packed
    rows, or None. The batch is laid out by `layout`; the op's per-token arguments split as the
    tokens, its weights replicated (each device takes its heads' slice)."""
    if ops.sequence_parallel_form(op) != "heads":
      raise ValueError(f"attention op {op!r} has no head-parallel form (ops with one: "
                       f"{', '.join(n for n in ops.names() if ops.spec(n).head_args is not None)})")
    token_args = {k: 0 for k, arg in ops.spec(op).head_args.items() if arg.per_token}
    return self._shard_map_op(
        functools.partial(head_parallel_attention, op=op, axis_name=self.axis,
                          striped=self.strategy == "striped", is_causal=is_causal),
        query, key, value, segment_ids, op_args, token_args=token_args)


def sequence_parallel_attention(query: Array, key: Array, value: Array, *, mesh,
                                seq_axis: str = "seq", strategy: str = "striped",
                                is_causal: bool = True, segment_ids=None,
                                scale: float | None = None, op: str = "softmax",
                                **op_args) -> Array:
  """Attention op `op` of global arrays with the sequence split over the mesh axis `seq_axis`.

  For op "softmax", out = softmax(s·QKᵀ, masked) V, exactly as
  `big_attn.ops.dot_product_attention`; any op with a `block_form` in the registry (its merge
  rule, with the form's per-token value and output maps around it; the README's table of op
  forms lists them) gives exactly `ops.get(op)` with `op_args`, its blocks merged by its rule
  (`big_attn.parallel.merge`).
  Computed by
  - "ring": `ring_attention` (Liu et al. 2023) on contiguous shards;
  - "striped": `striped_attention` (Brandon et al. 2023): the tokens are laid out in striped
    order for the computation (shard j holds tokens j, j+P, ...) and the output is returned in
    natural order, so causal work is balanced over the devices;
  - "all_gather": each device gathers all keys/values and attends its local queries.

  Layout: the sequence dimension is sharded over `seq_axis`; the batch and heads as
  `SeqParallel.layout` says (batch over "data"/"fsdp", heads over "tensor"; sizes must divide);
  every other mesh axis replicates. The output has the same layout. For "striped", the striped
  order is a sharding of the sequence viewed as `[seq / P, P]` with the P dimension over
  `seq_axis`, so no separate permutation is materialised (in a model, `stripe` the tokens once
  at the input and use `SeqParallel.attention` instead).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`, natural token order.
    key: `[batch, kv_len, num_kv_heads, head_dim]` (GQA: num_heads % num_kv_heads == 0).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mesh: a `jax.sharding.Mesh` with the axis `seq_axis` (Auto or Explicit axes).
    seq_axis: the mesh axis that splits the sequence; both lengths must be divisible by it.
    strategy: "ring", "striped" or "all_gather".
    is_causal: query i attends keys j <= i (needs q_len == kv_len).
    segment_ids: `[batch, seq]` ints or a pair `(q_segment_ids, kv_segment_ids)`.
    scale: logit scale; the op's default (`1/sqrt(head_dim)` for softmax) when None.
    op: a registered op with a `block_form` (`ops.sequence_parallel_form(op)`);
      a `ValueError` naming the op otherwise.
    **op_args: the op's arguments (e.g. `logit_bias`, `gate_logits`, `alpha`), as for
      `ops.get(op)`.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype, natural order.
  """
  sp = SeqParallel(mesh, seq_axis, strategy)
  form = ops.check_form(op, "sequence-parallel")
  if form != "block":
    how, method = {"state": ("passing its recurrent state", "linear_state"),
                   "convolution": ("passing its convolutions' inputs", "convolution"),
                   "heads": ("splitting its heads", "heads"),
                   "cascade": ("running its heads in turn, each over the ring", "cascade")}[form]
    raise ValueError(f"attention op {op!r} runs sequence-parallel by {how}: call "
                     f"SeqParallel.{method} (or Attention(seq_parallel=...))")
  common.check_qkv(query, key, value)
  form = ops.spec(op).block_form(query, key, scale, **op_args)
  query, key = form.query, form.key
  rule = merge.make_rule(form.merge, form.params, form.pair_terms, form.pair_scores)
  op_value, value = value, _mapped(form.value_map, value)
  dims = common.check_qkv(query, key, value)
  segments = common.normalize_segment_ids(segment_ids, dims)
  if is_causal and dims.q_len != dims.kv_len:
    raise ValueError(
        f"is_causal=True needs q_len == kv_len, got {dims.q_len} and {dims.kv_len}")
  for name, length in (("query", dims.q_len), ("key/value", dims.kv_len)):
    if length % sp.num_shards:
      raise ValueError(
          f"{name} sequence length {length} is not divisible by the size {sp.num_shards} of "
          f"mesh axis {seq_axis!r}")
  batch_axes, head_axis = sp.layout(dims.batch, dims.num_heads, dims.num_kv_heads, strict=True)
  out = _sharded_attention(
      query, key, value, segments, mesh=_working_mesh(mesh, query, key, value),
      seq_axis=seq_axis, strategy=strategy, is_causal=is_causal,
      scale=common.default_scale(dims.head_dim, form.scale), batch_axes=batch_axes,
      head_axis=head_axis, rule=rule, pair_arrays=form.pair_arrays)
  out = _gated(out, form.gate_logits)
  return out if form.output_map is None else form.output_map(out, op_value)


# Jitted so that a call outside `jax.jit` compiles the `shard_map` once instead of running its
# body op by op; under an outer `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "strategy", "is_causal",
                                             "scale", "batch_axes", "head_axis", "rule"))
def _sharded_attention(query, key, value, segments, pair_arrays=None, *, mesh, seq_axis,
                       strategy, is_causal, scale, batch_axes, head_axis, rule):
  """`sequence_parallel_attention` after its checks: the shard_map and the layout around it."""
  dims = common.check_qkv(query, key, value)
  num_shards = mesh.shape[seq_axis]

  # The sequence viewed as [shard, token] (contiguous) or [token, shard] (striped); the shard
  # dimension is the one split over seq_axis.
  shard_dim = 2 if strategy == "striped" else 1
  def split(x, with_heads=True):
    b, length = x.shape[:2]
    pair = (length // num_shards, num_shards) if shard_dim == 2 else (num_shards,
                                                                       length // num_shards)
    rest = [head_axis, None] if with_heads else []
    spec = [batch_axes, None, None] + rest
    spec[shard_dim] = seq_axis
    spec = P(*spec)
    # Contiguous over seq_axis first: the gradient's way back to the input's layout.
    x = compat.constrain(x, NamedSharding(mesh, P(batch_axes, seq_axis, *rest)))
    x = compat.reshape_with_sharding(x, (b,) + pair + x.shape[2:], NamedSharding(mesh, spec))
    return x, spec

  local = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])
  (q, q_spec), (k, kv_spec), (v, _) = split(query), split(key), split(value)
  q_seg = kv_seg = seg_spec = None
  if segments is not None:
    (q_seg, seg_spec), (kv_seg, _) = (split(s, with_heads=False) for s in segments)

  def per_shard(q, k, v, q_seg, kv_seg, pair):
    segs = None if q_seg is None else (local(q_seg), local(kv_seg))
    out = shard_attention(local(q), local(k), local(v), axis_name=seq_axis, strategy=strategy,
                          is_causal=is_causal, segment_ids=segs, scale=scale, rule=rule,
                          pair_arrays=pair)
    return out.reshape(q.shape[:4] + out.shape[-1:])  # a rule's output may be wider than v

  out = compat.shard_map(per_shard, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec,
                                   merge.pair_arrays_spec(rule, head_axis, batch_axes)),
                         out_specs=q_spec)(q, k, v, q_seg, kv_seg, pair_arrays)
  out_sharding = NamedSharding(mesh, P(batch_axes, seq_axis, head_axis, None))
  return compat.reshape_with_sharding(
      out, (dims.batch, dims.q_len, dims.num_heads, out.shape[-1]), out_sharding)
