"""Packing samples into rows of `seq_length` tokens.

Python decides the policy (overlong and empty samples, which pieces exist); the C++ extension
`megatron_tokweight.data._packing` places the pieces (best-fit-decreasing, first-fit-decreasing or
order-preserving next-fit). Nothing vanishes silently: every sample is placed, or it is counted
as `dropped` (overlong under `overlong="drop"`) or `empty` (length 0: no tokens to train on, so
it has no row) and gets row -1.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

from megatron_tokweight.errors import ConfigError, DataFormatError

ALGORITHMS = ("bfd", "ffd", "next-fit")
OVERLONG_POLICIES = ("truncate", "split", "drop")

# algorithm name -> function name stem in megatron_tokweight.data._packing (`STEM_int32`)
_CPP_STEMS = {"bfd": "best_fit_decreasing", "ffd": "first_fit_decreasing", "next-fit": "next_fit"}
_MAX_SEQ_LENGTH = 2**31 - 1  # the C++ keeps remaining capacities in int32
_MAX_BFD_SEQ_LENGTH = 2**24  # BFD keeps one bucket per remaining capacity
_MAX_PIECES = 2**31 - 1  # the C++ numbers pieces with int32
# peak bytes per piece while packing, by index itemsize: the piece arrays built here (sample,
# start, length, index; int64 temporaries), the C++ placement records and its outputs (measured
# 82 and 126 for 20M pieces; the margin covers the decreasing packers' larger records)
_BYTES_PER_PIECE = {4: 96, 8: 144}


@dataclass(frozen=True, eq=False)  # array fields: no elementwise-ambiguous __eq__
class PackResult:
    """Where every sample (or piece of one) lives in the packed rows.

    Per sample (index = sample): `row`, `offset` of its first piece, -1 if dropped or empty.
    Per piece, sorted by (row, offset): `piece_sample`, `piece_start` (token offset within the
    sample), `piece_length`, `piece_row`, `piece_offset`; row r's pieces are
    `row_piece_offsets[r] : row_piece_offsets[r + 1]`.
    Every array has one dtype, whatever the lengths' integer dtype: int32, or int64 only when
    overlong="split" cuts a sample longer than 2**31 - 1 tokens (its pieces start past int32).
    """

    algorithm: str
    seq_length: int
    overlong: str
    row: np.ndarray
    offset: np.ndarray
    piece_sample: np.ndarray
    piece_start: np.ndarray
    piece_length: np.ndarray
    piece_row: np.ndarray
    piece_offset: np.ndarray
    row_piece_offsets: np.ndarray
    row_fill: np.ndarray
    num_rows: int
    truncated: int
    split: int
    dropped: int
    empty: int
    truncated_tokens: int
    dropped_tokens: int
    efficiency: float

    @property
    def num_samples(self) -> int:
        return len(self.row)

    @property
    def num_pieces(self) -> int:
        return len(self.piece_sample)

    def pieces_of_row(self, r: int) -> slice:
        """Slice of the piece arrays that row `r` holds, in offset order."""
        return slice(int(self.row_piece_offsets[r]), int(self.row_piece_offsets[r + 1]))

    def summary(self) -> dict:
        """The scalar fields, JSON-ready (for reports)."""
        real_tokens = int(self.row_fill.sum(dtype=np.int64))
        return {
            "algorithm": self.algorithm,
            "seq_length": self.seq_length,
            "overlong": self.overlong,
            "num_samples": self.num_samples,
            "num_pieces": self.num_pieces,
            "num_rows": self.num_rows,
            "real_tokens": real_tokens,
            "lower_bound_rows": -(-real_tokens // self.seq_length),
            "truncated": self.truncated,
            "split": self.split,
            "dropped": self.dropped,
            "empty": self.empty,
            "truncated_tokens": self.truncated_tokens,
            "dropped_tokens": self.dropped_tokens,
            "efficiency": self.efficiency,
        }


def check_pack_options(seq_length, algorithm: str, overlong: str, cp_multiple: int = 1) -> int:
    """The one check of packing settings (before any packing): a ConfigError naming the option
    when one is impossible; returns seq_length as an int."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, numbers.Integral) or seq_length < 1:
        raise ConfigError(f"seq_length must be a positive integer, got {seq_length!r}")
    seq_length = int(seq_length)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"pack algorithm {algorithm!r} is unknown; use one of {', '.join(ALGORITHMS)}")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong policy {overlong!r} is unknown; use one of {', '.join(OVERLONG_POLICIES)}")
    if seq_length > _MAX_SEQ_LENGTH:
        raise ConfigError(f"seq_length must be in [1, {_MAX_SEQ_LENGTH}], got {seq_length}")
    if algorithm == "bfd" and seq_length > _MAX_BFD_SEQ_LENGTH:
        raise ConfigError(
            f"algorithm 'bfd' supports seq_length <= {_MAX_BFD_SEQ_LENGTH} (its memory grows with "
            f"seq_length), got {seq_length}; use algorithm='ffd'"
        )
    if cp_multiple < 1 or seq_length % cp_multiple:
        raise ConfigError(
            f"seq_length {seq_length} must be a multiple of 2 x context_parallel_size = {cp_multiple} "
            "(every packed sample is padded to that multiple)"
        )
    return seq_length


