"""The pack index: where every piece of every sample sits in the packed rows (`PackIndex`).

`build_pack_index` turns sample lengths into pieces placed in rows (through `pack_lengths`),
padding each piece to a multiple of 2 x CP when context parallelism needs it.
`trained_targets` counts the targets each sample keeps once packed (docs/CONTRACTS.md section 2: n after
truncation, all fragments of a split sample together).
`row_gather.RowGather` fills the rows from it.

Kept free of Megatron imports so `tokweight pack` starts fast.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import numpy as np

from megatron_tokweight.data.packing import check_pack_options, pack_lengths
from megatron_tokweight.errors import DataFormatError

# columns of PackIndex.pieces
PIECE_COLUMNS = ("sample", "start", "length", "row", "offset")
SAMPLE, START, LENGTH, ROW, OFFSET = range(len(PIECE_COLUMNS))


@dataclass(frozen=True)
class PackIndex:
    """Pieces in row order and the slice of pieces that fills each row.

    pieces: int64 [P, 5] = (sample id, token offset within the sample, real length, row,
    physical offset within the row); row r holds pieces[row_ptr[r]:row_ptr[r + 1]].
    """

    pieces: np.ndarray
    row_ptr: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


@dataclass(frozen=True)
class PackStats:
    """What packing did to the samples; lossy cases are counted, never silent."""

    rows: int
    samples: int  # samples offered to the packer (including zero-length and dropped ones)
    zero_length: int  # samples without tokens: nothing to place
    truncated: int
    split: int
    dropped: int
    real_tokens: int  # tokens placed in rows
    truncated_tokens: int
    dropped_tokens: int
    efficiency: float  # real tokens / (rows * seq_length)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def build_pack_index(
    lengths, sample_ids, seq_length: int, algorithm: str = "bfd", overlong: str = "truncate", cp_multiple: int = 1
) -> Tuple[PackIndex, PackStats]:
    """Pack samples (`lengths[i]` tokens, named `sample_ids[i]` in the pieces) into rows.

    Every piece occupies its length rounded up to `cp_multiple` (2 x CP; 1 without CP): the
    packer sees those padded lengths, so a padded row never overflows. Since seq_length is a
    multiple of cp_multiple, a sample is overlong padded exactly when it is overlong unpadded.
    Zero-length samples are not placed (counted in `zero_length`).
    """
    check_pack_options(seq_length, algorithm, overlong, cp_multiple)
    real = np.asarray(lengths, dtype=np.int64)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    if real.ndim != 1 or real.shape != sample_ids.shape:
        raise ValueError(f"lengths {real.shape} and sample_ids {sample_ids.shape} must be 1-D of one length")
    if len(real) and real.min() < 0:
        raise DataFormatError(f"sample {int(sample_ids[np.argmin(real)])}: negative length {int(real.min())}")
    result = pack_lengths(-(-real // cp_multiple) * cp_multiple, seq_length, algorithm=algorithm, overlong=overlong)

    local = np.asarray(result.piece_sample, dtype=np.int64)
    start = np.asarray(result.piece_start, dtype=np.int64)
    # CP padding sits at a sample's end, so a piece's real tokens are what is left of the sample
    real_length = np.minimum(np.asarray(result.piece_length, dtype=np.int64), real[local] - start)
    pieces = np.stack(
        [sample_ids[local], start, real_length, result.piece_row, result.piece_offset], axis=1
    ).astype(np.int64)  # pack_lengths returns pieces in (row, offset) order
    row_ptr = np.asarray(result.row_piece_offsets, dtype=np.int64)

    kept = np.bincount(local, weights=real_length, minlength=len(real)).astype(np.int64)
    placed = np.asarray(result.row, dtype=np.int64) >= 0
    real_tokens = int(real_length.sum())
    num_rows = int(result.num_rows)
    stats = PackStats(
        rows=num_rows,
        samples=len(real),
        zero_length=int(result.empty),
        truncated=int(result.truncated),
        split=int(result.split),
        dropped=int(result.dropped),
        real_tokens=real_tokens,
        truncated_tokens=int((real - kept)[placed].sum()),
        dropped_tokens=int(real[~placed].sum()),
        efficiency=real_tokens / (num_rows * seq_length) if num_rows else 0.0,
    )
    return PackIndex(pieces=np.ascontiguousarray(pieces), row_ptr=row_ptr), stats


def trained_targets(pieces: np.ndarray, span_offsets: np.ndarray, spans: np.ndarray, num_samples: int) -> np.ndarray:
    """int64 [num_samples]: targets each sample keeps in its pieces (0 for unplaced samples).

    Token j of a sample is a target when j lies in a span and j >= 1; a piece [start, start +
    length) trains the targets j in (start, start + length): the label of its last position is
    never taken from outside the piece, so a split loses one target per cut.
    """
    pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, len(PIECE_COLUMNS))
    sample, start, length = pieces[:, SAMPLE], pieces[:, START], pieces[:, LENGTH]
    first = np.asarray(span_offsets, dtype=np.int64)[sample]
    count = np.asarray(span_offsets, dtype=np.int64)[sample + 1] - first
    owner = np.repeat(np.arange(len(pieces)), count)  # piece of every (piece, span) pair
    within = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
    span = np.asarray(spans, dtype=np.int64).reshape(-1, 2)[first[owner] + within]
    lo = np.maximum(span[:, 0], start[owner] + 1)
    hi = np.minimum(span[:, 1], start[owner] + length[owner])
    per_pair = np.maximum(hi - lo, 0)
    # float64 sums of integers are exact far beyond any target count
    return np.bincount(sample[owner], weights=per_pair, minlength=num_samples).astype(np.int64)
