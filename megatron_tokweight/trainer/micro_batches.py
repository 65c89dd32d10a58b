"""The run's process groups and its micro-batches in a fixed order.

`make_groups` builds TP groups of consecutive ranks and DP groups across them (Megatron's order).
`RowReader` reads micro-batches of packed rows: step s, micro-batch m, DP rank d read rows
s*G + m*(mbs*DP) + d*mbs ... + mbs (G = mbs * M * DP rows per step), so a resumed run reads
exactly the rows an uninterrupted one would; TP rank 0 reads, `megatron.batch.get_batch`
flattens to THD and broadcasts over the TP group.
"""
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Groups:
    tp: Any
    dp: Any
    tp_rank: int
    dp_rank: int


def make_groups(rank: int, tp_size: int, dp_size: int) -> Groups:
    """TP groups of consecutive ranks (Megatron's order), DP groups across them. Collective."""
    import torch.distributed as dist

    tp_groups = [dist.new_group(list(range(d * tp_size, (d + 1) * tp_size))) for d in range(dp_size)]
    dp_groups = [dist.new_group(list(range(t, tp_size * dp_size, tp_size))) for t in range(tp_size)]
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    return Groups(tp_groups[dp_rank], dp_groups[tp_rank], tp_rank, dp_rank)


def _collate(items):
    # default_collate also turns a blend's numpy `dataset_id` into a tensor
    from torch.utils.data import default_collate

    return default_collate(items)


def _global_task_ids(rows, tables) -> None:
    """Per-prefix task ids -> the run's task ids (a blend's prefixes number their tasks apart)."""
    import torch

    if len(tables) == 1:
        if tables[0] != list(range(len(tables[0]))):
            lookup = torch.tensor(tables[0] + [-1])
            rows["task_ids"] = lookup[rows["task_ids"]]
        return
    lookup = [torch.tensor(table + [-1]) for table in tables]
    task_ids = rows["task_ids"].clone()
    for row, dataset in enumerate(rows["dataset_id"].tolist()):
        task_ids[row] = lookup[dataset][rows["task_ids"][row]]
    rows["task_ids"] = task_ids


class RowReader:
    """Micro-batches of a dataset in the run's fixed order (TP rank 0 reads, the TP group gets them)."""

    def __init__(self, dataset, groups: Groups, micro_batch_size: int, dp_size: int, tables=None):
        self.dataset, self.groups, self.mbs, self.dp_size = dataset, groups, micro_batch_size, dp_size
        self.tables = tables

    def rows(self, start: int):
        items = [self.dataset[i] for i in range(start, min(start + self.mbs, len(self.dataset)))]
        rows = _collate(items)
        if self.tables is not None:
            _global_task_ids(rows, self.tables)
        # real (non-padding) tokens, for throughput; a per-row key travels through flattening
        rows["real_tokens"] = (rows["sample_ids"] >= 0).sum(dim=1)
        return rows

    def micro_batch(self, start: int):
        """(flattened batch, PackedSeqParams) of the rows at `start`; every TP rank calls it."""
        from megatron_tokweight.megatron.batch import get_batch

        source = iter([self.rows(start)]) if self.groups.tp_rank == 0 else None
        return get_batch(source, tp_group=self.groups.tp, device="cpu")

    def step_micro_batches(self, step: int, num_micro_batches: int):
        per_mb = self.mbs * self.dp_size
        base = step * per_mb * num_micro_batches + self.groups.dp_rank * self.mbs
        return [self.micro_batch(base + m * per_mb) for m in range(num_micro_batches)]


def dataset_names(prefixes) -> tuple:
    """Distinct report names for a blend's prefixes: their base names (indexed when repeated)."""
    names = [os.path.basename(p) or p for p in prefixes]
    return tuple(n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names))


class _Truncated:
    def __init__(self, dataset, rows):
        self.dataset, self.rows = dataset, rows

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        return self.dataset[i]
