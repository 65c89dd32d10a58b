"""Packed rows: where every piece of every sample sits (`PackIndex`) and the gather of a row.

`build_pack_index` turns sample lengths into pieces placed in rows (through `pack_lengths`),
padding each piece to a multiple of 2 x CP when context parallelism needs it.
`trained_targets` counts the targets each sample keeps once packed (DESIGN.md section 2: n after
truncation, all fragments of a split sample together). `RowGather` is the thin front end of the
C++ gather (`csrc/rows.cpp`): it checks dtypes once and fills one row's arrays
(docs/ARCHITECTURE.md, "A packed row").

Kept free of Megatron imports so `tokweight pack` starts fast.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import numpy as np

from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.packing import ALGORITHMS, OVERLONG_POLICIES, pack_lengths

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


def check_pack_options(seq_length, algorithm: str, overlong: str, cp_multiple: int = 1) -> None:
    """ConfigError naming the option when a packing setting is impossible (before any packing)."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise ConfigError(f"seq_length must be a positive integer, got {seq_length!r}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"pack algorithm {algorithm!r} is unknown; use one of {', '.join(ALGORITHMS)}")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong policy {overlong!r} is unknown; use one of {', '.join(OVERLONG_POLICIES)}")
    if cp_multiple < 1 or seq_length % cp_multiple:
        raise ConfigError(
            f"seq_length {seq_length} must be a multiple of 2 x context_parallel_size = {cp_multiple} "
            "(every packed sample is padded to that multiple)"
        )


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


# token dtype of the .bin -> C++ variant
_VARIANTS = {np.dtype(np.uint16): "RowBuilderUint16", np.dtype(np.int32): "RowBuilderInt32",
             np.dtype(np.int64): "RowBuilderInt64"}

# rows of the int64 block returned by `RowGather.blocks`
INT_FIELDS = ("tokens", "labels", "position_ids", "sample_ids", "task_ids")


class RowGather:
    """Fills packed rows of one dataset (C++; every index bounds-checked).

    The dataset's arrays are checked and bound once; `blocks(row)` / `gather(row)` then build
    one row. `token_buffer` is the whole .bin as a 1-D array and `sample_pointer[i]` the element
    offset of sample i in it. With `sample_weights` (float32 per sample) loss_weights holds the
    sample's weight on its targets, else 1.0 (token factors are applied by the caller).
    """

    def __init__(self, token_buffer, sample_pointer, sample_length, task_id, span_offsets, spans, span_kind,
                 index: PackIndex, seq_length: int, pad_id: int, cp_multiple: int = 1, sample_weights=None):
        from megatron_tokweight import _rows

        if not isinstance(token_buffer, np.ndarray) or token_buffer.ndim != 1:
            raise ValueError("token_buffer must be a 1-D numpy array (the .bin tokens)")
        variant = _VARIANTS.get(token_buffer.dtype)
        if variant is None:
            raise DataFormatError(
                f"token dtype {token_buffer.dtype} is not supported; use one of {', '.join(map(str, _VARIANTS))}"
            )
        self.token_buffer = np.ascontiguousarray(token_buffer)
        self.sample_pointer = _exact(sample_pointer, np.int64, "sample_pointer")
        self.index = PackIndex(_exact(index.pieces, np.int64, "pieces"), _exact(index.row_ptr, np.int64, "row_ptr"))
        self.seq_length = int(seq_length)
        weights = (np.zeros(0, np.float32) if sample_weights is None
                   else _exact(sample_weights, np.float32, "sample_weights"))
        self._builder = getattr(_rows, variant)(
            self.token_buffer, self.sample_pointer, _exact(sample_length, np.int32, "sample_length"),
            _exact(task_id, np.int32, "task_id"), _exact(span_offsets, np.int64, "span_offsets"),
            _exact(np.asarray(spans).reshape(-1, 2), np.int32, "spans"), _exact(span_kind, np.int16, "span_kind"),
            self.index.pieces, self.index.row_ptr, weights, self.seq_length, int(pad_id), int(cp_multiple),
        )

    @property
    def num_rows(self) -> int:
        return self._builder.num_rows

    def blocks(self, row: int):
        """Row `row` as five fresh arrays: int64 [5, L] (INT_FIELDS), float32 [2, L] (loss_mask,
        loss_weights), int16 [L] (span kind per target, -1 elsewhere), int32 [2, L + 1]
        (cu_seqlens, cu_seqlens_padded; -1 after the last boundary), int64 [3] (num_segments,
        max_seqlen, num_samples = samples whose first piece is in the row)."""
        return self._builder.build(int(row))

    def gather(self, row: int) -> Dict[str, np.ndarray]:
        """Row `row` as a dict of named numpy arrays (views into `blocks`) and scalars."""
        ints, floats, kinds, bounds, scalars = self.blocks(row)
        out = dict(zip(INT_FIELDS, ints))
        out.update(loss_mask=floats[0], loss_weights=floats[1], span_kinds=kinds,
                   cu_seqlens=bounds[0], cu_seqlens_padded=bounds[1])
        out.update(zip(("num_segments", "max_seqlen", "num_samples"), scalars.tolist()))
        return out


def _exact(array, dtype, name: str) -> np.ndarray:
    """The array itself when it has the dtype and layout (memory maps stay maps); small
    same-kind arrays are converted, anything else is a ValueError naming the array."""
    array = np.asarray(array)
    if array.dtype != np.dtype(dtype):
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise ValueError(f"{name}: expected {np.dtype(dtype)}, got {array.dtype}")
        array = array.astype(dtype)
    return np.ascontiguousarray(array)
