"""Token-id counts over a token buffer or a whole Megatron IndexedDataset `.bin` (one C++ pass).

Used by frequency-based token weights. The C++ extension `megatron_tokweight.weighting._counting` does the
pass; this front end checks dtypes and turns an out-of-range id into an error naming where it is.
"""
from __future__ import annotations

import numbers

import numpy as np

from megatron_tokweight.errors import ConfigError, DataFormatError

# dtypes the C++ reads in place (the .bin dtypes Megatron's DType.optimal_dtype picks, and int64)
_NATIVE_DTYPES = {np.dtype(np.uint16): "uint16", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}


# the counts table is int64 [vocab_size]: 2^24 ids (128 MiB) is 64x the largest vocabularies in
# use; the C++ refuses larger tables too
_MAX_VOCAB_SIZE = 2**24


def _checked_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
            or not 1 <= vocab_size <= _MAX_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be an integer in [1, {_MAX_VOCAB_SIZE}], got {vocab_size!r}")
    return int(vocab_size)


def _count(tokens, vocab_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(counts, first out-of-range position or -1, the flat array that was counted)."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise DataFormatError(f"token ids must have an integer dtype, got {tokens.dtype}")
    if tokens.dtype not in _NATIVE_DTYPES:
        if tokens.dtype == np.uint64 and tokens.size and tokens.max() > np.iinfo(np.int64).max:
            position = int(np.argmax(tokens > np.iinfo(np.int64).max))
            return np.zeros(vocab_size, np.int64), position, tokens.reshape(-1)
        tokens = tokens.astype(np.int64)  # other integer dtypes: one widening copy
    flat = np.ascontiguousarray(tokens).reshape(-1)  # no copy for a contiguous buffer or memmap
    from megatron_tokweight.weighting import _counting

    count = getattr(_counting, f"count_token_ids_{_NATIVE_DTYPES[flat.dtype]}")
    counts, first_bad = count(flat, vocab_size)
    return counts, int(first_bad), flat


def count_token_ids(tokens, vocab_size: int) -> np.ndarray:
    """int64[vocab_size] histogram of the ids in `tokens` (uint16/int32/int64, any shape).

    Raises DataFormatError naming the (flat) position and id of the first id outside
    [0, vocab_size).
    """
    vocab_size = _checked_vocab_size(vocab_size)
    counts, first_bad, flat = _count(tokens, vocab_size)
    if first_bad >= 0:
        raise DataFormatError(
            f"token position {first_bad}: id {int(flat[first_bad])} is outside [0, {vocab_size})"
        )
    return counts


def count_token_ids_in_dataset(prefix: str, vocab_size: int) -> np.ndarray:
    """int64[vocab_size] histogram of every token of the IndexedDataset at `prefix` (.bin/.idx).

    The whole `.bin` token range the `.idx` describes is counted in one C++ call over the memory
    map. Raises DataFormatError naming the file, sample and token of an id outside [0, vocab_size).
    """
    vocab_size = _checked_vocab_size(vocab_size)
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

    bin_path = get_bin_path(str(prefix))
    if not IndexedDataset.exists(str(prefix)):
        raise DataFormatError(f"{prefix}: no IndexedDataset here (need {prefix}.bin and {prefix}.idx)")
    dataset = IndexedDataset(str(prefix), mmap=True)
    lengths = dataset.sequence_lengths.astype(np.int64)
    pointers = dataset.index.sequence_pointers
    num_tokens = int(lengths.sum())
    first_pointer = int(pointers[0]) if len(pointers) else 0
    itemsize = np.dtype(dataset.index.dtype).itemsize
    # Megatron's builder writes sequences back to back; one flat view needs exactly that.
    expected = first_pointer + itemsize * np.concatenate(([0], np.cumsum(lengths)[:-1]))
    if len(pointers) and not np.array_equal(pointers, expected):
        bad = int(np.argmax(pointers != expected))
        raise DataFormatError(
            f"{bin_path}: sample {bad} starts at byte {int(pointers[bad])}, expected "
            f"{int(expected[bad])}: sequences are not stored back to back"
        )
    try:
        tokens = dataset.bin_reader.read(dtype=dataset.index.dtype, count=num_tokens, offset=first_pointer)
    except ValueError as err:  # numpy.frombuffer: the .bin is shorter than the .idx says
        raise DataFormatError(
            f"{bin_path}: holds fewer than the {num_tokens} tokens its .idx describes ({err})"
        ) from err
    counts, first_bad, flat = _count(tokens, vocab_size)
    if first_bad >= 0:
        sample = int(np.searchsorted(np.cumsum(lengths), first_bad, side="right"))
        token = first_bad - int(lengths[:sample].sum())
        raise DataFormatError(
            f"{bin_path}: sample {sample}, token {token}: id {int(flat[first_bad])} is outside "
            f"[0, {vocab_size})"
        )
    return counts
