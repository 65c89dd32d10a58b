"""The global normalizer Z before the step: read the step's micro-batches up front, then replay them.

Megatron-LM's `train_step` hands one data iterator to the schedule, which pulls the step's M
micro-batches one by one, interleaved with forward and backward passes. Z (docs/CONTRACTS.md section 1)
must be known before the first backward, so `GlobalBatchPrefetcher` wraps that iterator: at the
first pull of a step it reads all M micro-batches, computes the global batch's totals with one
DP x CP all-reduce (`megatron_tokweight.loss.global_batch_stats`), attaches them to every
micro-batch under `STATS_KEY`, and then hands the micro-batches out one at a time. The TP
broadcast of `get_batch` carries the totals to the other TP ranks with the rest of the batch.

It runs where the data is read: on rank 0 of every TP group (the DP x CP group of such a rank
holds only TP-rank-0 ranks, so the all-reduce never counts a token twice). Every CP rank reads the
same rows; each counts the tokens of its own CP slice (the slice the loss function sees) and only
CP rank 0 counts samples, as the loss module's rule is.

With the unfrozen long-context scorer (or rho1) the weights depend on the model: the prefetcher
then runs `scorer.reweight(model, micro_batches)` on the step's micro-batches before the totals
(`pull(model)` hands it the model). That forward is collective over the TP group, so every TP
rank runs a prefetcher over the same rows (`batch.TensorParallelRows` broadcasts them, see
`steps.TokweightSteps`) and computes the same totals over its own DP x CP group.

Megatron's rerun machinery (`RerunDataIterator.rewind`) replays below this wrapper: a re-run step
pulls the same M micro-batches again and recomputes the same totals.
"""
from collections import deque
from typing import Callable, Deque, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from megatron_tokweight.data.thd_batch import flatten_rows, slice_for_context_parallel
from megatron_tokweight.errors import DataFormatError
from megatron_tokweight.loss import GlobalBatchStats, global_batch_stats

# batch key of the step's totals: float64 [4 + 2 * (tasks + datasets)], see `encode_stats`
STATS_KEY = "global_batch_stats"
# what the totals are computed from, and what the CP slicing needs to find this rank's tokens
_STATS_INPUTS = ("loss_weights", "loss_mask", "num_samples", "task_ids", "dataset_id")
_SLICING_INPUTS = ("tokens", "cu_seqlens_padded")


def encode_stats(stats: GlobalBatchStats, num_microbatches: int) -> torch.Tensor:
    """float64 [num_microbatches, weight_sum, loss_tokens, num_samples, task tokens..., task
    weights..., dataset tokens..., dataset weights...] (integers below 2**53 are exact)."""
    values = [float(num_microbatches), stats.weight_sum, float(stats.loss_tokens), float(stats.num_samples)]
    values += [float(v) for v in stats.task_loss_tokens] + list(stats.task_weight_sum)
    values += [float(v) for v in stats.dataset_loss_tokens] + list(stats.dataset_weight_sum)
    return torch.tensor(values, dtype=torch.float64)


def decode_stats(encoded: torch.Tensor, num_tasks: int, num_datasets: int) -> Tuple[GlobalBatchStats, int]:
    """(`GlobalBatchStats`, num_microbatches) from `encode_stats`' tensor."""
    values = encoded.reshape(-1).tolist()
    expected = 4 + 2 * (num_tasks + num_datasets)
    if len(values) != expected:
        raise DataFormatError(
            f"{STATS_KEY} holds {len(values)} values, expected {expected} for {num_tasks} task and "
            f"{num_datasets} dataset names; the prefetcher and the loss must be configured with the same names"
        )
    tasks, datasets = values[4 : 4 + 2 * num_tasks], values[4 + 2 * num_tasks :]
    stats = GlobalBatchStats(
        weight_sum=values[1],
        loss_tokens=int(values[2]),
        num_samples=int(values[3]),
        task_loss_tokens=tuple(int(v) for v in tasks[:num_tasks]),
        task_weight_sum=tuple(tasks[num_tasks:]),
        dataset_loss_tokens=tuple(int(v) for v in datasets[:num_datasets]),
        dataset_weight_sum=tuple(datasets[num_datasets:]),
    )
    return stats, int(values[0])


