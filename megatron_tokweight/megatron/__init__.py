"""Megatron-LM integration: the hooks `pretrain(...)` takes, for packed, token-weighted training.

- `arguments`: `extra_args_provider(parser)` (weighting, long-context and packing flags).
- `datasets_provider`: `train_valid_test_datasets_provider` (PackedDataset through Megatron-Core's
  `BlendedMegatronDatasetBuilder`), `packed_dataset_config_from_args`.
- `batch`: `get_batch` (TP broadcast of every key, THD flattening, load-balanced CP slicing,
  `PackedSeqParams(qkv_format="thd")`).
- `prefetch`: `GlobalBatchPrefetcher` (the step's micro-batches read up front, optionally scored
  by the unfrozen long-context scorer, Z computed with one DP x CP all-reduce, then replayed).
- `steps`: `TokweightSteps` (explicit groups) and the Megatron-LM hooks `forward_step` / `loss_func`.

Only `steps_from_megatron_args`, `forward_step` and `train_valid_test_datasets_provider` read
Megatron-LM's global arguments and parallel state; everything else takes its groups as arguments.
Nothing here imports Megatron-LM (`megatron.training`) until a hook is called.
"""
from megatron_tokweight.common.lazy_exports import lazy_exports

_EXPORTS = {
    "extra_args_provider": "megatron_tokweight.megatron.arguments",
    "add_packing_args": "megatron_tokweight.megatron.arguments",
    "train_valid_test_datasets_provider": "megatron_tokweight.megatron.datasets_provider",
    "packed_dataset_config_from_args": "megatron_tokweight.megatron.datasets_provider",
    "build_packed_datasets": "megatron_tokweight.data.packed_dataset",
    "get_batch": "megatron_tokweight.megatron.batch",
    "broadcast_batch": "megatron_tokweight.megatron.batch",
    "thd_partition_indices": "megatron_tokweight.data.thd_batch",
    "GlobalBatchPrefetcher": "megatron_tokweight.megatron.prefetch",
    "TokweightSteps": "megatron_tokweight.megatron.steps",
    "forward_step": "megatron_tokweight.megatron.steps",
    "loss_func": "megatron_tokweight.megatron.steps",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
