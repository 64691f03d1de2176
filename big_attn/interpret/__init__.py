"""Interpretability: attention maps of any `Attention`-based model, relevance and plots.

    maps = interpret.capture_attention(model, variables, images)      # {layer path: [b, h, q, kv]}
    roll = interpret.attention_rollout(interpret.self_attention_maps(maps))   # [b, n, n]

`capture` reads and steers attention without changing model code; `relevance` computes
rollout, flow, gradient-weighted rollout, AtMan, attention distances and high-norm tokens;
`analysis` head importance (Are Sixteen Heads Really Better than One?), AttentionViz's joint
query-key embedding, TokenTM, ConceptAttention saliency of a DiT and the cross-layer and
cross-step similarity of attention maps (DiTFastAttn, PAB, EchoAtt), Teaching Matters's
offset local heads and the spatial attention profiles and autoencoder summary of head patterns
of How Does Attention Work in Vision Transformers? A Visual Analytics Attempt;
`layer_removal` the entropy-guided choice of the attention layers to remove (MLP Can Be A Good
Transformer Learner);
`lrp` the relevance propagation of Transformer Interpretability Beyond Attention
Visualization (ViT);
`plots` draws them (and benchmark curves). `python -m big_attn.interpret` explains a test image
with the latest checkpoint of a `big_attn.main` run.
"""
from big_attn.interpret.analysis import (attention_pattern_autoencoder, attention_patterns,
                                         attention_similarity, concept_attention,
                                         dit_timestep_maps, embed_attention_patterns,
                                         head_importance, joint_query_key_embedding,
                                         normalize_queries_keys, offset_local_heads,
                                         query_key_vectors, spatial_attention_profile, tokentm,
                                         transformation_effects)
from big_attn.interpret.capture import (apply_with_hook, attention_gradients, block_outputs,
                                        capture_attention, hook_ops, mixing_matrix,
                                        suppression_hook)
from big_attn.interpret.layer_removal import (attention_entropy,
                                              entropy_guided_attention_free_layers,
                                              layer_attention_entropy)
from big_attn.interpret.lrp import lrp_relevance, transformer_attribution
from big_attn.interpret.relevance import (atman, attention_distance, attention_flow,
                                          attention_rollout, gradient_rollout, high_norm_tokens,
                                          max_flow, self_attention_maps, token_norms,
                                          token_relevance)

__all__ = ["apply_with_hook", "atman", "attention_distance", "attention_flow",
           "attention_gradients", "attention_pattern_autoencoder", "attention_patterns",
           "attention_rollout", "attention_similarity", "block_outputs", "capture_attention",
           "concept_attention", "dit_timestep_maps", "embed_attention_patterns",
           "gradient_rollout", "head_importance", "high_norm_tokens", "hook_ops",
           "joint_query_key_embedding", "lrp_relevance", "max_flow", "mixing_matrix",
           "normalize_queries_keys", "offset_local_heads", "query_key_vectors",
           "self_attention_maps", "spatial_attention_profile", "suppression_hook", "token_norms",
           "token_relevance", "tokentm", "transformation_effects", "transformer_attribution"]
