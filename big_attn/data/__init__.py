"""Input pipelines (grain): the embedded digits and TFDS ArrayRecord sources.

`get_dataset(input_config, *, split, batch_size, seed, train, process_index=0,
process_count=1)` returns a `grain.IterDataset` of batches; `dataset_info(input_config)` the
number of classes, image shape and split sizes. See `big_attn.data.pipeline`.
"""
from big_attn.data.pipeline import dataset_info, get_dataset

__all__ = ["dataset_info", "get_dataset"]
