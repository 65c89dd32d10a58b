"""Per-sample metadata next to a Megatron IndexedDataset: `PREFIX.tokweight/` (docs/ARCHITECTURE.md, "Sidecar").

`SampleMetadata` holds the arrays and `meta.json`; `write_sidecar` / `read_sidecar` store and
load them (atomically, memory-mapped). `sidecar_builder.SampleMetadataBuilder` collects them one
sample at a time while `prepare` streams; `indexed_validation` checks a sidecar against the
`.bin`/`.idx` pair it describes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_tokweight.common.files import atomic_path
from megatron_tokweight.errors import DataFormatError

FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".tokweight"
ANSWER_KIND = "answer"  # span kind id 0

# array name -> (dtype, ndim); file = <name>.npy
ARRAY_SPECS = {
    "lengths": (np.int32, 1),
    "task_id": (np.int32, 1),
    "group_id": (np.int64, 1),
    "n_answer": (np.int32, 1),
    "span_offsets": (np.int64, 1),
    "spans": (np.int32, 2),
    "span_kind": (np.int16, 1),
}

def sidecar_dir(prefix) -> str:
    return os.fspath(prefix) + SIDECAR_SUFFIX


def lengths_fingerprint(lengths) -> str:
    """md5 of the sample lengths (as int64): caches and score files of a dataset that was
    prepared again with other samples are recognised."""
    data = np.ascontiguousarray(lengths, dtype=np.int64).tobytes()
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def span_targets(spans: np.ndarray) -> np.ndarray:
    """Targets per span: positions j >= 1 inside [start, end) (position 0 predicts nothing)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return np.maximum(spans[:, 1] - np.maximum(spans[:, 0], 1), 0)


def count_targets(spans) -> int:
    """n of one sample: its targets, given its non-overlapping [start, end) spans."""
    return int(span_targets(spans).sum())


