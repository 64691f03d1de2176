r"""A tiny hierarchical local-global ViT (big_attn/models/hvit.py) on the embedded digits.

    python -m big_attn.main --config=configs/hvit_digits.py:family=davit --workdir=/tmp/hvit

Args (`--config=configs/hvit_digits.py:family=rmt,steps=500`):
  family: davit, twins_svt, dinat, biformer or rmt (each with its own ops and layers).
  local_attention, global_attention: registry names replacing the family's ops ("" keeps
    them; `local_op`, `global_op` are their deprecated names).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
16x16 images, stem stride 2, so the four stages see 8x8, 4x4, 2x2 and 1x1 maps; windows,
neighbourhoods and regions are shrunk to fit (window 2, kernel 3, 2x2 regions).
"""
from big_attn.models import hvit
from big_attn.train import config_lib

# Per-family settings sized for 8x8 .. 1x1 maps.
FAMILY_ARGS = {
    "davit": dict(window_size=2),
    "twins_svt": dict(window_size=2, sr_ratios=(2, 2, 1, 1)),
    "dinat": dict(kernel_size=3),
    "biformer": dict(num_regions=2, topks=(1, 2, 2, -1)),
    "rmt": dict(decays=((2, 4),) * 4, decomposed=(True, True, False, False)),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, family="davit", local_attention="", global_attention="",
                             steps=1000, runlocal=False, renamed=hvit.RENAMED)
  if arg.family not in hvit.FAMILIES:
    raise ValueError(f"config arg family must be one of {hvit.FAMILIES}, got {arg.family!r}")
  config = config_lib.digits_config(arg)

  config.model_name = "hvit"
  config.model = dict(family=arg.family, embed_dims=(16, 32, 48, 64), depths=(2, 2, 2, 2),
                      num_heads=(2, 2, 4, 4), mlp_ratios=2, patch_size=2, drop_path=0.0,
                      local_attention=arg.local_attention or None,
                      global_attention=arg.global_attention or None, dtype="float32",
                      **FAMILY_ARGS[arg.family])
  return config_lib.declare_model_settings(config)
