"""How a registered op runs beyond one plain call: its decoding form and its sequence-parallel
form, answered from the registry's declarations for every layer and model.

Decoding forms (`decoding_form`), with the memory each keeps per token and layer:

- "kv_cache": ops with a `softmax_form` (softmax, ngpt): the transformed keys and values,
  `2·kv_heads·head_dim` numbers per token (`big_attn.layers.kv_cache.KVCache`).
- "state": ops with a recurrent state form (`recurrent.STATE_FORMS`): a state of constant size,
  nothing per token (`big_attn.layers.kv_cache.RecurrentCache`).
- "inputs": every other causal op: the layer's input features and the token's position,
  `features + 1` numbers per token (`big_attn.layers.kv_cache.InputCache`); each step evaluates
  the layer's projections, its op parameters and the causal op over the whole cache and keeps
  the new tokens' outputs, which the later (empty) cache entries cannot reach because the op is
  causal. So the op sees the cache length as its sequence length: decoding equals the full
  forward of `cache_len` tokens (sigmoid's b = −log n, combiner's ⌈√n⌉ blocks and Hyena's
  filters are those of `cache_len`; kernelized_rpe's `rpe_bias` is sized by it).
- None: ops without a causal form. Their output at a token depends on later tokens (a
  statistic over the whole sequence or image: agent tokens, channel covariance, pooled or
  reduced keys, routed regions, a latent bottleneck, a quadtree, windows over a 2-D grid), so
  appending a token would change every earlier output.

Sequence-parallel forms (`sequence_parallel_form`): "block" (ring, striped, all-gather over the
op's `block_form`: key blocks merged by a rule of `big_attn.parallel.merge`), "state" (recurrent
states passed between contiguous shards), "convolution" (`CONVOLUTION_FORMS`: gated long
convolutions whose inputs pass around the ring or are gathered, `big_attn.parallel.convolution`),
"heads" (ops with independent heads, `OpSpec.head_args`: an all-to-all trades the sequence split
for a split of the heads, each device runs the op on the whole sequence of its heads,
`big_attn.parallel.heads`), "cascade" (`CASCADE_FORMS`: heads one after the other, each a pass
of the ring, `big_attn.parallel.cascade`), None.
"""
from __future__ import annotations

from big_attn.ops import recurrent
from big_attn.ops import registry

DECODING_FORMS = ("kv_cache", "state", "inputs")
SEQUENCE_PARALLEL_FORMS = ("block", "state", "convolution", "heads", "cascade")
# Ops whose output is a token-wise gated recurrence of long convolutions over the sequence.
CONVOLUTION_FORMS = ("hyena",)
# Ops whose heads run one after the other, each adding the previous head's output token-wise.
CASCADE_FORMS = ("cascaded_group_attention",)


def decoding_form(name: str) -> str | None:
  """How op `name` decodes token by token: one of `DECODING_FORMS`, or None (no causal form)."""
  spec = registry.spec(name)
  if spec.softmax_form is not None:
    return "kv_cache"
  if name in recurrent.STATE_FORMS:
    return "state"
  return "inputs" if spec.causal else None


def sequence_parallel_form(name: str) -> str | None:
  """How op `name` runs with the sequence split over devices: one of
  `SEQUENCE_PARALLEL_FORMS`, or None."""
  if registry.spec(name).block_form is not None:
    return "block"
  if name in CONVOLUTION_FORMS:
    return "convolution"
  if name in CASCADE_FORMS:
    return "cascade"
  if name in recurrent.STATE_FORMS:
    return "state"
  return "heads" if registry.spec(name).head_args is not None else None


def check_form(name: str, mode: str) -> str:
  """The form of op `name` in `mode` ("decoding" or "sequence-parallel"); a `ValueError` naming
  the op, the reason and the ops that have such a form when it has none."""
  if mode == "decoding":
    form = decoding_form(name)
    if form is None:
      raise ValueError(
          f"attention op {name!r} has no decoding form: it has no causal form (its output at a "
          "token depends on later tokens), so every appended token would change the earlier "
          "outputs")
    return form
  if mode == "sequence-parallel":
    form = sequence_parallel_form(name)
    reason = registry.spec(name).block_refusal
    if form is None and reason is not None:
      raise ValueError(f"attention op {name!r} has no sequence-parallel form: {reason}")
    if form is None:
      blocks = ", ".join(n for n in registry.names() if registry.spec(n).block_form is not None)
      states = ", ".join(sorted(recurrent.STATE_FORMS))
      heads = ", ".join(n for n in registry.names() if registry.spec(n).head_args is not None)
      raise ValueError(
          f"attention op {name!r} has no sequence-parallel form: splitting the keys into "
          "blocks needs every weight to be a function of one query-key score, of the two "
          "tokens' global positions and of a row statistic that blocks merge (a sum, or a "
          "log-sum-exp), as in the ops registered "
          f"with a block_form ({blocks}), or the output to follow from a recurrent state "
          f"passed between shards (ops with a state form: {states}) or from convolutions "
          f"whose inputs pass between shards ({', '.join(CONVOLUTION_FORMS)}), or its heads to "
          f"be independent so that devices split the heads instead ({heads}); the weights of "
          f"{name!r} are none of these")
    return form
  raise ValueError(f"mode must be 'decoding' or 'sequence-parallel', got {mode!r}")