@dataclass
class SampleMetadata:
    """The sidecar of one prepared dataset: per-sample arrays (N samples, S spans) and meta.json."""

    lengths: np.ndarray  # int32 [N]
    task_id: np.ndarray  # int32 [N]
    group_id: np.ndarray  # int64 [N]
    n_answer: np.ndarray  # int32 [N]
    span_offsets: np.ndarray  # int64 [N + 1]
    spans: np.ndarray  # int32 [S, 2]
    span_kind: np.ndarray  # int16 [S]
    task_names: List[str]
    span_kinds: List[str]
    tokenizer: dict
    token_dtype: str  # dtype of the .bin tokens ("uint16" or "int32")
    source: Optional[str] = None
    counts: Dict[str, int] = field(default_factory=dict)
    # sha256 of the .bin and .idx written with it ({"bin_sha256", "idx_sha256"}; `content_identity`)
    content: Dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    where: str = "sidecar"  # names the files in error messages
    # True: no sidecar on disk, synthesised from a plain Megatron prefix (`data.plain_prefix`)
    plain: bool = False

    def __post_init__(self):
        # Shapes and dtypes only (cheap even when memory-mapped); `check` validates the values.
        for name, (dtype, ndim) in ARRAY_SPECS.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
                got = f"{value.dtype} with {value.ndim} dims" if isinstance(value, np.ndarray) else type(value).__name__
                raise DataFormatError(f"{self.where}/{name}.npy: expected {np.dtype(dtype)} with {ndim} dims, got {got}")
        n = len(self.lengths)
        for name in ("task_id", "group_id", "n_answer"):
            if len(getattr(self, name)) != n:
                raise DataFormatError(
                    f"{self.where}/{name}.npy has {len(getattr(self, name))} entries but lengths.npy has {n} samples"
                )
        if len(self.span_offsets) != n + 1:
            raise DataFormatError(f"{self.where}/span_offsets.npy has {len(self.span_offsets)} entries, expected {n + 1}")
        if self.spans.shape[1:] != (2,) or len(self.span_kind) != len(self.spans):
            raise DataFormatError(
                f"{self.where}: spans.npy has shape {self.spans.shape} and span_kind.npy {self.span_kind.shape}; "
                "expected [S, 2] and [S]"
            )

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def sample_spans(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Sample i's spans [k, 2] and their kind ids [k]."""
        a, b = self.span_offsets[i], self.span_offsets[i + 1]
        return self.spans[a:b], self.span_kind[a:b]

    def meta(self) -> dict:
        return {
            "format_version": self.format_version,
            "tokenizer": self.tokenizer,
            "token_dtype": self.token_dtype,
            "task_names": list(self.task_names),
            "span_kinds": list(self.span_kinds),
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "source": self.source,
            "counts": dict(self.counts),
            "content": dict(self.content),
        }

    def check(self) -> None:
        """Every value consistent: CSR offsets, span bounds and order, ids in range, n = targets."""
        w = self.where
        if not self.span_kinds or self.span_kinds[0] != ANSWER_KIND:
            raise DataFormatError(f"{w}/meta.json: span_kinds must start with {ANSWER_KIND!r}, got {self.span_kinds}")
        for name in ("task_names", "span_kinds"):
            names = getattr(self, name)
            if len(set(names)) != len(names):
                raise DataFormatError(f"{w}/meta.json: {name} has duplicates: {names}")
        _first_bad(self.lengths < 0, f"{w}/lengths.npy", "negative length")
        _first_bad((self.task_id < 0) | (self.task_id >= len(self.task_names)), f"{w}/task_id.npy",
                   f"task id outside [0, {len(self.task_names)}) (meta.json task_names)", self.task_id)
        _first_bad(self.group_id < 0, f"{w}/group_id.npy", "negative group id", self.group_id)

        offsets = self.span_offsets
        if offsets[0] != 0 or offsets[-1] != len(self.spans):
            raise DataFormatError(
                f"{w}/span_offsets.npy: must run from 0 to the {len(self.spans)} spans of spans.npy, "
                f"runs from {offsets[0]} to {offsets[-1]}"
            )
        _first_bad(np.diff(offsets) < 0, f"{w}/span_offsets.npy", "offsets decrease (not a CSR index)")
        _first_bad((self.span_kind < 0) | (self.span_kind >= len(self.span_kinds)), f"{w}/span_kind.npy",
                   f"span kind outside [0, {len(self.span_kinds)}) (meta.json span_kinds)",
                   self.span_kind, per_span_of=offsets)

        owner = np.repeat(np.arange(self.num_samples), np.diff(offsets))
        starts, ends = self.spans[:, 0].astype(np.int64), self.spans[:, 1].astype(np.int64)
        _first_bad((starts < 0) | (starts >= ends), f"{w}/spans.npy", "span is empty or starts before 0",
                   self.spans, per_span_of=offsets)
        _first_bad(ends > self.lengths[owner], f"{w}/spans.npy", "span ends past the sample's length",
                   self.spans, per_span_of=offsets)
        if len(self.spans) > 1:
            same_sample = owner[1:] == owner[:-1]
            overlap = np.zeros(len(self.spans), dtype=bool)
            overlap[1:] = same_sample & (starts[1:] < ends[:-1])
            _first_bad(overlap, f"{w}/spans.npy", "span overlaps or precedes the sample's previous span",
                       self.spans, per_span_of=offsets)

        targets = np.bincount(owner, weights=span_targets(self.spans), minlength=self.num_samples)
        _first_bad(targets.astype(np.int64) != self.n_answer, f"{w}/n_answer.npy",
                   "n_answer differs from the targets its spans hold", self.n_answer)


def _first_bad(mask, what, problem, values=None, per_span_of=None):
    """Raise naming the first sample where `mask` holds (mask per span when per_span_of = offsets)."""
    bad = np.flatnonzero(mask)
    if not len(bad):
        return
    k = int(bad[0])
    sample = int(np.searchsorted(per_span_of, k, side="right") - 1) if per_span_of is not None else k
    detail = "" if values is None else f" (value {values[k].tolist()})"
    where = f"sample {sample}" + (f", span {k - int(per_span_of[sample])}" if per_span_of is not None else "")
    raise DataFormatError(f"{what}: {where}: {problem}{detail}; {len(bad)} bad entries in all")


def write_sidecar(prefix, metadata: SampleMetadata) -> str:
    """Check and write `PREFIX.tokweight/` atomically: into a temporary directory, then renamed."""
    metadata.check()
    final = sidecar_dir(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    with atomic_path(final, directory=True) as tmp:
        for name in ARRAY_SPECS:
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(metadata, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(metadata.meta(), f, indent=1)
    return final


def read_sidecar(prefix, mmap: bool = True) -> SampleMetadata:
    """Load `PREFIX.tokweight/` (arrays memory-mapped when `mmap`); shapes and dtypes are checked."""
    where = sidecar_dir(prefix)
    meta_path = os.path.join(where, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataFormatError(f"{meta_path} not found: no sidecar for {os.fspath(prefix)} (run `tokweight prepare`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else meta
        raise DataFormatError(f"{meta_path}: format_version {got!r}, this version reads {FORMAT_VERSION}")
    for key in ("tokenizer", "token_dtype", "task_names", "span_kinds", "num_samples", "num_tokens"):
        if key not in meta:
            raise DataFormatError(f"{meta_path}: missing field {key!r}")
    arrays = {}
    for name in ARRAY_SPECS:
        path = os.path.join(where, f"{name}.npy")
        if not os.path.isfile(path):
            raise DataFormatError(f"{path} not found (incomplete sidecar; run `tokweight prepare` again)")
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataFormatError(f"{path}: unreadable or truncated .npy ({err})") from err
    md = SampleMetadata(
        **arrays,
        task_names=list(meta["task_names"]),
        span_kinds=list(meta["span_kinds"]),
        tokenizer=meta["tokenizer"],
        token_dtype=meta["token_dtype"],
        source=meta.get("source"),
        counts=dict(meta.get("counts") or {}),
        content=dict(meta.get("content") or {}),
        where=where,
    )
    if md.num_samples != meta["num_samples"]:
        raise DataFormatError(f"{meta_path}: num_samples {meta['num_samples']} but lengths.npy has {md.num_samples}")
    if md.num_tokens != meta["num_tokens"]:
        raise DataFormatError(f"{meta_path}: num_tokens {meta['num_tokens']} but lengths.npy sums to {md.num_tokens}")
    return md
