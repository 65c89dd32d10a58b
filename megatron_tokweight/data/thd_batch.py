"""Packed rows as one THD token stream (Megatron's `PackedSeqParams(qkv_format="thd")`), and the
context-parallel share of it. Pure tensor work: no process group, no collective.

- `flatten_rows` turns the b rows of a micro-batch into one stream [1, b*L] with concatenated
  `cu_seqlens` (TE's packed attention takes a single token stream);
- `slice_for_context_parallel` keeps one CP rank's tokens: every sample is cut into 2*CP equal
  chunks and rank r keeps chunks r and 2*CP-1-r (TE's `thd_get_partitioned_indices` rule, which
  balances the causal-attention work per sample);
- `packed_seq_params` builds Megatron's `PackedSeqParams(qkv_format="thd")`.
"""
from typing import Dict, Optional

import numpy as np
import torch

from megatron_tokweight.errors import DataFormatError

# per-row boundary arrays (int32 [b, L+1], -1 after `num_segments`)
CU_SEQLENS_KEYS = ("cu_seqlens", "cu_seqlens_padded")
# keys `flatten_rows` rewrites; every other key is per-token ([b, L] -> [1, b*L]) or per-row ([b])
_DERIVED_KEYS = CU_SEQLENS_KEYS + ("num_segments", "max_seqlen")
# per-row ids that label every token of their row (a blend's `dataset_id`): expanded to per-token
# by `flatten_rows`, so that after flattening and CP slicing each token still knows its row's id
ROW_ID_KEYS = ("dataset_id",)

def _trimmed(cu: torch.Tensor, num_segments: int, row: int, key: str, seq_length: int) -> torch.Tensor:
    if not 1 <= num_segments <= seq_length:
        raise DataFormatError(f"get_batch: row {row} of the micro-batch has num_segments={num_segments}, expected 1..{seq_length}")
    bounds = cu[: num_segments + 1].to(torch.int64)
    if bounds[0] != 0 or bool((bounds[1:] < bounds[:-1]).any()):
        raise DataFormatError(f"get_batch: row {row}: {key}[:{num_segments + 1}] must start at 0 and never decrease, got {bounds.tolist()}")
    return bounds


