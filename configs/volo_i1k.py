r"""VOLO on ImageNet-2012: 300 epochs of AdamW at batch 1024 with lr 1.6e-3 (the authors'
VOLO-D1 command), weight decay 0.05, 5 warm-up epochs, cosine decay, mixup 0.8.

    python -m big_attn.main --config=configs/volo_i1k.py:variant=D1 --workdir=DIR \
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Token labelling's dense targets, stochastic depth, RandAugment, random erasing and CutMix of
the paper are not part of this recipe; the model keeps the token-labelling head (its logits
join the class token's).

Args: variant (D1 ... D5; default D1), attention (the transformer blocks' registry op),
local_attention (the Outlookers' op), epochs, runlocal (a narrow VOLO, few steps, small batch:
for a laptop check of the pipeline).
"""
from big_attn.models import volo
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="D1", attention="softmax",
                             local_attention="outlook_attention", epochs=300, runlocal=False)
  volo.decode_variant(arg.variant)  # a ValueError naming the sizes for an unknown variant
  config = config_lib.imagenet_config(arg, batch_size=1024, weight_decay=0.05,
                                     warmup_epochs=5)
  config.lr = 1.6e-3 * config.input.batch_size / 1024

  config.model_name = "volo"
  config.model = dict(num_classes=1000, variant=arg.variant, attention=arg.attention,
                      local_attention=arg.local_attention, dtype="bfloat16")
  if arg.runlocal:
    config.model.update(depths=(1, 1), widths=(32, 64), num_heads=(2, 4), stem_dim=16)
  return config_lib.declare_model_settings(config)
