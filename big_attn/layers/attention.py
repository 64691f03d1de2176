"""Multi-head attention whose mechanism is picked by registry name."""
from __future__ import annotations

import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn import ops, parallel
from big_attn.ops import common
from big_attn.ops import spatial
from big_attn.layers import kv_cache
from big_attn.layers import posemb

# `Attention.projections`: which of the key and value projections are the context's own slices.
PROJECTIONS = (None, "optimised", "efficient")


def learned_op_args(op: str, op_args: Any, implementation: str | None, inputs_q, query, key,
                    value, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> dict:
  """`op_args` plus the learned arguments of op `op` (its registered parameter module, built
  in the calling module as `op_params` from the inputs and the projected `[batch, len, heads,
  head_dim]` queries, keys and values) and `implementation` when given."""
  args = dict(op_args or {})
  params_cls = ops.params_module(op)
  if params_cls is not None:
    args.update(params_cls(
        num_heads=query.shape[2], num_kv_heads=key.shape[2], head_dim=query.shape[3],
        op_args=dict(op_args or {}), dtype=dtype, param_dtype=param_dtype,
        name="op_params")(inputs_q, query, key, value))
  if implementation is not None:
    args["implementation"] = implementation
  return args


class Projection(nn.Module):
  """`x · W (+ b)` with an N-d kernel whose every axis carries a logical name.

  The kernel is created at its full shape (not flattened as `nn.DenseGeneral` does), so
  logical-axis sharding constraints apply to it under a mesh. `kernel_init` is called, as in
  `nn.DenseGeneral`, with the 2-D shape `(fan_in, fan_out)` over the contracted and the output
  axes, and its result reshaped.
  """
  shape: tuple[int, ...]
  logical_axes: tuple[str, ...]
  contract: int = 1
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    n_in = self.contract
    flat = (math.prod(self.shape[:n_in]), math.prod(self.shape[n_in:]))
    init = lambda key, shape, dtype: self.kernel_init(key, flat, dtype).reshape(shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.logical_axes),
                        self.shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.dot_general(
        x, kernel, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.logical_axes[n_in:]), self.shape[n_in:],
                        self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


class Attention(nn.Module):
  """Self- or cross-attention with projections, GQA, optional qk-norm and any registered op.

  The op is called in one module method, `attend`; sequence parallelism and the decoding cache
  are its fields (the forms of each op: `big_attn.ops.decoding_form` and
  `sequence_parallel_form`; ops with a `block_form` in the registry run sequence-parallel),
  and tools observe or steer it with Flax's method interception
  (`big_attn.interpret.hook_ops`). A model changes what happens around the op by overriding
  `attend`.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); `num_heads` when None.
    head_dim: per-head width; `features // num_heads` when None.
    op: registry name of the attention mechanism (`big_attn.ops.names()`).
    op_args: keyword arguments of the op (mechanism hyper-parameters); `extra_tokens`, for a
      2-D op, makes the first tokens global softmax tokens around it (`ops.spatial.attend`).
    implementation: passed to ops registered with `implementation=True` ("xla", "pallas",
      "cudnn" or None); a `ValueError` for other ops. The sequence-parallel and cached paths
      compute with their own kernels (ring/striped blocks, `lean_decode`).
    qk_norm: RMS-normalise queries and keys per head before the op.
    use_bias: biases on the projections.
    out_bias: bias on the output projection; None: `use_bias` (Qwen2 has query/key/value
      biases only).
    rope_base: rotary position embedding (`posemb.apply_rope`) of queries and keys with this
      base, at the `positions` given to the call (self-attention); None: no RoPE.
    rope_scaling: RoPE frequency scaling for long contexts (`posemb.rope_frequencies`: None or
      a dict with `rope_type` "linear", "dynamic" or "llama3").
    seq_parallel: a `big_attn.parallel.SeqParallel`: the op runs with the sequence split over
      its mesh axis (`SeqParallel.attention`, inputs in the strategy's token order); None: off.
    decode: causal self-attention of new tokens after the cached ones (collection "cache"), in
      the op's `ops.decoding_form`: a `kv_cache.KVCache` of keys and values (softmax forms), a
      `kv_cache.RecurrentCache` (recurrent state forms), or an `kv_cache.InputCache` of the
      layer's inputs over which every other causal op is evaluated whole, the new tokens'
      outputs kept.
    cache_len: cache entries per sequence when `decode`.
    kernel_init: projection initialiser, called with the 2-D `(fan_in, fan_out)` shape.
    projections: None (learned W_Q, W_K, W_V, W_O) or, after You Need to Pay Better Attention
      (Hosseini & Hosseini 2024), "optimised" (no W_V: head h's values are the h-th slice of
      the context's features, 3/4 of the weights) or "efficient" (no W_K nor W_V: keys and
      values are those slices, 1/2 of the weights; with op "super_attention" it is the paper's
      Super Attention). Needs `num_kv_heads` None or `num_heads`, and for "efficient"
      `head_dim` None or the slice width.
  Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `norm`).
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  op: str = "softmax"
  op_args: Any = None
  implementation: str | None = None
  qk_norm: bool = False
  use_bias: bool = False
  out_bias: bool | None = None
  rope_base: float | None = None
  rope_scaling: Any = None
  seq_parallel: parallel.SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  projections: str | None = None

  def _projection(self, shape, logical_axes, name, contract=1, use_bias=None):
    return Projection(shape=shape, logical_axes=logical_axes, contract=contract,
                      use_bias=self.use_bias if use_bias is None else use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, name=name)

  def _check_op(self) -> None:
    """The op's declared capabilities against the layer's fields, before any computation."""
    spec = ops.spec(self.op)
    if self.implementation is not None and not spec.implementation:
      raise ValueError(f"attention op {self.op!r} takes no `implementation` argument, got "
                       f"implementation={self.implementation!r}")
    if self.decode and self.seq_parallel is not None:
      raise ValueError("Attention: decode=True and seq_parallel are exclusive (decoding runs "
                       "on one device per sequence)")
    if self.projections not in PROJECTIONS:
      raise ValueError(f"projections must be one of {PROJECTIONS}, got {self.projections!r}")
    if self.projections is not None and self.num_kv_heads not in (None, self.num_heads):
      raise ValueError(f"projections={self.projections!r} slices the context into num_heads "
                       f"({self.num_heads}) key/value heads: num_kv_heads must be None or "
                       f"{self.num_heads}, got {self.num_kv_heads}")
    if self.decode:
      ops.check_form(self.op, "decoding")
    if self.seq_parallel is not None:
      if ops.check_form(self.op, "sequence-parallel") == "state":
        self.seq_parallel.check_linear_state(self.op)

  @nn.compact
  def __call__(self, inputs_q, context=None, *, mask=None, is_causal=False,
               segment_ids=None, positions=None, inputs_kv=None):
    """`inputs_q: [batch, q_len, features]`; `context` (cross-attention) defaults to it.

    `mask` is boolean, broadcastable to `[batch, heads, q_len, kv_len]`; `segment_ids` as in
    `big_attn.ops.dot_product_attention`; `positions` (`[batch, q_len]` ints, default
    0..q_len-1) are the token positions RoPE uses. `inputs_kv` is the deprecated name of
    `context`.
    """
    if inputs_kv is not None:
      warnings.warn("Attention(...)(inputs_q, inputs_kv=...) is deprecated; pass context=",
                    DeprecationWarning, stacklevel=2)
      if context is not None:
        raise ValueError("pass context or its deprecated name inputs_kv, not both")
      context = inputs_kv
    self._check_op()
    if inputs_q.ndim != 3:
      raise ValueError(f"inputs_q must be [batch, seq, features], got shape {inputs_q.shape}")
    recompute = self.decode and ops.decoding_form(self.op) == "inputs"
    if recompute:  # the op over all cached inputs; the new tokens' outputs are kept
      if context is not None or mask is not None or segment_ids is not None or not is_causal:
        raise ValueError(f"decoding attention op {self.op!r} attends causally within one "
                         "sequence: is_causal=True, without context, mask or segment_ids")
      new = inputs_q.shape[1]
      inputs_q, positions, start = kv_cache.InputCache(self.cache_len, name="cache")(
          inputs_q, positions)
    context = inputs_q if context is None else context
    if context.ndim != 3:
      raise ValueError(f"context must be [batch, seq, features], got shape {context.shape}")
    features = inputs_q.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if self.head_dim is None and features % self.num_heads:
      raise ValueError(
          f"features ({features}) must be divisible by num_heads ({self.num_heads}) "
          "when head_dim is not given")
    head_dim = self.head_dim or features // self.num_heads
    op_args = dict(self.op_args or {})

    kv_features = context.shape[-1]
    if self.projections is not None:
      if kv_features % num_kv_heads:
        raise ValueError(f"projections={self.projections!r}: the context's features "
                         f"({kv_features}) must be divisible by num_heads ({num_kv_heads})")
      if self.projections == "efficient" and kv_features // num_kv_heads != head_dim:
        raise ValueError(f"projections='efficient' dots queries with the context's slices of "
                         f"{kv_features // num_kv_heads} features: head_dim must be None or "
                         f"that, got {head_dim}")
      slices = context.reshape(context.shape[:2] + (num_kv_heads, -1)).astype(
          self.dtype or jnp.result_type(context.dtype, self.param_dtype))
    query = self._projection((features, self.num_heads, head_dim),
                             ("embed", "heads", "head_dim"), "query")(inputs_q)
    if self.projections == "efficient":
      key = slices
    else:
      key = self._projection((kv_features, num_kv_heads, head_dim),
                             ("embed", "kv_heads", "head_dim"), "key")(context)
    if self.projections is None:
      value = self._projection((kv_features, num_kv_heads, head_dim),
                               ("embed", "kv_heads", "head_dim"), "value")(context)
    else:
      value = slices
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(  # pylint: disable=g-long-lambda
          dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)))
      query, key = norm("query_norm")(query), norm("key_norm")(key)
    if self.rope_base is not None:
      if context is not inputs_q:
        raise ValueError("rope_base is for self-attention; got a separate context")
      if positions is None:
        positions = jnp.arange(inputs_q.shape[1])
      query = posemb.apply_rope(query, positions, self.rope_base, self.rope_scaling)
      key = posemb.apply_rope(key, positions, self.rope_base, self.rope_scaling)

    op_args = learned_op_args(self.op, op_args, self.implementation, inputs_q, query, key, value,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    out = self.attend(query, key, value, mask=mask, is_causal=is_causal,
                      segment_ids=segment_ids, op_args=op_args)
    if recompute:
      out = kv_cache.new_tokens(out, start, new)

    return self._projection((self.num_heads, value.shape[-1], features),
                            ("heads", "head_dim", "embed"), "out", contract=2,
                            use_bias=self.out_bias)(out)

  def attend(self, query, key, value, *, mask=None, is_causal=False, segment_ids=None,
             op_args=None):
    """The op on projected queries `[batch, q_len, heads, dim]`, keys and values `[batch,
    kv_len, kv_heads, dim]` -> `[batch, q_len, heads, value_dim]`.

    Plain (also for ops decoded from an `InputCache`, which `__call__` runs over the whole
    cache): the registered op with `op_args` (`segment_ids` passed to ops declaring them,
    folded into the mask otherwise). With `seq_parallel`: the op's block form
    (`ops.spec(op).block_form`, merged over key blocks by `SeqParallel.attend_form`); with a
    `decode` cache: its softmax form (`ops.spec(op).softmax_form`) over the `KVCache`; these take
    `segment_ids` (sequence parallelism) and `is_causal`, not a mask. An op with a recurrent
    state form (`ops.recurrent.STATE_FORMS`) instead passes its state between contiguous
    shards (`SeqParallel.linear_state`) or keeps it in a `kv_cache.RecurrentCache` (causal,
    one unmasked sequence per row); hyena (`ops.forms.CONVOLUTION_FORMS`) passes its
    convolutions' inputs between shards (`SeqParallel.convolution`); ops with independent heads
    that need the whole row split their heads instead (`SeqParallel.heads`); cascaded group
    attention runs its heads in turn over the ring (`SeqParallel.cascade`).
    """
    spec = ops.spec(self.op)
    op_args = dict(op_args or {})
    for name in ("implementation", "bias"):
      if name in op_args and not getattr(spec, name):
        raise ValueError(f"attention op {self.op!r} takes no `{name}` argument (it is not "
                         f"registered with {name}=True)")
    decoding = ops.decoding_form(self.op) if self.decode else None
    cached = decoding in ("kv_cache", "state")
    if cached or self.seq_parallel is not None:
      if mask is not None:
        raise ValueError("sequence-parallel and cached attention take segment_ids and "
                         "is_causal, not a mask")
      op_args.pop("implementation", None)
      if (decoding if cached else ops.sequence_parallel_form(self.op)) == "state":
        if cached:
          if segment_ids is not None:
            raise ValueError(f"attention op {self.op!r} decodes one recurrent state per row: "
                             "packed sequences (segment_ids) are not supported in cached form")
          return kv_cache.RecurrentCache(self.op, name="cache")(query, key, value, **op_args)
        return self.seq_parallel.linear_state(self.op, query, key, value,
                                              is_causal=is_causal, segment_ids=segment_ids,
                                              **op_args)
      form = None if cached else ops.sequence_parallel_form(self.op)
      if form in ("convolution", "heads", "cascade"):
        run = getattr(self.seq_parallel, form)
        return run(self.op, query, key, value, is_causal=is_causal, segment_ids=segment_ids,
                   **op_args)
      if not cached:
        block = spec.block_form(query, key, op_args.pop("scale", None), **op_args)
        return self.seq_parallel.attend_form(block, value, is_causal=is_causal,
                                             segment_ids=segment_ids)
      window = op_args.pop("local_window_size", None)
      query, key, scale = spec.softmax_form(query, key, op_args.pop("scale", None), **op_args)
      if segment_ids is not None:
        raise ValueError("decoding takes one document per sequence: no segment_ids")
      return kv_cache.KVCache(self.cache_len, name="cache")(
          query, key, value, is_causal=is_causal, scale=scale, local_window_size=window)
    if segment_ids is not None:
      if spec.segment_ids:
        op_args["segment_ids"] = segment_ids
      else:
        mask = common.make_mask(common.check_qkv(query, key, value), mask=mask,
                                segment_ids=segment_ids)
    return spatial.attend(spec.fn, query, key, value, mask=mask, is_causal=is_causal, **op_args)
