r"""T2T-ViT on ImageNet-2012 (the paper's recipe, DeiT's: 300 epochs, AdamW, lr 5e-4 x batch /
512, weight decay 0.05, 5 warm-up epochs, mixup 0.8).

    python -m big_attn.main --config=configs/t2t_i1k.py:variant=14 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing and CutMix of the paper are not part of this recipe.

Args: variant (14, 19, 24; default 14), token_attention (the T2T layers' op: "performer", the
paper's T2T-ViT, by default; "softmax", its T2T-ViTt), attention (the encoder's op), epochs,
runlocal (T2T-ViT-14, few steps, small batch: for a laptop check of the pipeline).
"""
from big_attn.models import t2t
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="14", token_attention="performer",
                             attention="softmax", epochs=300, runlocal=False)
  t2t.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 5e-4 * config.input.batch_size / 512

  config.model_name = "t2t"
  config.model = dict(num_classes=1000, variant="14" if arg.runlocal else arg.variant,
                      token_attention=arg.token_attention, attention=arg.attention,
                      dropout=0.0, dtype="bfloat16")

  return config_lib.declare_model_settings(config)
