r"""A small ViT on scikit-learn's handwritten digits: the embedded default, minutes on a laptop.

    python -m big_attn.main --config=configs/vit_digits.py --workdir=/tmp/vit_digits

    python -m big_attn.main --config=configs/vit_digits.py:family=convit --workdir=/tmp/convit

    python -m big_attn.main --config=configs/vit_digits.py:projections=super --workdir=/tmp/super

Args (`--config=configs/vit_digits.py:attention=sigmoid,steps=500`):
  attention: registry name of the attention op (`big_attn.ops.names()`).
  family: "" (plain ViT), "convit" (the first 2 of the 4 blocks GPSA, the class token after
    them; ConViT) or "cpvt" (a PEG after the first block, no absolute position embedding;
    CPVT's GAP variant) or "channelvit" (a token per channel and patch, a class token;
    ChannelViT). The digits are grey: for "channelvit" the input stacks each image with its
    horizontal and vertical gradients (`config.input.channels="derived"`), so that the three
    channel tokens of a patch see different things.
  head_dim: "" (width / num_heads = 16), a number, or "tokens": the head size set to the
    number of tokens, 16 (Low-Rank Bottleneck in Multi-head Attention Models).
  parallel_block: attention and MLP in parallel from one LayerNorm (PAF).
  loops: T > 0 runs one weight-tied block T times with input injection instead of 4 blocks
    (Looped Transformers as Programmable Computers); 0: none.
  projections: "" (W_Q, W_K, W_V, W_O), "optimised", "efficient" or "super" (You Need to Pay
    Better Attention: no W_V; no W_K, W_V; "efficient" with the op `super_attention`).
  steps: training steps.
`--config.model.token_pooling_scales=3 --config.loss.attention_diversification=1.0` trains with
the token-aware average pooling and the attention diversification loss of Robustifying Token
Attention for Vision Transformers.
  runlocal: a few steps only, for smoke tests.
Measured numbers are in experiments/results/vit_digits.md.
"""
from big_attn.train import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attention="softmax", steps=1500, runlocal=False, family="",
                             head_dim="", parallel_block=False, loops=0, projections="")
  config = config_lib.digits_config(arg)

  config.model_name = "vit"
  config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                      posemb="learn", pool_type="gap", attention=arg.attention, dropout=0.0,
                      token_pooling_scales=None, dtype="float32")
  if arg.parallel_block:
    config.model.parallel_block = True
  if arg.loops:
    config.model.update(depth=1, loops=arg.loops, loop_injection=True)
  if arg.head_dim:
    if arg.head_dim != "tokens" and not arg.head_dim.isdigit():
      raise ValueError(f"config arg head_dim must be a positive number or 'tokens', got "
                       f"{arg.head_dim!r}")
    config.model.head_dim = arg.head_dim if arg.head_dim == "tokens" else int(arg.head_dim)
  if arg.projections:
    if arg.projections not in ("optimised", "efficient", "super"):
      raise ValueError(f"config arg projections must be '', 'optimised', 'efficient' or "
                       f"'super', got {arg.projections!r}")
    config.model.projections = "efficient" if arg.projections == "super" else arg.projections
    if arg.projections == "super":
      config.model.attention = "super_attention"
  if arg.family == "convit":
    config.model.update(local_layers=2, pool_type="cls")
  elif arg.family == "cpvt":
    config.model.update(posemb="peg")
  elif arg.family == "channelvit":
    config.model.update(channel_tokens=True, pool_type="cls")
    config.input.channels = "derived"
  elif arg.family:
    raise ValueError(f"unknown family {arg.family!r}; expected '', 'convit', 'cpvt' or "
                     "'channelvit'")
  return config_lib.declare_model_settings(config)
