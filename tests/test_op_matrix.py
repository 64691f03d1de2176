"""experiments/op_matrix.py: the op x model x path matrix holds against its recorded expectation.

The full matrix (every op in every model and path, forward and gradient) takes hours on two
cores; here every recorded refusal of every path is checked (a refusal raises while the model
is initialised, so tracing the initialisation is enough and all of them are cheap) and a sample
of working cells runs: the model's context for 2-D ops (grid, extra tokens, clipped sizes), the
LM's causal packed rows, and one cell of each path (sequence parallel, decoding, kernel).
"""
import json
import os

import pytest

from big_attn import ops
from tests import experiments

op_matrix = experiments.load("op_matrix")

with open(os.path.join(op_matrix.RESULTS, "op_matrix.json"), encoding="utf-8") as _f:
  EXPECTED = json.load(_f)

# Extra tokens around a 2-D op with its own parameters; a 2-D op on T2T-ViT's token grids (soft
# splits, then the encoder); a causal op on packed rows; an op with a softmax form split over 8
# devices; decoding over the KV cache; the signed flash kernel; the softmax kernel on a 2-D op's
# reduced keys in the ViT (extended).
SAMPLE = (("deit", "levit_bias", "single"), ("t2t", "window", "single"),
          ("lm", "retention", "single"),
          ("lm", "ngpt", "seq_parallel"), ("lm", "softmax", "decode"),
          ("lm", "cog", "kernel"),
          pytest.param("vit", "spatial_reduction", "kernel", marks=pytest.mark.extended))


def test_expectation_covers_every_op_in_every_model():
  """Every op in every model on one device; the other paths hold the cells run so far (a full
  run, `python experiments/op_matrix.py`, fills them)."""
  assert {k for k in EXPECTED if "/" not in k} == set(op_matrix.MODELS)
  for key, row in EXPECTED.items():
    model_name, column = op_matrix.split_key(key)
    assert model_name in op_matrix.COLUMN_MODELS[column], key
    if column == "single":
      assert sorted(row) == ops.names(), (
          f"{key}: regenerate with `python experiments/op_matrix.py`")
    assert set(row) <= set(ops.names()), key
    assert all(status in ("ok", "refused", "fail") for status, _ in row.values())


def test_recorded_refusals_are_refused_up_front():
  """Every refusal on one device (the model's up-front check of the op), and the first two (by
  op name) of each other path, whose refusals come from one registry check each
  (`ops.check_form`, the kernel's argument check) and cost a traced initialisation apiece."""
  refused = [(key, op) for key, row in EXPECTED.items() for op, (status, _) in sorted(row.items())
             if status == "refused"]
  assert {op_matrix.split_key(key)[1] for key, _ in refused} >= {"single", "kernel"}
  checked = {}
  for key, op in refused:
    model_name, column = op_matrix.split_key(key)
    if column != "single" and checked.setdefault(key, 0) >= 2:
      continue
    checked[key] = checked.get(key, 0) + 1
    status, reason = op_matrix.run_cell(model_name, op, trace_only=True, column=column)
    assert status == "refused", (key, op, status, reason)
    assert repr(op) in reason, reason


@pytest.mark.parametrize("model_name,op,column", SAMPLE)
def test_sampled_cells_work(model_name, op, column):
  assert EXPECTED[op_matrix.row_key(model_name, column)][op][0] == "ok"
  assert op_matrix.run_cell(model_name, op, jit=True, column=column) == ("ok", "")


def test_readme_forms_table_is_the_registry_s():
  """The README's table of sequence-parallel, decoding and kernel forms is the one the script
  derives from the registry (regenerate with `python experiments/op_matrix.py --forms-only`)."""
  with open(op_matrix.README, encoding="utf-8") as f:
    text = f.read()
  start, end = (text.index(m) for m in op_matrix.FORM_MARKERS)
  assert text[start + len(op_matrix.FORM_MARKERS[0]):end].strip() == op_matrix.forms_table()
