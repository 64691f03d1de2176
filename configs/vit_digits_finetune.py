r"""Fine-tunes a converted Hugging Face ViT on the embedded digits with another attention op.

    python -m big_attn.main --config=configs/vit_digits_finetune.py:path=/tmp/hf_vit \
        --workdir=/tmp/vit_digits_finetune

The checkpoint is read before step 0 (`config.init_from`; a workdir with checkpoints resumes
from them instead). Its softmax-trained weights start a ViT whose attention is `attention`
(sigmoid by default); the classifier head (another number of classes) and any op-specific
parameters are initialised fresh, and the log says which. Nothing can be downloaded here, so
this makes a checkpoint of the right shape (random weights; a real one is any
`ViTForImageClassification` of these sizes, saved with `save_pretrained`):

    import transformers
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=128, image_size=16, patch_size=4,
                                    num_channels=1, num_labels=1000)
    transformers.ViTForImageClassification(config).save_pretrained("/tmp/hf_vit")

The same file converted once to a big_attn checkpoint (`python -m big_attn.pretrained convert
--source=transformers --in=/tmp/hf_vit --out=/tmp/vit_converted`) is read with
`:path=/tmp/vit_converted,source=big_attn`.

Args (`--config=configs/vit_digits_finetune.py:path=DIR,attention=sigmoid,steps=500`):
  path: the transformers directory (or its weights file), or a big_attn checkpoint.
  source: "transformers", "timm" or "big_attn" (`config.init_from.source`).
  attention: registry name of the attention op the fine-tuned model uses.
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, path="", source="transformers", attention="sigmoid",
                             steps=500, runlocal=False)
  config = config_lib.digits_config(arg)
  config.lr = 5e-4
  config.init_from = dict(path=arg.path or None, source=arg.source, name=None, model_args={})

  config.model_name = "vit"
  # The converted model's structure (`model.json` of the convert CLI): Hugging Face's ViT reads
  # the class token, uses exact GELU and LayerNorm epsilon 1e-12.
  config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                      posemb="learn", pool_type="cls", norm_eps=1e-12, approximate_gelu=False,
                      attention=arg.attention, dropout=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
