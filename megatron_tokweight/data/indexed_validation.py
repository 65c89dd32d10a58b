"""Checks that a Megatron `.bin`/`.idx` pair is whole and that a sidecar describes exactly it."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_tokweight.data.content_identity import verify_content
from megatron_tokweight.data.sidecar import SampleMetadata, _first_bad, read_sidecar
from megatron_tokweight.errors import DataFormatError

# Megatron's .idx layout (megatron/core/datasets/indexed_dataset.py): magic, version, dtype code,
# sequence count, document count, then int32 lengths, int64 pointers, int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}



def read_idx_header(idx_path: str) -> dict:
    """Megatron .idx header (dtype, sequence and document counts), checked against the file's size."""
    if not os.path.isfile(idx_path):
        raise DataFormatError(f"{idx_path} not found")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        raw = f.read(_IDX_HEADER.size)
    if len(raw) < _IDX_HEADER.size:
        raise DataFormatError(f"{idx_path}: truncated ({size} bytes, shorter than the {_IDX_HEADER.size}-byte header)")
    magic, version, code, n_seq, n_doc = _IDX_HEADER.unpack(raw)
    if magic != _IDX_MAGIC or version != 1:
        raise DataFormatError(f"{idx_path}: not a Megatron IndexedDataset index (bad magic or version {version})")
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{idx_path}: unknown token dtype code {code}")
    need = _IDX_HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if size < need:
        raise DataFormatError(
            f"{idx_path}: truncated: {size} bytes, but its header lists {n_seq} sequences and {n_doc} "
            f"document indices ({need} bytes)"
        )
    return {"dtype": np.dtype(_IDX_DTYPES[code]), "sequence_count": n_seq, "document_count": n_doc}


@dataclass(frozen=True)
class IndexArrays:
    """A `.idx` read and checked against its `.bin`: per sequence int32 `lengths` and int64 byte
    `pointers`, the int64 `document_indices` (document d = sequences [d_i[d], d_i[d + 1]))."""

    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray


def read_index_arrays(prefix) -> IndexArrays:
    """PREFIX.idx (memory-mapped) after checking it describes PREFIX.bin exactly.

    Megatron's own reader trusts the index; a `.bin` from another run, a truncated copy or a
    damaged `.idx` would give wrong tokens (or read past the file) far from the cause. Checked
    here: the header, every sequence length >= 0, pointers that start at 0 and advance by each
    sequence's bytes, document indices from 0 to the sequence count without going back, and the
    `.bin` size. Every error names the file, the sequence or document and both numbers.
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    header = read_idx_header(idx_path)
    if not os.path.isfile(bin_path):
        raise DataFormatError(f"{bin_path} not found (its index {idx_path} exists)")
    n_seq, n_doc, dtype = header["sequence_count"], header["document_count"], header["dtype"]
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    at = _IDX_HEADER.size
    lengths = raw[at: at + 4 * n_seq].view(np.int32)
    pointers = raw[at + 4 * n_seq: at + 12 * n_seq].view(np.int64)
    docs = raw[at + 12 * n_seq: at + 12 * n_seq + 8 * n_doc].view(np.int64)
    negative = np.flatnonzero(lengths < 0)
    if negative.size:
        i = int(negative[0])
        raise DataFormatError(f"{idx_path}: sequence {i}: length {int(lengths[i])} is negative")
    ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize  # where each sequence's bytes end
    expected = np.concatenate(([0], ends[:-1])) if n_seq else ends
    bad = np.flatnonzero(pointers != expected)
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{idx_path}: sequence {i}: pointer {int(pointers[i])} but the sequences before it end at byte "
            f"{int(expected[i])} of {bin_path}; {bad.size} bad pointers in all (a damaged or foreign index)"
        )
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq:
        ends_at = int(docs[-1]) if n_doc else None
        raise DataFormatError(
            f"{idx_path}: document indices must run from 0 to its {n_seq} sequences, run from "
            f"{int(docs[0]) if n_doc else None} to {ends_at}"
        )
    _first_bad(np.diff(docs) < 0, idx_path, "document index goes back (documents out of order)", docs[1:])
    bin_size, expect = os.path.getsize(bin_path), int(ends[-1]) if n_seq else 0
    if bin_size == 0 and expect:
        raise DataFormatError(f"{bin_path}: empty, but {idx_path} lists {n_seq} sequences")
    if bin_size != expect:
        state = "truncated" if bin_size < expect else "longer than its index describes"
        raise DataFormatError(
            f"{bin_path}: {state}: {bin_size} bytes, but {idx_path} describes {expect} bytes "
            f"({expect // dtype.itemsize} {dtype} tokens); were they written by different runs?"
        )
    return IndexArrays(dtype, lengths, pointers, docs)


def validate_against_indexed_dataset(prefix, check_token_ids: bool = False) -> SampleMetadata:
    """Check PREFIX.bin/.idx and PREFIX.tokweight/ belong together; return the (memory-mapped) sidecar.

    Catches a truncated or padded .bin, a truncated or damaged .idx, a sidecar from another run
    (sample count, lengths, token dtype, the files' recorded sha256), bad span bounds, a broken
    CSR index and out-of-range ids. With `check_token_ids` it also reads every token once to
    check the ids fit the tokenizer.
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    index = read_index_arrays(prefix)
    lengths = index.lengths
    if len(lengths) == 0:
        raise DataFormatError(
            f"{prefix}: the dataset holds no samples ({idx_path} lists none); prepare it from a file with samples"
        )
    docs = index.document_indices
    if len(docs) != len(lengths) + 1 or np.any(docs != np.arange(len(lengths) + 1)):
        raise DataFormatError(f"{idx_path}: expected one sequence per document (as `tokweight prepare` writes)")

    md = read_sidecar(prefix, mmap=True)
    where = md.where
    if md.token_dtype != str(index.dtype):
        raise DataFormatError(f"{where}/meta.json: token_dtype {md.token_dtype} but {idx_path} holds {index.dtype} tokens")
    if md.num_samples != len(lengths):
        raise DataFormatError(
            f"{where}: {md.num_samples} samples but {idx_path} has {len(lengths)} sequences; "
            "the sidecar and the dataset come from different runs"
        )
    _first_bad(md.lengths != lengths, f"{where}/lengths.npy", f"length differs from {idx_path}", md.lengths)
    md.check()
    verify_content(prefix, md)  # same shape is not same data: a swapped .bin, a half-finished prepare
    if check_token_ids and len(lengths):
        tokens = np.memmap(bin_path, dtype=index.dtype, mode="r")
        vocab = int(md.tokenizer.get("vocab_size", 0))
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            pos = int(np.flatnonzero((tokens < 0) | (tokens >= vocab))[0])
            sample = int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), pos, side="right"))
            raise DataFormatError(
                f"{bin_path}: sample {sample}: token id {int(tokens[pos])} outside the tokenizer's vocabulary of {vocab}"
            )
    return md
