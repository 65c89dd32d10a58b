"""Plain Megatron prefixes: a `.bin`/`.idx` pair without a `PREFIX.tokweight/` sidecar, as
Megatron-LM's `tools/preprocess_data.py` or Megatron-Core's `IndexedDatasetBuilder` write them.

They are read as text samples (docs/CONTRACTS.md section 3, "Plain Megatron prefixes"): one
sample per `.idx` document (its sequences back to back, contiguous in the `.bin`), every token a
target but the document's first, one task named after the prefix's file name, each document
its own input (group). `sample_metadata(prefix)` gives the sidecar of a prepared prefix or this
synthesised one, so packing, rows and weights have one code path; nothing is written next to
the prefix. What needs the tokenizer (pad id, vocabulary size) comes from the `tokenizer` spec
the caller passes (the blend's, or the user's option); without one it is `{}`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import numpy as np

from megatron_tokweight.data.indexed_validation import read_index_arrays
from megatron_tokweight.data.sidecar import (
    ANSWER_KIND,
    ARRAY_SPECS,
    SampleMetadata,
    read_sidecar,
    sidecar_dir,
)
from megatron_tokweight.errors import DataFormatError


def has_sidecar(prefix) -> bool:
    return os.path.isdir(sidecar_dir(prefix))


def is_plain_prefix(prefix) -> bool:
    """PREFIX.bin and PREFIX.idx exist and no sidecar does."""
    prefix = os.fspath(prefix)
    return not has_sidecar(prefix) and os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def task_name(prefix) -> str:
    """The one task of a plain prefix: its file name (`data/web` -> "web")."""
    return os.path.basename(os.fspath(prefix).rstrip(os.sep)) or os.fspath(prefix)


def document_table(sequence_lengths, document_indices):
    """(element offset, length) per document, int64: its first sequence's offset and its
    sequences' total length (pointers are checked contiguous by `read_index_arrays`, so a
    document is one run of tokens). One sequence per document (a prepared prefix) gives the
    sequences themselves."""
    docs = np.asarray(document_indices, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sequence_lengths, dtype=np.int64)))
    return starts[docs[:-1]], starts[docs[1:]] - starts[docs[:-1]]


def text_metadata(prefix, tokenizer: Optional[dict] = None) -> SampleMetadata:
    """The in-memory sidecar of plain prefix PREFIX (after checking its .idx against its .bin)."""
    prefix = os.fspath(prefix)
    index = read_index_arrays(prefix)
    _, lengths = document_table(index.lengths, index.document_indices)
    too_long = np.flatnonzero(lengths > np.iinfo(np.int32).max)
    if too_long.size:
        d = int(too_long[0])
        raise DataFormatError(f"{prefix}.idx: document {d} holds {int(lengths[d])} tokens, more than 2**31 - 1")
    n = len(lengths)
    has_tokens = lengths > 0
    ends = lengths[has_tokens]
    spans = np.stack([np.zeros_like(ends), ends], axis=1).astype(np.int32)
    return SampleMetadata(
        lengths=lengths.astype(np.int32),
        task_id=np.zeros(n, np.int32),
        group_id=np.arange(n, dtype=np.int64),
        n_answer=np.maximum(lengths - 1, 0).astype(np.int32),  # the first token has no label
        span_offsets=np.concatenate(([0], np.cumsum(has_tokens, dtype=np.int64))),
        spans=spans.reshape(-1, 2),
        span_kind=np.zeros(len(spans), np.int16),
        task_names=[task_name(prefix)],
        span_kinds=[ANSWER_KIND],
        tokenizer=dict(tokenizer or {}),
        token_dtype=str(index.dtype),
        source=prefix + ".bin",
        where=prefix + ".idx",
        plain=True,
    )


def sample_metadata(prefix, tokenizer: Optional[dict] = None, mmap: bool = True) -> SampleMetadata:
    """PREFIX's per-sample metadata: its sidecar, or for a plain Megatron prefix the text samples
    of its documents (`tokenizer`: the spec they take; prepared prefixes carry their own)."""
    prefix = os.fspath(prefix)
    if is_plain_prefix(prefix):
        # one copy per process while the files are unchanged: every split's dataset reads it
        stats = tuple((st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                      for st in (os.stat(prefix + ".idx"), os.stat(prefix + ".bin")))
        return _cached_text_metadata((os.path.abspath(prefix), stats, json.dumps(tokenizer, sort_keys=True)))
    return read_sidecar(prefix, mmap=mmap)


@functools.lru_cache(maxsize=8)
def _cached_text_metadata(key) -> SampleMetadata:
    metadata = text_metadata(key[0], json.loads(key[-1]))
    for name in ARRAY_SPECS:
        getattr(metadata, name).flags.writeable = False  # shared: nobody may change it in place
    return metadata
