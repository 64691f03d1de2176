"""Decoder-only Transformer language model (LLaMA-style), with sequence parallelism and decoding.

    model = Model(vocab_size=259, variant="tiny")
    params = model.init(jax.random.key(0), tokens)["params"]            # tokens: int [b, L]
    logits = model.apply({"params": params}, tokens, positions=positions,
                         segment_ids=segment_ids)                        # float32 [b, L, vocab]
    out = generate(model, params, prompt, 64, temperature=0.8, top_k=20, rng=key)

Blocks are pre-RMSNorm x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x)) (no biases), attention with
rotary position embeddings (RoFormer; configurable base) at explicit positions, grouped-query
attention, optional qk-norm, and the attention op picked by registry name through
`big_attn.layers.Attention`. Input and output embeddings are tied or separate. Packed documents
are kept apart by `segment_ids` (a token attends only to earlier tokens of its own segment).

Sequence parallelism (`mesh` with an axis `seq_axis` of size P > 1 and `seq_strategy`): every
attention runs inside `shard_map` over the sequence shards, "striped" with `striped_attention`
(Brandon et al. 2023), "ring" with `ring_attention` (Liu et al. 2023), "all_gather" by gathering
keys/values. For "striped" the model's per-token inputs and its logits are in striped order:
stripe tokens, positions, segment ids, targets and weights once at the input (`stripe_batch`,
as `loss_fn` does); nothing is permuted between layers. Activations stay sharded over `seq_axis`.

Decoding (`decode=True`, used by `generate`): a key/value cache of `cache_len` entries per layer
(collection "cache") and the split-KV decode op `lean_decode` (Lean Attention) over it.

Sizes (`decode_variant`; parameters for the 259-token byte vocabulary, tied / untied
embeddings, without qk-norm; counted with `jax.eval_shape`, nothing allocated):

| variant | width | depth | mlp_dim | heads | kv heads | parameters (tied) | (untied)    |
|---------|-------|-------|---------|-------|----------|-------------------|-------------|
| tiny    |   128 |     4 |     384 |     4 |        2 |           820,736 |     853,888 |
| S       |   512 |     8 |    1408 |     8 |        4 |        23,734,272 |  23,866,880 |
| M       |  1024 |    16 |    2816 |    16 |        4 |       180,654,080 | 180,919,296 |
| 1B      |  2048 |    22 |    5632 |    16 |        4 |       992,575,488 | 993,105,920 |
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_attn import compat, ops, parallel
from big_attn.layers import Attention
from big_attn.train import step as step_lib

_VARIANTS = {  # width, depth, mlp_dim, num_heads, num_kv_heads
    "tiny": (128, 4, 384, 4, 2),
    "S": (512, 8, 1408, 8, 4),
    "M": (1024, 16, 2816, 16, 4),
    "1B": (2048, 22, 5632, 16, 4),
}
STRATEGIES = parallel.STRATEGIES
REMAT_POLICIES = ("none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def decode_variant(variant: str) -> dict[str, Any]:
  """"1B" -> dict(width=2048, depth=22, mlp_dim=5632, num_heads=16, num_kv_heads=4)."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown LM variant {variant!r}; expected one of {', '.join(_VARIANTS)}")
  return dict(zip(("width", "depth", "mlp_dim", "num_heads", "num_kv_heads"),
                  _VARIANTS[variant]))


def _rms_norm(dtype, param_dtype, name):
  return nn.RMSNorm(dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            ("norm",)))