def flatten_rows(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The b packed rows of a micro-batch as one THD token stream.

    Per-token keys (same shape as `tokens`, [b, L]) become [1, b*L]; `cu_seqlens` and
    `cu_seqlens_padded` are trimmed to each row's `num_segments` and concatenated, each row
    offset by the previous rows' totals (int32 [n + 1]); `num_segments` becomes their total and
    `max_seqlen` the largest padded segment (int64 scalars). `dataset_id` ([b]) becomes per-token
    [1, b*L]; other per-row keys ([b], e.g. `num_samples`) are kept as they are.

    A batch that is already flat (1-D `cu_seqlens`) is returned unchanged.
    """
    for key in ("tokens",) + CU_SEQLENS_KEYS + ("num_segments",):
        if key not in batch:
            raise DataFormatError(f"get_batch: the batch has no {key!r} key (keys: {sorted(batch)}); is the dataset a PackedDataset?")
    if batch["cu_seqlens"].dim() == 1:
        return batch
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise DataFormatError(f"get_batch: tokens must be [micro_batch, seq_length], got shape {tuple(tokens.shape)}")
    rows, seq_length = tokens.shape
    out: Dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key in _DERIVED_KEYS:
            continue
        if key in ROW_ID_KEYS and value.shape == (rows,):
            value = value.reshape(rows, 1).expand(rows, seq_length)
        out[key] = value.reshape(1, rows * seq_length) if value.shape == tokens.shape else value

    num_segments = batch["num_segments"].reshape(rows).tolist()
    for key in CU_SEQLENS_KEYS:
        cu = batch[key]
        if cu.shape != (rows, seq_length + 1):
            raise DataFormatError(f"get_batch: {key} must have shape {(rows, seq_length + 1)}, got {tuple(cu.shape)}")
        pieces, total = [torch.zeros(1, dtype=torch.int64, device=cu.device)], 0
        for row in range(rows):
            bounds = _trimmed(cu[row], int(num_segments[row]), row, key, seq_length)
            pieces.append(bounds[1:] + total)
            total += int(bounds[-1])
        out[key] = torch.cat(pieces).to(torch.int32)
    padded = out["cu_seqlens_padded"].to(torch.int64)
    if int(padded[-1]) != rows * seq_length:
        raise DataFormatError(
            f"get_batch: cu_seqlens_padded must cover every row position (end at {seq_length}); "
            f"the rows end at {[int(cu[int(n)]) for cu, n in zip(batch['cu_seqlens_padded'], num_segments)]}"
        )
    longest = int((padded[1:] - padded[:-1]).max())
    if "max_seqlen" in batch:
        longest = max(longest, int(batch["max_seqlen"].max()))
    out["num_segments"] = torch.tensor(sum(int(n) for n in num_segments), dtype=torch.int64, device=tokens.device)
    out["max_seqlen"] = torch.tensor(longest, dtype=torch.int64, device=tokens.device)
    return out


# ----------------------------------------------------------------------------- context parallelism


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token positions CP rank `cp_rank` keeps from a THD stream of `total_tokens` tokens.

    Each segment of `cu_seqlens_padded` (length a multiple of 2*cp_size) is cut into 2*cp_size
    equal chunks; the rank keeps chunk `cp_rank` then chunk `2*cp_size-1-cp_rank`, segment after
    segment. Same result as Transformer Engine's `thd_get_partitioned_indices`; int64 [total/cp]
    on the input's device. Computed with numpy on the host (a few vector ops over the pieces; on
    GPU the TE kernel is used instead, see `slice_for_context_parallel`).
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must lie in [0, cp_size), got cp_rank={cp_rank}, cp_size={cp_size}")
    bounds = cu_seqlens_padded.detach().cpu().numpy().astype(np.int64).reshape(-1)
    lengths = np.diff(bounds)
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != total_tokens or (lengths < 0).any():
        raise DataFormatError(f"cu_seqlens_padded must run from 0 to {total_tokens} without decreasing, got {bounds.tolist()}")
    if (lengths % (2 * cp_size)).any():
        bad = lengths[lengths % (2 * cp_size) != 0].tolist()
        raise DataFormatError(
            f"with context parallel size {cp_size} every padded segment length must be a multiple of {2 * cp_size}, "
            f"got {bad[:5]}; build the dataset with context_parallel_size={cp_size}"
        )
    chunk = lengths // (2 * cp_size)
    starts = bounds[:-1]
    # the kept pieces in output order: per segment chunk r, then chunk 2*cp-1-r
    piece_start = np.stack([starts + cp_rank * chunk, starts + (2 * cp_size - 1 - cp_rank) * chunk], 1).reshape(-1)
    piece_length = np.repeat(chunk, 2)
    piece_offset = np.cumsum(piece_length) - piece_length  # where each piece starts in the output
    index = np.arange(total_tokens // cp_size, dtype=np.int64) + np.repeat(piece_start - piece_offset, piece_length)
    return torch.from_numpy(index).to(cu_seqlens_padded.device)


def _partition_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int, use_te: Optional[bool]):
    if use_te is None:
        use_te = cu_seqlens_padded.is_cuda
    if use_te:
        try:
            import transformer_engine_torch as tex
        except ImportError:
            tex = None
        if tex is not None and hasattr(tex, "thd_get_partitioned_indices"):
            return tex.thd_get_partitioned_indices(cu_seqlens_padded.to(torch.int32), total_tokens, cp_size, cp_rank).long()
    return thd_partition_indices(cu_seqlens_padded, total_tokens, cp_size, cp_rank)


def slice_for_context_parallel(
    batch: Dict[str, torch.Tensor], cp_size: int, cp_rank: int, use_te: Optional[bool] = None
) -> Dict[str, torch.Tensor]:
    """Keep this CP rank's tokens of a flattened batch (see `thd_partition_indices`).

    Per-token keys ([1, T]) are sliced to [1, T/cp]; `cu_seqlens*`, `max_seqlen` and per-row
    keys describe the whole stream and are kept whole, as TE's context-parallel attention wants.
    `use_te=None` uses TE's kernel for CUDA tensors when it is installed.
    """
    if cp_size == 1:
        return batch
    total = batch["tokens"].shape[1]
    if total % (2 * cp_size):
        raise DataFormatError(f"the packed stream has {total} tokens, not a multiple of 2 x context parallel size {2 * cp_size}")
    index = _partition_indices(batch["cu_seqlens_padded"], total, cp_size, cp_rank, use_te)
    return {
        key: value.index_select(1, index) if value.dim() == 2 and value.shape == batch["tokens"].shape else value
        for key, value in batch.items()
    }


# ----------------------------------------------------------------------------- PackedSeqParams


def packed_seq_params(batch: Dict[str, torch.Tensor]):
    """Megatron's `PackedSeqParams(qkv_format="thd")` for a flattened batch (whole-stream boundaries).

    `cp_group` is left unset: TE's attention already holds the static CP group, and setting it
    here would make TE re-register the group on every forward (Megatron's dynamic-CP path).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    max_seqlen = int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch["cu_seqlens"],
        cu_seqlens_kv=batch["cu_seqlens"],
        cu_seqlens_q_padded=batch["cu_seqlens_padded"],
        cu_seqlens_kv_padded=batch["cu_seqlens_padded"],
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
