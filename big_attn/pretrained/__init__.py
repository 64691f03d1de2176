"""Converters from timm / Hugging Face transformers checkpoints to big_attn models."""
from big_attn.pretrained._common import ConversionError
from big_attn.pretrained.transformers import from_transformers, to_transformers
from big_attn.pretrained.loading import init_state, load_weights, read_checkpoint, save_npz
