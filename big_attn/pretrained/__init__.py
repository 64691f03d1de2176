"""Converters from timm / Hugging Face transformers checkpoints to big_attn models, and the
loading of converted weights into a run (`config.init_from`).

torch and the framework are imported only when a converter is called.
"""
from big_attn.pretrained._common import ConversionError
from big_attn.pretrained.loading import init_state, load_weights, read_checkpoint, save_npz
from big_attn.pretrained.timm import from_timm
from big_attn.pretrained.transformers import from_transformers, to_transformers

__all__ = ["ConversionError", "from_timm", "from_transformers", "init_state", "load_weights",
           "read_checkpoint", "save_npz", "to_transformers"]