class GlobalBatchPrefetcher:
    """Wraps a step's data iterator: reads M micro-batches, computes Z's totals, replays them.

    Args:
        data_iterator: yields collated PackedDataset row batches (dicts of [b, L] tensors).
        num_microbatches: M, or a callable returning the current M (batch-size ramp-up); read
            once per step, when the step's first micro-batch is pulled.
        dp_cp_group: the data-parallel x context-parallel group (None: a single rank).
        cp_size, cp_rank: this rank's context-parallel size and index.
        num_tasks, num_datasets: sizes of the per-task / per-dataset totals (0: none).
        device: where the all-reduce runs (the NCCL device on GPU); the batches stay where the
            loader put them.
        scorer: an object with `reweight(model, batches) -> batches` (`longcontext.OnlineScorer`)
            applied to the step's flattened micro-batches before the totals; None: weights come
            with the data.

    Yields the micro-batches flattened to THD streams (`batch.flatten_rows`) with the step's
    totals under `STATS_KEY`. An iterator that ends in the middle of a step raises
    DataFormatError: a partial global batch would change Z.
    """

    def __init__(
        self,
        data_iterator: Iterator,
        num_microbatches: Union[int, Callable[[], int]],
        dp_cp_group=None,
        *,
        cp_size: int = 1,
        cp_rank: int = 0,
        num_tasks: int = 0,
        num_datasets: int = 0,
        device: Optional[torch.device] = None,
        scorer=None,
    ):
        if data_iterator is None:
            raise ValueError("GlobalBatchPrefetcher needs a data iterator (it runs where the data is read)")
        self.data_iterator = data_iterator
        self._num_microbatches = num_microbatches
        self.dp_cp_group = dp_cp_group
        self.cp_size, self.cp_rank = cp_size, cp_rank
        self.num_tasks, self.num_datasets = num_tasks, num_datasets
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.scorer = scorer
        self._pending: Deque[Dict[str, torch.Tensor]] = deque()
        self.last_stats: Optional[GlobalBatchStats] = None
        self.steps = 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        return self.pull()

    def pull(self, model=None) -> Dict[str, torch.Tensor]:
        """The next micro-batch; `model` scores the step when a scorer is set (read at the
        step's first pull)."""
        if not self._pending:
            self._read_step(model)
        return self._pending.popleft()

    def num_microbatches(self) -> int:
        m = self._num_microbatches() if callable(self._num_microbatches) else self._num_microbatches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"num_microbatches must be an integer >= 1, got {m!r}")
        return m

    def _read_step(self, model=None) -> None:
        if self.scorer is not None and model is None:
            raise ValueError("the prefetcher's long-context scorer needs the model: call pull(model)")
        m = self.num_microbatches()
        batches = []
        for index in range(m):
            try:
                batch = next(self.data_iterator)
            except StopIteration:
                if index == 0:
                    raise
                raise DataFormatError(
                    f"the data iterator ended after {index} of the step's {m} micro-batches; "
                    "a partial global batch would change the normalizer (request whole global batches)"
                ) from None
            if not isinstance(batch, dict):
                raise DataFormatError(f"the data iterator yielded {type(batch).__name__}, expected a dict of tensors")
            batches.append(flatten_rows(batch))
        if self.scorer is not None:  # before the totals: the scored weights enter Z
            batches = self.scorer.reweight(model, batches)
        stats = self.compute_stats(batches)
        encoded = encode_stats(stats, m)
        for batch in batches:
            batch[STATS_KEY] = encoded.clone()
        self._pending.extend(batches)
        self.last_stats = stats
        self.steps += 1

    def compute_stats(self, flat_batches: Sequence[Dict[str, torch.Tensor]]) -> GlobalBatchStats:
        """The global batch's totals from this rank's flattened micro-batches (one all-reduce)."""
        views = []
        for batch in flat_batches:
            view = {key: batch[key] for key in _STATS_INPUTS + _SLICING_INPUTS if key in batch}
            view = slice_for_context_parallel(view, self.cp_size, self.cp_rank, use_te=False)
            # only the few inputs go to the all-reduce's device
            views.append({key: view[key].to(self.device) for key in _STATS_INPUTS if key in view})
        return global_batch_stats(
            views, self.dp_cp_group, cp_rank=self.cp_rank, num_tasks=self.num_tasks, num_datasets=self.num_datasets
        )