# ------------------------------------------------------------------------ sequence parallelism
@dataclasses.dataclass(frozen=True)
class SeqParallel:
  """Where the sequence is split: `mesh` axis `axis` (size > 1) with `strategy`."""
  mesh: Any
  axis: str
  strategy: str

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.axis]

  def batch_axes(self, batch: int):
    """The data-like mesh axes that split a batch of `batch` (None if they do not divide it)."""
    axes = tuple(a for a in parallel.BATCH_AXES
                 if a in self.mesh.axis_names and a != self.axis and self.mesh.shape[a] > 1)
    return axes if axes and batch % math.prod(self.mesh.shape[a] for a in axes) == 0 else None

  def head_axis(self, *num_heads: int):
    axis = parallel.HEAD_AXIS
    if axis not in self.mesh.axis_names or axis == self.axis or self.mesh.shape[axis] == 1:
      return None
    return axis if all(n % self.mesh.shape[axis] == 0 for n in num_heads) else None

  def constrain(self, x):
    """`[batch, length, ...]` activations sharded over the batch axes and the sequence axis."""
    spec = P(self.batch_axes(x.shape[0]), self.axis, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _sequence_parallel_op(op_fn, *, sp: SeqParallel):
  """`Attention.op_wrapper`: softmax attention of the sequence shards inside `shard_map`.

  The registered op (`op_fn`, softmax) is replaced by its sequence-parallel form; the
  activations arrive already in the strategy's order (striped or contiguous).
  """
  del op_fn  # the model checks that the op is softmax; the ring computes it shard by shard

  def attend(query, key, value, *, mask=None, is_causal=False, segment_ids=None, scale=None):
    if mask is not None:
      raise ValueError("sequence-parallel attention takes segment_ids and is_causal, not a mask")
    batch_axes = sp.batch_axes(query.shape[0])
    heads = sp.head_axis(query.shape[2], key.shape[2])
    qkv_spec, seg_spec = P(batch_axes, sp.axis, heads, None), P(batch_axes, sp.axis)

    def per_shard(q, k, v, *seg):
      q_seg, kv_seg = (seg[0], seg[0]) if seg else (None, None)
      if sp.strategy == "all_gather":
        return parallel._all_gather_attention(  # pylint: disable=protected-access
            q, k, v, q_seg, kv_seg, axis_name=sp.axis, is_causal=is_causal, scale=scale)
      attend_shard = (parallel.striped_attention if sp.strategy == "striped"
                      else parallel.ring_attention)
      return attend_shard(q, k, v, axis_name=sp.axis, is_causal=is_causal,
                          segment_ids=None if q_seg is None else (q_seg, kv_seg), scale=scale)

    args = (query, key, value) + (() if segment_ids is None else (segment_ids,))
    specs = (qkv_spec,) * 3 + (() if segment_ids is None else (seg_spec,))
    return compat.shard_map(per_shard, mesh=sp.mesh, in_specs=specs,
                            out_specs=qkv_spec)(*args)

  return attend


# -------------------------------------------------------------------------------------- cache
def _cached_decode_op(op_fn, *, cache_key, cache_value, index):
  """`Attention.op_wrapper` in decoding: appends the new keys/values to the cache variables and
  attends the new queries to the valid cache with the split-KV op `lean_decode`."""
  del op_fn  # softmax, computed over the cache by lean_decode

  def attend(query, key, value, *, mask=None, is_causal=False, segment_ids=None, scale=None):
    if mask is not None or segment_ids is not None:
      raise ValueError("decoding takes one document per sequence: no mask or segment_ids")
    start = index.value
    cache_key.value = jax.lax.dynamic_update_slice(
        cache_key.value, key.astype(cache_key.value.dtype), (0, start, 0, 0))
    cache_value.value = jax.lax.dynamic_update_slice(
        cache_value.value, value.astype(cache_value.value.dtype), (0, start, 0, 0))
    index.value = start + query.shape[1]
    return ops.get("lean_decode")(query, cache_key.value, cache_value.value, is_causal=is_causal,
                                  scale=scale, kv_length=index.value)

  return attend


# ------------------------------------------------------------------------------------- blocks
class SwiGLU(nn.Module):
  """W_out (silu(x W_gate) ⊙ x W_up) (Shazeer 2020, "GLU Variants Improve Transformer")."""
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def dense(width, axes, name):
      return nn.Dense(width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name, kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), axes))
    gate = dense(self.mlp_dim, ("embed", "mlp"), "wi_gate")(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), "wi_up")(x)
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """x + Attn(RMSNorm(x)) then x + SwiGLU(RMSNorm(x)); returns `(x, None)` for `nn.scan`."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  rope_base: float = 10_000.
  dropout: float = 0.0
  seq_parallel: SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True):
    constrain = self.seq_parallel.constrain if self.seq_parallel else lambda y: y
    op_wrapper = None
    if self.seq_parallel is not None:
      op_wrapper = functools.partial(_sequence_parallel_op, sp=self.seq_parallel)
    if self.decode:
      shape = (x.shape[0], self.cache_len, self.num_kv_heads, self.head_dim)
      op_wrapper = functools.partial(
          _cached_decode_op,
          cache_key=self.variable("cache", "key", jnp.zeros, shape, self.dtype),
          cache_value=self.variable("cache", "value", jnp.zeros, shape, self.dtype),
          index=self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)))
    y = _rms_norm(self.dtype, self.param_dtype, "attention_norm")(x)
    y = Attention(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  head_dim=self.head_dim, op=self.attention, op_args=self.attention_args,
                  implementation=self.attention_impl, qk_norm=self.qk_norm,
                  rope_base=self.rope_base, op_wrapper=op_wrapper, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="attention")(
                      y, is_causal=True, segment_ids=segment_ids, positions=positions)
    x = constrain(x + nn.Dropout(rate=self.dropout)(y, deterministic))
    y = _rms_norm(self.dtype, self.param_dtype, "mlp_norm")(x)
    y = SwiGLU(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    return constrain(x + nn.Dropout(rate=self.dropout)(y, deterministic)), None


class Model(nn.Module):
  """Decoder-only LM: int tokens `[batch, length]` -> float32 logits `[batch, length, vocab]`.

  Attributes:
    vocab_size: number of token ids.
    variant: size name for `decode_variant` ("tiny", "S", "M", "1B"); explicit fields below
      override it (`width`, `depth`, `num_heads` are needed without a variant).
    width, depth, mlp_dim (default 8/3·width rounded up to 128), num_heads, num_kv_heads
      (GQA; default num_heads), head_dim (default width // num_heads).
    rope_base: RoPE base (e.g. 10_000; 500_000 or more for long contexts).
    qk_norm: RMS-normalise queries and keys per head.
    tie_embeddings: the output projection is the transposed input embedding.
    attention, attention_args, attention_impl: the op by registry name, its arguments and
      `implementation` (sequence parallelism and decoding need "softmax").
    dropout: residual dropout rate in training.
    mesh, seq_axis, seq_strategy: sequence parallelism over the mesh axis `seq_axis` with
      strategy "striped", "ring" or "all_gather" (None: off); active when that axis has size > 1.
    decode, cache_len: decoding with a key/value cache of `cache_len` tokens (see `generate`).
    remat_policy: "none" or a `jax.checkpoint_policies` name applied to every block.
    scan_layers: stack the blocks with `nn.scan` (parameters get a leading `layers` axis).
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names vocab, embed, mlp, heads, kv_heads, head_dim, norm
  and layers.
  """
  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_base: float = 10_000.
  qk_norm: bool = False
  tie_embeddings: bool = True
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  mesh: Any = None
  seq_axis: str = "seq"
  seq_strategy: str | None = None
  decode: bool = False
  cache_len: int = 0
  remat_policy: str = "none"
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def sizes(self) -> dict[str, int]:
    """The resolved width, depth, mlp_dim, num_heads, num_kv_heads and head_dim."""
    sizes = dict(mlp_dim=None, num_kv_heads=None)
    if self.variant is not None:
      sizes.update(decode_variant(self.variant))
    explicit = dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
    sizes.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ("width", "depth", "num_heads") if sizes.get(k) is None]
    if missing:
      raise ValueError(f"LM Model needs a variant or explicit {', '.join(missing)}")
    if sizes["mlp_dim"] is None:
      sizes["mlp_dim"] = -(-8 * sizes["width"] // 3 // 128) * 128
    sizes["num_kv_heads"] = sizes["num_kv_heads"] or sizes["num_heads"]
    if sizes["num_heads"] % sizes["num_kv_heads"]:
      raise ValueError(f"num_heads ({sizes['num_heads']}) must be divisible by num_kv_heads "
                       f"({sizes['num_kv_heads']})")
    head_dim = self.head_dim or sizes["width"] // sizes["num_heads"]
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    sizes["head_dim"] = head_dim
    return sizes

  def seq_parallel(self) -> SeqParallel | None:
    """The sequence-parallel layout, or None when off (no strategy, no mesh or one shard)."""
    if self.seq_strategy is None:
      return None
    if self.seq_strategy not in STRATEGIES:
      raise ValueError(f"seq_strategy must be None or one of {STRATEGIES}, got "
                       f"{self.seq_strategy!r}")
    if self.mesh is None or self.seq_axis not in self.mesh.axis_names:
      return None
    sp = SeqParallel(self.mesh, self.seq_axis, self.seq_strategy)
    return sp if sp.num_shards > 1 and not self.decode else None

  def _check(self, tokens, sp):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers [batch, length], got {tokens.dtype} "
                       f"{tokens.shape}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of "
                       f"{REMAT_POLICIES}")
    if (sp is not None or self.decode) and self.attention != "softmax":
      raise ValueError(f"sequence parallelism and decoding compute softmax attention; got "
                       f"attention={self.attention!r}")
    if sp is not None and tokens.shape[1] % sp.num_shards:
      raise ValueError(f"sequence length {tokens.shape[1]} is not divisible by the "
                       f"{sp.num_shards} shards of mesh axis {sp.axis!r}")
    if self.decode and self.cache_len < 1:
      raise ValueError(f"decode=True needs cache_len >= 1, got {self.cache_len}")

  @nn.compact
  def __call__(self, tokens, *, positions=None, segment_ids=None, train: bool = False):
    """Logits of the next token at every position.

    Args:
      tokens: int `[batch, length]`.
      positions: int `[batch, length]` RoPE positions; default 0..length-1 (striped under the
        striped strategy). In decoding, the positions of the new tokens (required).
      segment_ids: int `[batch, length]`: tokens attend only within their segment (packing).
      train: dropout on.
    """
    sp = self.seq_parallel()
    self._check(tokens, sp)
    sizes = self.sizes()
    width = sizes["width"]
    if positions is None:
      if self.decode:
        raise ValueError("decoding needs the positions of the new tokens")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      if sp is not None and sp.strategy == "striped":
        positions = parallel.stripe(positions, sp.num_shards)

    embed = nn.Embed(self.vocab_size, width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=width ** -0.5), ("vocab", "embed")),
                     name="embedding")
    x = embed(tokens)
    if sp is not None:
      x = sp.constrain(x)
    block_args = dict(num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"],
                      head_dim=sizes["head_dim"], mlp_dim=sizes["mlp_dim"],
                      attention=self.attention,
                      attention_args=None if self.attention_args is None
                      else dict(self.attention_args),
                      attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                      rope_base=self.rope_base, dropout=self.dropout, seq_parallel=sp,
                      decode=self.decode, cache_len=self.cache_len, dtype=self.dtype,
                      param_dtype=self.param_dtype)
    block = DecoderBlock
    if self.remat_policy != "none" and not self.decode:
      block = nn.remat(block, prevent_cse=not self.scan_layers, static_argnums=(4,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    deterministic = not train
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=sizes["depth"],
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(name="layers", **block_args)(x, positions, segment_ids, deterministic)
    else:
      for i in range(sizes["depth"]):
        x, _ = block(name=f"layers_{i}", **block_args)(x, positions, segment_ids,
                                                       deterministic)
    x = _rms_norm(self.dtype, self.param_dtype, "final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="unembedding",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.normal(stddev=width ** -0.5),
                            ("embed", "vocab")))(x)
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------- training task
def stripe_batch(model: Model, batch: dict[str, Any]) -> dict[str, Any]:
  """The batch in the token order the model computes in: striped once under "striped"."""
  sp = model.seq_parallel()
  if sp is None or sp.strategy != "striped":
    return batch
  return {k: parallel.stripe(v, sp.num_shards) if k in BATCH_KEYS else v
          for k, v in batch.items()}


def token_losses(model: Model, params: Any, batch: dict[str, Any], *, train: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy (nats) and loss weights, both `[batch, length]` in model order."""
  batch = stripe_batch(model, batch)
  logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], train=train,
                       rngs=None if rng is None else {"dropout": rng})
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return losses, batch["weights"].astype(jnp.float32)


