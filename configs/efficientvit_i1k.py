r"""EfficientViT on ImageNet-2012 (the paper's recipe: 300 epochs of AdamW at batch 2048, lr
1e-3 x batch / 1024, weight decay 0.025, 5 warm-up epochs, cosine decay, mixup 0.8).

    python -m big_attn.main --config=configs/efficientvit_i1k.py:variant=M4 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

RandAugment, random erasing, CutMix and the distillation of the paper's recipe are not part of
this one.

Args: variant (M0 ... M5; default M4), attention (registry op name; the paper's
`cascaded_group_attention`), epochs, runlocal (a narrow EfficientViT, few steps, small batch:
for a laptop check of the pipeline).
"""
from big_attn.models import efficientvit
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="M4", attention="cascaded_group_attention",
                             epochs=300, runlocal=False)
  efficientvit.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown one
  config = config_lib.imagenet_config(arg, batch_size=2048, weight_decay=0.025,
                                     warmup_epochs=5)
  config.lr = 1e-3 * config.input.batch_size / 1024

  config.model_name = "efficientvit"
  config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                      dtype="bfloat16")
  if arg.runlocal:
    config.model.update(widths=(16, 32, 48), num_heads=(2, 2, 2), depths=(1, 1, 1))
  return config_lib.declare_model_settings(config)
