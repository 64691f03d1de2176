"""Input pipelines (grain): the embedded digits, TFDS ArrayRecord sources, and byte-level text.

`get_dataset(input_config, *, split, batch_size, seed, train, rows=None, start_batch=0)`
returns a `grain.IterDataset` of this process's rows of global batches (`data.batching`); `dataset_info(input_config)` the
number of classes, image shape and split sizes (images, `big_attn.data.pipeline`) or the
vocabulary size and sequence length (`name="bytes"`, `big_attn.data.text`).
"""
from big_attn.data import pipeline, text


def dataset_info(input_config):
  if text.is_text(input_config):
    return text.dataset_info(input_config)
  return pipeline.dataset_info(input_config)


def get_dataset(input_config, **kwargs):
  if text.is_text(input_config):
    return text.get_dataset(input_config, **kwargs)
  return pipeline.get_dataset(input_config, **kwargs)


__all__ = ["dataset_info", "get_dataset", "text"]
