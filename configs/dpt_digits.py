r"""DPT on the digits: per-pixel classes (background, or the digit's class at its ink pixels).

    python -m big_attn.main --config=configs/dpt_digits.py --workdir=/tmp/dpt_digits

A 4-block ViT (width 64, 8x8 patches of the 32x32 digits: a 4x4 token grid) whose 4 blocks'
outputs are reassembled into maps of 16x16, 8x8, 4x4 and 2x2 and fused into per-pixel logits
over 11 classes (Vision Transformers for Dense Prediction; `big_attn.models.dpt`). The loss and
the evaluator derive each pixel's class from the image and its label (`dpt.pixel_targets`).

Args (`--config=configs/dpt_digits.py:readout=add,steps=500`):
  readout: "project" (default), "add" or "ignore": how the class token is read out.
  attention: registry name of the ViT's attention op.
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
Measured numbers are in experiments/results/dpt_digits.md.
"""
from big_attn.models import dpt
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, readout="project", attention="softmax", steps=1000,
                             runlocal=False)
  if arg.readout not in dpt.READOUTS:
    raise ValueError(f"config arg readout must be one of {dpt.READOUTS}, got {arg.readout!r}")
  config = config_lib.digits_config(arg, image_size=32)
  config.model_name = "dpt"
  config.model = dict(
      backbone=dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(8, 8),
                    attention=arg.attention),
      hooks=(0, 1, 2, 3), reassemble_features=(16, 32, 64, 64), features=32,
      readout=arg.readout, head="segmentation", head_dropout=0.1, dtype="float32")
  config.evals.eval = dict(type="segmentation", every=config.total_steps // 3 or 1,
                           split="test", batch_size=128)
  return config_lib.declare_model_settings(config)
