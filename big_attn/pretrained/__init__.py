"""Converters from timm / Hugging Face transformers checkpoints to big_attn models."""
from big_attn.pretrained._common import ConversionError
