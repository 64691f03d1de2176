"""Multi-head attention whose mechanism is picked by registry name."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn import ops
from big_attn.ops import common
from big_attn.ops import spatial
from big_attn.layers import op_params
from big_attn.layers import posemb


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

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); `num_heads` when None.
    head_dim: per-head width; `features // num_heads` when None.
    op: registry name of the attention mechanism (`big_attn.ops.names()`).
    op_args: keyword arguments of the op (mechanism hyper-parameters); `extra_tokens`, for a
      2-D op, makes the first tokens global softmax tokens around it (`ops.spatial.attend`).
    implementation: passed to ops that take it ("xla", "pallas", "cudnn" or None).
    qk_norm: RMS-normalise queries and keys per head before the op.
    use_bias: biases on the projections.
    out_bias: bias on the output projection; None: `use_bias` (Qwen2 has query/key/value
      biases only).
    rope_base: rotary position embedding (`posemb.apply_rope`) of queries and keys with this
      base, at the `positions` given to the call (self-attention); None: no RoPE.
    rope_scaling: RoPE frequency scaling for long contexts (`posemb.rope_frequencies`: None or
      a dict with `rope_type` "linear", "dynamic" or "llama3").
    op_wrapper: optional `op_fn -> op_fn` applied to the registered op before it is called (the
      LM's sequence-parallel `shard_map`, or its key/value cache in decoding).
    kernel_init: projection initialiser, called with the 2-D `(fan_in, fan_out)` shape.
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
  op_wrapper: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  def _projection(self, shape, logical_axes, name, contract=1, use_bias=None):
    return Projection(shape=shape, logical_axes=logical_axes, contract=contract,
                      use_bias=self.use_bias if use_bias is None else use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, name=name)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, mask=None, is_causal=False,
               segment_ids=None, positions=None):
    """`inputs_q: [batch, q_len, features]`; `inputs_kv` (cross-attention) defaults to it.

    `mask` is boolean, broadcastable to `[batch, heads, q_len, kv_len]`; `segment_ids` as in
    `big_attn.ops.dot_product_attention`; `positions` (`[batch, q_len]` ints, default
    0..q_len-1) are the token positions RoPE uses.
    """
    if inputs_q.ndim != 3:
      raise ValueError(f"inputs_q must be [batch, seq, features], got shape {inputs_q.shape}")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    if inputs_kv.ndim != 3:
      raise ValueError(f"inputs_kv must be [batch, seq, features], got shape {inputs_kv.shape}")
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
    op_fn = ops.get(self.op)
    if self.op_wrapper is not None:
      op_fn = self.op_wrapper(op_fn)
    op_args = dict(self.op_args or {})

    kv_features = inputs_kv.shape[-1]
    query = self._projection((features, self.num_heads, head_dim),
                             ("embed", "heads", "head_dim"), "query")(inputs_q)
    key = self._projection((kv_features, num_kv_heads, head_dim),
                           ("embed", "kv_heads", "head_dim"), "key")(inputs_kv)
    value = self._projection((kv_features, num_kv_heads, head_dim),
                             ("embed", "kv_heads", "head_dim"), "value")(inputs_kv)
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(  # pylint: disable=g-long-lambda
          dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)))
      query, key = norm("query_norm")(query), norm("key_norm")(key)
    if self.rope_base is not None:
      if inputs_kv is not inputs_q:
        raise ValueError("rope_base is for self-attention; got a separate inputs_kv")
      if positions is None:
        positions = jnp.arange(inputs_q.shape[1])
      query = posemb.apply_rope(query, positions, self.rope_base, self.rope_scaling)
      key = posemb.apply_rope(key, positions, self.rope_base, self.rope_scaling)

    params_cls = op_params.params_module(self.op)
    if params_cls is not None:
      op_args.update(params_cls(
          num_heads=self.num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
          op_args=dict(self.op_args or {}), dtype=self.dtype, param_dtype=self.param_dtype,
          name="op_params")(inputs_q, query, key, value))

    if segment_ids is not None and not ops.accepts(op_fn, "segment_ids"):
      dims = common.check_qkv(query, key, value)
      mask = common.make_mask(dims, mask=mask, segment_ids=segment_ids)
      segment_ids = None
    if segment_ids is not None:
      op_args["segment_ids"] = segment_ids
    if self.implementation is not None:
      if not ops.accepts(op_fn, "implementation"):
        raise ValueError(f"attention op {self.op!r} takes no implementation argument, "
                         f"got implementation={self.implementation!r}")
      op_args["implementation"] = self.implementation
    out = spatial.attend(op_fn, query, key, value, mask=mask, is_causal=is_causal, **op_args)

    return self._projection((self.num_heads, head_dim, features),
                            ("heads", "head_dim", "embed"), "out", contract=2,
                            use_bias=self.out_bias)(out)
