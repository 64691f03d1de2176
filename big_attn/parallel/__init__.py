"""Sequence parallelism: attention over a sequence split across the devices of a mesh axis.

    from big_attn import parallel
    out = parallel.sequence_parallel_attention(q, k, v, mesh=mesh, strategy="striped")

`ring_attention` and `striped_attention` are per-shard functions for use inside `jax.shard_map`;
`shard_attention` switches between them and `all_gather_attention`; `SeqParallel` holds where
the sequence is split and the one layout rule for the other dimensions (`sequence.py`);
`sequence_parallel_attention` wraps it all for global arrays. Ops of the softmax family other
than softmax (sigmoid, cog, gated, clipped, soft-capped) run through the same schedules with
their own block-merge rule and custom VJP (`merge.py`, `Rule`), as do ops whose block terms
depend on the global positions of the queries and keys (`ops.PairTerms`: urpe, mask_reweighted,
neighborhood, kernelized_rpe), whose scores are a function of each query-key pair
(`ops.PairScores`: gatv2, neural_attention) or whose blocks carry sums of score moments (rule
"moments": normalized). Hyena's gated long convolutions pass their inputs around the ring or
gather them (`convolution.py`, `SeqParallel.convolution`); the causal linear ops pass their
recurrent state (`linear_state.py`, `SeqParallel.linear_state`); causal ops with independent
heads that need the whole row (skim_attention, sparsifiner, sparse_blocks, sparge_attention,
combiner, sage_int8, sdm, super_attention, variational_attention without rng, and the grid ops
gpsa, levit_bias, decomposed_relpos) split their heads between two all-to-alls instead
(`heads.py`, `SeqParallel.heads`); cascaded group attention runs its heads in turn, each over
the ring (`cascade.py`, `SeqParallel.cascade`).
"""
from __future__ import annotations

from big_attn.parallel.blockwise import BlockImpl, block_plan
from big_attn.parallel.heads import head_parallel_attention
from big_attn.parallel.merge import Rule, make_rule
from big_attn.parallel.ring import ring_attention
from big_attn.parallel.sequence import (BATCH_AXES, HEAD_AXIS, STRATEGIES, SeqParallel,
                                        all_gather_attention, sequence_parallel_attention,
                                        shard_attention)
from big_attn.parallel.striped import stripe, striped_attention, unstripe

__all__ = ["BATCH_AXES", "BlockImpl", "HEAD_AXIS", "Rule", "STRATEGIES", "SeqParallel",
           "all_gather_attention", "block_plan", "head_parallel_attention", "make_rule",
           "ring_attention", "sequence_parallel_attention", "shard_attention", "stripe",
           "striped_attention", "unstripe"]
