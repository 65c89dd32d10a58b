"""Checks that a Megatron `.bin`/`.idx` pair is whole and that a sidecar describes exactly it."""
from __future__ import annotations

import os
import struct

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


def validate_against_indexed_dataset(prefix, check_token_ids: bool = False) -> SampleMetadata:
    """Check PREFIX.bin/.idx and PREFIX.tokweight/ belong together; return the (memory-mapped) sidecar.

    Catches a truncated or padded .bin, a truncated .idx, a sidecar from another run (sample count,
    lengths, token dtype, the files' recorded sha256), bad span bounds, a broken CSR index and
    out-of-range ids. With `check_token_ids` it also reads every token once to check the ids fit
    the tokenizer.
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    header = read_idx_header(idx_path)
    if not os.path.isfile(bin_path):
        raise DataFormatError(f"{bin_path} not found (its index {idx_path} exists)")
    if header["sequence_count"] == 0:
        raise DataFormatError(
            f"{prefix}: the dataset holds no samples ({idx_path} lists none); prepare it from a file with samples"
        )
    bin_size = os.path.getsize(bin_path)
    if bin_size == 0 and header["sequence_count"] > 0:
        raise DataFormatError(f"{bin_path}: empty, but {idx_path} lists {header['sequence_count']} sequences")

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    lengths = dataset.sequence_lengths
    pointers = dataset.index.sequence_pointers
    itemsize = header["dtype"].itemsize
    expect = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    if bin_size != expect:
        state = "truncated" if bin_size < expect else "longer than its index describes"
        raise DataFormatError(
            f"{bin_path}: {state}: {bin_size} bytes, but {idx_path} describes {expect} bytes "
            f"({int(lengths.sum(dtype=np.int64))} {header['dtype']} tokens); were they written by different runs?"
        )
    docs = dataset.document_indices
    if len(docs) != len(lengths) + 1 or np.any(docs != np.arange(len(lengths) + 1)):
        raise DataFormatError(f"{idx_path}: expected one sequence per document (as `tokweight prepare` writes)")

    md = read_sidecar(prefix, mmap=True)
    where = md.where
    if md.token_dtype != str(header["dtype"]):
        raise DataFormatError(f"{where}/meta.json: token_dtype {md.token_dtype} but {idx_path} holds {header['dtype']} tokens")
    if md.num_samples != len(lengths):
        raise DataFormatError(
            f"{where}: {md.num_samples} samples but {idx_path} has {len(lengths)} sequences; "
            "the sidecar and the dataset come from different runs"
        )
    _first_bad(md.lengths != lengths, f"{where}/lengths.npy", f"length differs from {idx_path}", md.lengths)
    md.check()
    verify_content(prefix, md)  # same shape is not same data: a swapped .bin, a half-finished prepare
    if check_token_ids and len(lengths):
        tokens = np.memmap(bin_path, dtype=header["dtype"], mode="r")
        vocab = int(md.tokenizer.get("vocab_size", 0))
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            pos = int(np.flatnonzero((tokens < 0) | (tokens >= vocab))[0])
            sample = int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), pos, side="right"))
            raise DataFormatError(
                f"{bin_path}: sample {sample}: token id {int(tokens[pos])} outside the tokenizer's vocabulary of {vocab}"
            )
    return md