def loss_fn(model: Model, params: Any, batch: dict[str, Any], rng: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the weighted (non-padding) targets of the batch."""
  losses, weights = token_losses(model, params, batch, train=True, rng=rng)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _batch_spec(info: dict[str, Any], batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  shape = (batch_size, info["seq_len"])
  return {"inputs": (shape, jnp.int32), "targets": (shape, jnp.int32),
          "positions": (shape, jnp.int32), "segment_ids": (shape, jnp.int32),
          "weights": (shape, jnp.float32)}


TASK = step_lib.Task(batch_spec=_batch_spec,
                     example_input=lambda info: ((info["seq_len"],), jnp.int32),
                     loss=loss_fn)


# -------------------------------------------------------------------------------- generation
def _sample(logits, rng, temperature: float, top_k: int | None):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: Model, params: Any, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, rng: jax.Array | None = None,
             return_logits: bool = False):
  """Continues `prompt` (int `[batch, t]`, t >= 1) by `max_new_tokens` sampled tokens.

  The prompt fills a key/value cache of `t + max_new_tokens` entries in one pass (prefill);
  then one token at a time attends to the cache with the split-KV op `lean_decode`.
  `temperature=0` is greedy decoding; `top_k` keeps the k most likely tokens.

  Returns:
    int32 `[batch, t + max_new_tokens]` (prompt then continuation); with `return_logits`, also
    the float32 logits `[batch, max_new_tokens, vocab]` each new token was drawn from.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be integers [batch, t] with t >= 1, got {prompt.dtype} "
                     f"{prompt.shape}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ValueError(f"top_k must be in [1, {model.vocab_size}], got {top_k}")
  if rng is None:
    if temperature != 0.0:
      raise ValueError("sampling with temperature > 0 needs rng")
    rng = jax.random.key(0)
  b, t = prompt.shape
  decoder = model.clone(decode=True, cache_len=t + max_new_tokens, mesh=None)

  def run(params, prompt, rng):
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, variables = decoder.apply({"params": params}, prompt, positions=positions,
                                      mutable=["cache"])
    first = logits[:, -1]

    def step(carry, i):
      cache, logits, rng = carry
      rng, key = jax.random.split(rng)
      token = _sample(logits, key, temperature, top_k)
      new_logits, variables = decoder.apply(
          {"params": params, "cache": cache}, token[:, None],
          positions=jnp.full((b, 1), t + i, jnp.int32), mutable=["cache"])
      return (variables["cache"], new_logits[:, 0], rng), (token, logits)

    _, (tokens, all_logits) = jax.lax.scan(step, (variables["cache"], first, rng),
                                           jnp.arange(max_new_tokens))
    return jnp.concatenate([prompt.astype(jnp.int32), tokens.T], axis=1), all_logits.swapaxes(0, 1)

  tokens, logits = jax.jit(run)(params, prompt, rng)
  return (tokens, logits) if return_logits else tokens


def count_params(model: Model, seq_len: int = 8) -> int:
  """Parameters of `model`, from `jax.eval_shape` (nothing allocated)."""
  shapes = jax.eval_shape(lambda: model.clone(mesh=None).init(
      jax.random.key(0), np.zeros((1, seq_len), np.int32)))
  return step_lib.count_params(shapes["params"])
