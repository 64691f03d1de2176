"""TensorBoard itself reads the events of `big_attn.train.tensorboard` (the `[tensorboard]` extra)."""
import pytest

from big_attn.train import tensorboard

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_reads_scalars_and_drops_steps_replayed_after_a_restart(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.scalars(1, {"train/loss": 2.5, "eval/accuracy": 0.125})
  writer.scalars(2, {"train/loss": 1.5})
  writer.scalars(3, {"train/loss": 1.0})
  writer.session_start(2)  # resumed from the checkpoint of step 1: steps 2.. run again
  writer.scalars(2, {"train/loss": 1.25})
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path), purge_orphaned_data=True)
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["eval/accuracy", "train/loss"]
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]
  assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(1, 0.125)]