def _checked_lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise DataFormatError(f"lengths must be a 1-D array, got shape {lengths.shape}")
    if lengths.dtype.kind not in "iu":  # bool ('b'), floats and objects are not lengths
        raise DataFormatError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.dtype.kind == "u" and lengths.dtype.itemsize == 8:
        too_big = np.flatnonzero(lengths > np.iinfo(np.int64).max)
        if too_big.size:
            i = int(too_big[0])
            raise DataFormatError(f"sample {i}: length {lengths[i]} does not fit in int64")
    if lengths.dtype.kind == "i":
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            i = int(negative[0])
            raise DataFormatError(f"sample {i}: length {int(lengths[i])} is negative")
    return lengths


def _exact_sum(values: np.ndarray) -> int:
    """The sum of integer `values` as a Python int: int64 when it cannot overflow, else exact."""
    if values.size == 0:
        return 0
    if float(np.abs(values.astype(np.float64)).sum()) < 2.0**62:
        return int(values.sum(dtype=np.int64))
    return sum(int(v) for v in values)


def _available_memory() -> int:
    """Bytes of memory the system can still give (MemAvailable), or total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_pieces_fit(num_pieces: int, seq_length: int, itemsize: int) -> None:
    """Refuse, with the numbers, a split that makes more pieces than the packer can index (int32
    ids) or than memory can hold: the arrays would otherwise grow until the kernel kills us."""
    need, available = num_pieces * _BYTES_PER_PIECE[itemsize], _available_memory()
    if num_pieces > _MAX_PIECES or need > available:
        raise DataFormatError(
            f"overlong='split' at seq_length {seq_length} cuts the samples into {num_pieces:,} pieces, "
            f"about {need / 2**30:,.1f} GiB of packing arrays (at most {_MAX_PIECES:,} pieces, "
            f"{available / 2**30:,.1f} GiB available); raise seq_length, or truncate or drop "
            "the overlong samples"
        )


def pack_lengths(lengths, seq_length: int, algorithm: str = "bfd", overlong: str = "truncate") -> PackResult:
    """Packs samples of the given token `lengths` into rows of `seq_length` tokens.

    algorithm: "bfd" (best-fit-decreasing: the row with the least room that fits; among rows
        with equal room, the one that took its last piece longest ago, as TRL's and OLMo-core's
        packers do), "ffd" (first-fit-decreasing: the lowest row that fits) or "next-fit" (keeps
        sample order; a new row whenever the current one cannot take the next piece). The
        decreasing orders are stable (ties by sample index), so results are deterministic.
    overlong: what to do with a sample longer than seq_length: "truncate" keeps its first
        seq_length tokens; "split" cuts it into full rows of seq_length plus a remainder that is
        packed with the others; "drop" leaves it out (row -1, counted in `dropped`).
    Zero-length samples are left out (row -1) and counted in `empty`.
    """
    seq_length = check_pack_options(seq_length, algorithm, overlong)
    lengths = _checked_lengths(lengths)
    n = len(lengths)
    if n > np.iinfo(np.int32).max:  # sample and piece ids are int32
        raise DataFormatError(f"at most {np.iinfo(np.int32).max} samples per call, got {n}")
    is_overlong = lengths > seq_length
    is_empty = lengths == 0
    num_overlong, num_empty = int(is_overlong.sum()), int(is_empty.sum())
    overlong_tokens = _exact_sum(lengths[is_overlong])

    # Every dtype takes the one int32 packer: pieces are at most seq_length <= 2**31 - 1 long and
    # ids are below 2**31, so once the pieces are cut the cast is exact; int64 arrays would only
    # double the memory the C++ and every later pass touch (6x slower packing, issue 12). Only a
    # split sample past int32 has piece starts that need int64, and then the whole result gets it.
    int32_max = np.iinfo(np.int32).max
    wide = overlong == "split" and num_overlong > 0 and int(lengths.max()) > int32_max
    index_dtype = np.int64 if wide else np.int32
    every_sample_whole = num_overlong == 0 and num_empty == 0
    if every_sample_whole:
        # One piece per sample, piece i = sample i: lengths <= seq_length, exact in int32.
        piece_length = np.ascontiguousarray(lengths, dtype=np.int32)
    else:
        pieces_per_sample = np.ones(n, dtype=np.int64)
        if overlong == "split":
            pieces_per_sample[is_overlong] = -(-lengths[is_overlong].astype(np.int64) // seq_length)
        elif overlong == "drop":
            pieces_per_sample[is_overlong] = 0
        pieces_per_sample[is_empty] = 0
        _check_pieces_fit(int(pieces_per_sample.sum()), seq_length, np.dtype(index_dtype).itemsize)
        piece_sample = np.repeat(np.arange(n, dtype=np.int32), pieces_per_sample)
        first_piece = np.cumsum(pieces_per_sample) - pieces_per_sample
        piece_index = np.arange(len(piece_sample), dtype=np.int64) - first_piece[piece_sample]
        piece_start = piece_index * seq_length
        piece_length = np.minimum(lengths[piece_sample].astype(np.int64) - piece_start, seq_length)
        piece_start, piece_length = piece_start.astype(index_dtype), piece_length.astype(np.int32)

    from megatron_tokweight.data import _packing

    packed = getattr(_packing, f"{_CPP_STEMS[algorithm]}_int32")(piece_length, seq_length)
    if wide:
        packed = {name: array.astype(np.int64) for name, array in packed.items()}
    row_fill, row_piece_offsets, row_order = packed["bin_fill"], packed["bin_start"], packed["row_order"]
    num_rows = len(row_fill)

    if every_sample_whole:
        row, offset = packed["bin"], packed["offset"]
        piece_sample, piece_start = row_order, np.zeros(n, dtype=index_dtype)
    else:
        row = np.full(n, -1, dtype=index_dtype)
        offset = np.full(n, -1, dtype=index_dtype)
        placed = np.flatnonzero(pieces_per_sample > 0)
        row[placed] = packed["bin"][first_piece[placed]]
        offset[placed] = packed["offset"][first_piece[placed]]
        piece_sample, piece_start = piece_sample[row_order].astype(index_dtype, copy=False), piece_start[row_order]

    real_tokens = int(row_fill.sum(dtype=np.int64))
    return PackResult(
        algorithm=algorithm,
        seq_length=seq_length,
        overlong=overlong,
        row=row,
        offset=offset,
        piece_sample=piece_sample,
        piece_start=piece_start,
        piece_length=packed["row_length"],
        piece_row=packed["row_bin"],
        piece_offset=packed["row_offset"],
        row_piece_offsets=row_piece_offsets,
        row_fill=row_fill,
        num_rows=num_rows,
        truncated=num_overlong if overlong == "truncate" else 0,
        split=num_overlong if overlong == "split" else 0,
        dropped=num_overlong if overlong == "drop" else 0,
        empty=num_empty,
        truncated_tokens=overlong_tokens - num_overlong * seq_length if overlong == "truncate" else 0,
        dropped_tokens=overlong_tokens if overlong == "drop" else 0,
        efficiency=real_tokens / (num_rows * seq_length) if num_rows else 0.0,
    )
