r"""A small DeiT on scikit-learn's handwritten digits, distilled from a ConvNeXt teacher.

First train the convnet teacher, then the student with hard-label distillation from it:

    python -m big_attn.main --config=configs/convnext_digits.py --workdir=/tmp/convnext_digits
    python -m big_attn.main --config=configs/deit_digits.py:teacher_workdir=/tmp/convnext_digits \
        --workdir=/tmp/deit_digits

The teacher is the model of configs/convnext_digits.py restored from the newest checkpoint of
`teacher_workdir`. Without `teacher_workdir` the distillation head is trained on the labels (the
run logs a warning saying so).

Args (`--config=configs/deit_digits.py:teacher_workdir=DIR,steps=500`):
  teacher_workdir: work directory of a finished configs/convnext_digits.py run ("" = no teacher).
  attention: registry name of the attention op (`big_attn.ops.names()`).
  steps: training steps.
  runlocal: a few steps only, for smoke tests.
"""
import importlib.util
import os

from big_attn.train import config_lib


def teacher_model() -> dict:
  """The teacher's `config.model`: configs/convnext_digits.py's MODEL."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convnext_digits.py")
  spec = importlib.util.spec_from_file_location("convnext_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.MODEL)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, teacher_workdir="", attention="softmax", steps=1500,
                             runlocal=False)
  config = config_lib.digits_config(arg)

  config.model_name = "deit"
  teacher = None
  if arg.teacher_workdir:
    teacher = dict(model_name="convnext", model=teacher_model(), workdir=arg.teacher_workdir)
  config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                      distilled=True, teacher=teacher, posemb="learn", attention=arg.attention,
                      dropout=0.0, dtype="float32")
  return config_lib.declare_model_settings(config)
