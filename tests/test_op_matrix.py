"""experiments/op_matrix.py: the op x model matrix holds against its recorded expectation.

The full matrix (every op in every model, forward and gradient) takes minutes; here every
recorded refusal is checked (a refusal raises before tracing, so all of them are cheap) and a
sample of working cells runs (forward and gradient), each exercising the model's context for
2-D ops (grid, extra tokens, clipped sizes) or the LM's causal packed rows.
"""
import json
import os

import pytest

from big_attn import ops
from tests import experiments

op_matrix = experiments.load("op_matrix")

with open(os.path.join(op_matrix.RESULTS, "op_matrix.json"), encoding="utf-8") as _f:
  EXPECTED = json.load(_f)

# Extra tokens around a 2-D op with its own parameters; a causal op on packed rows.
SAMPLE = (("deit", "levit_bias"), ("lm", "retention"))


def test_expectation_covers_every_op_in_every_model():
  assert sorted(EXPECTED) == sorted(op_matrix.MODELS)
  for model_name, row in EXPECTED.items():
    assert sorted(row) == ops.names(), (
        f"{model_name}: regenerate with `python experiments/op_matrix.py`")
    assert all(status in ("ok", "refused", "fail") for status, _ in row.values())


def test_recorded_refusals_are_refused_up_front():
  refused = [(m, op) for m, row in EXPECTED.items() for op, (status, _) in row.items()
             if status == "refused"]
  assert refused
  for model_name, op in refused:
    status, reason = op_matrix.run_cell(model_name, op)
    assert status == "refused", (model_name, op, status, reason)
    assert repr(op) in reason, reason


@pytest.mark.parametrize("model_name,op", SAMPLE)
def test_sampled_cells_work(model_name, op):
  assert EXPECTED[model_name][op][0] == "ok"
  assert op_matrix.run_cell(model_name, op, jit=True) == ("ok", "")


def test_readme_forms_table_is_the_registry_s():
  """The README's table of sequence-parallel, decoding and kernel forms is the one the script
  derives from the registry (regenerate with `python experiments/op_matrix.py --forms-only`)."""
  with open(op_matrix.README, encoding="utf-8") as f:
    text = f.read()
  start, end = (text.index(m) for m in op_matrix.FORM_MARKERS)
  assert text[start + len(op_matrix.FORM_MARKERS[0]):end].strip() == op_matrix.forms_table()
