"""One micro-batch of packed rows on its way to the model: TP broadcast, THD flattening, CP slicing.

The flattening, the CP slicing and `PackedSeqParams` are the data layer's (`data.thd_batch`); this
module adds what needs process groups: the TP broadcast and `get_batch`.

Megatron-LM's stock `get_batch` broadcasts a fixed list of keys (dropping `loss_weights`, the
sample/task ids, `num_samples`...) and slices context parallelism with the `sbhd` rule. Here:

1. rank 0 of the tensor-parallel group reads the row batch (dict of [b, L] / [b] tensors) and
   `flatten_rows` turns the b rows into one THD stream [1, b*L] with concatenated `cu_seqlens`
   (TE's packed attention takes a single token stream);
2. `broadcast_batch` sends every key to the other TP ranks: a small schema (names, dtypes,
   shapes) then all tensors' bytes in one buffer, so no key is ever dropped and the collective
   count does not grow with the number of keys;
3. `slice_for_context_parallel` keeps this CP rank's tokens: every sample is cut into 2*CP equal
   chunks and rank r keeps chunks r and 2*CP-1-r (TE's `thd_get_partitioned_indices` rule, which
   balances the causal-attention work per sample);
4. `packed_seq_params` builds Megatron's `PackedSeqParams(qkv_format="thd")`.

Process groups are passed in explicitly; `None` means a group of one.
"""
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_tokweight.common.process_groups import group_rank, group_size
from megatron_tokweight.data.thd_batch import (
    flatten_rows,
    packed_seq_params,
    slice_for_context_parallel,
)
from megatron_tokweight.errors import DataFormatError

_ALIGN = 16  # byte alignment of each tensor in the broadcast buffer (any dtype can view it)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------- TP broadcast


def broadcast_batch(
    batch: Optional[Dict[str, torch.Tensor]], tp_group=None, device: Optional[torch.device] = None
) -> Dict[str, torch.Tensor]:
    """Deliver rank 0's batch (every key, dtype and shape) to every rank of `tp_group`.

    Rank 0 of the group passes the batch; the other ranks pass None. Returns the batch on
    `device` on every rank.
    """
    device = default_device() if device is None else torch.device(device)
    rank = group_rank(tp_group)
    if rank == 0:
        if not isinstance(batch, dict) or not batch:
            raise DataFormatError(f"get_batch: the data iterator yielded {type(batch).__name__}, expected a dict of tensors")
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise DataFormatError(
                    f"get_batch: batch key {key!r} holds {type(value).__name__}; every key must be a tensor "
                    "so that it can travel through the tensor-parallel broadcast"
                )
    if group_size(tp_group) == 1:
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    src = dist.get_global_rank(tp_group, 0)
    schema = [[(key, str(value.dtype), tuple(value.shape)) for key, value in batch.items()]] if rank == 0 else [None]
    dist.broadcast_object_list(schema, src=src, group=tp_group, device=device)
    schema = schema[0]

    # every tensor's bytes in one uint8 buffer (gloo has no int16/bool collectives; one call
    # whatever the number of keys), each starting at a multiple of _ALIGN bytes
    dtypes = [getattr(torch, dtype_name.replace("torch.", "")) for _, dtype_name, _ in schema]
    sizes = [int(torch.Size(shape).numel()) * _itemsize(dtype) for (_, _, shape), dtype in zip(schema, dtypes)]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _ALIGN) * _ALIGN
    if rank == 0:  # packed where the loader left the tensors, then one copy to the device
        buffer = torch.zeros(total, dtype=torch.uint8)
        for (key, _, _), offset, size in zip(schema, offsets, sizes):
            buffer[offset : offset + size] = batch[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        buffer = buffer.to(device)
    else:
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src, group=tp_group)
    out = {}
    for (key, _, shape), dtype, offset, size in zip(schema, dtypes, offsets, sizes):
        out[key] = buffer[offset : offset + size].view(dtype).view(shape)
    return out  # rank 0's key order on every rank


# key of the marker rank 0 broadcasts when its data iterator ends (`TensorParallelRows`)
_END_KEY = "__tokweight_end_of_data__"


class TensorParallelRows:
    """Rank 0's row batches delivered to every rank of `tp_group`, one `broadcast_batch` each.

    For a step that needs the rows on every TP rank before the forward: the unfrozen
    long-context scorer runs a TP-collective scoring forward over the whole step. Rank 0 passes
    its data iterator, the others None; every rank iterates in lockstep. When rank 0's iterator
    ends, an end marker travels instead, and every rank raises StopIteration.
    """

    def __init__(self, data_iterator: Optional[Iterator], tp_group, device: Optional[torch.device] = None):
        if group_rank(tp_group) == 0 and data_iterator is None:
            raise ValueError("rank 0 of the tensor-parallel group needs a data iterator, got None")
        self.data_iterator, self.tp_group, self.device = data_iterator, tp_group, device

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        rows = None
        if group_rank(self.tp_group) == 0:
            try:
                rows = next(self.data_iterator)
            except StopIteration:
                broadcast_batch({_END_KEY: torch.ones(1)}, self.tp_group, self.device)
                raise
        rows = broadcast_batch(rows, self.tp_group, self.device)
        if _END_KEY in rows:
            raise StopIteration
        return rows


def get_batch(
    data_iterator: Optional[Iterator],
    tp_group=None,
    cp_group=None,
    device: Optional[torch.device] = None,
    use_te: Optional[bool] = None,
) -> Tuple[Dict[str, torch.Tensor], object]:
    """Read (TP rank 0), broadcast, flatten and CP-slice one micro-batch.

    Returns `(batch, packed_seq_params)`: `batch` holds every key the dataset produced, per-token
    keys as [1, T/cp]; `packed_seq_params` is the THD description of the whole stream.
    """
    rows = None
    if group_rank(tp_group) == 0:
        if data_iterator is None:
            raise ValueError("get_batch: rank 0 of the tensor-parallel group needs a data iterator, got None")
        rows = next(data_iterator)
        if not isinstance(rows, dict):
            raise DataFormatError(f"get_batch: the data iterator yielded {type(rows).__name__}, expected a dict of tensors")
        rows = flatten_rows(rows)  # where the loader left it (CPU): the boundary work needs host values
    batch = broadcast_batch(rows, tp_group, device)
    batch = slice_for_context_parallel(batch, group_size(cp_group), group_rank(cp_group), use_te)
    return batch, packed_seq_params(batch)
