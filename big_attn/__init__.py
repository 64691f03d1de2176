"""big_attn: the attention mechanisms of the research literature, at scale, in JAX/Flax."""
__version__ = "0.1.0"
