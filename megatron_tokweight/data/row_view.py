"""Packed rows as a person reads them (`tokweight inspect`): `RowView`, plain data, no styling.

Built on the items `PackedDataset` returns to training, never on a second gather: `RowView.arrays`
are that item's arrays (numpy), and everything else is derived from them and from the dataset's own
per-sample tables (`n_trained`, `sample_weights`, the sidecar's task names):
- segments from `cu_seqlens_padded` (the physical layout; `cu_seqlens` gives each one's real
  tokens, the rest of a segment is context-parallel padding), the last one padding when the row
  is not full;
- per position the decoded text of its token;
- the *target* view: token p of a sample is trained when its predecessor's label is, i.e.
  `loss_mask[p - 1]` (labels are the next tokens within a sample), with weight
  `loss_weights[p - 1]`. A sample's first token is never a target.
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron_tokweight.errors import ConfigError, DataFormatError

# tokens decoded together before the one being decoded (leading spaces and merged bytes need them)
_DECODE_CONTEXT = 4
# at most this many tokens wait for the rest of an incomplete UTF-8 character
_MAX_PENDING = 4


@dataclass(frozen=True)
class Segment:
    """One entry of `cu_seqlens_padded`: positions [start, end) of the row, `real` of them tokens.

    sample is the sample id in the prefix, -1 for the row's padding. `offset` is where the piece
    starts within its sample (> 0 for a later fragment of a split sample), `sample_length` the
    sample's tokens in the `.bin`. n, weight and task are the dataset's for the whole sample.
    """

    start: int
    end: int
    real: int
    sample: int
    task: Optional[str] = None
    n: int = 0
    weight: float = 0.0
    offset: int = 0
    sample_length: int = 0

    @property
    def is_padding(self) -> bool:
        return self.sample < 0

    @property
    def is_partial(self) -> bool:
        """Only part of the sample: truncated, or a fragment of a split one."""
        return self.offset > 0 or self.offset + self.real < self.sample_length


@dataclass(frozen=True)
class RowView:
    """Row `index` of the dataset (training order; `pack_row` in the pack index)."""

    index: int
    pack_row: int
    arrays: Dict[str, np.ndarray]  # PackedDataset's item: tokens, labels, loss_mask, loss_weights, ...
    texts: List[str]  # decoded text of tokens[p] ("" for padding and for a byte that waits for the rest)
    segments: List[Segment]
    target: np.ndarray  # bool [L]: tokens[p] is a trained target
    target_weight: np.ndarray  # float32 [L]: its weight, 0 elsewhere

    @property
    def seq_length(self) -> int:
        return len(self.arrays["tokens"])

    @property
    def real_tokens(self) -> int:
        return sum(s.real for s in self.segments if not s.is_padding)

    @property
    def samples(self) -> List[Segment]:
        return [s for s in self.segments if not s.is_padding]


def token_texts(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> List[str]:
    """The text each token adds when `ids` are decoded in order; the pieces join to `decode(ids)`
    in the usual case. A token that ends inside a multi-byte character gets "" and the character
    goes to the token that completes it."""
    ids = [int(i) for i in ids]
    texts: List[str] = []
    start = 0  # the first token whose text is not out yet
    for k in range(len(ids)):
        lo = max(0, start - _DECODE_CONTEXT)
        before, now = decode(ids[lo:start]), decode(ids[lo:k + 1])
        if now.endswith("\ufffd") and k + 1 < len(ids) and k + 1 - start < _MAX_PENDING:
            texts.append("")
            continue
        texts.append(now[len(before):] if now.startswith(before) else decode(ids[start:k + 1]))
        start = k + 1
    return texts


def parse_rows(text: str) -> slice:
    """`--rows`: "I" (one row), "A:B" (rows A..B-1), "A:" or ":B"; non-negative integers."""
    first, sep, last = str(text).partition(":")
    try:
        lo = int(first) if first.strip() else 0
        hi = (int(last) if last.strip() else None) if sep else lo + 1
    except ValueError:
        raise ConfigError(f"--rows {text!r}: expected I, A:B, A: or :B with row numbers") from None
    if lo < 0 or (hi is not None and hi <= lo):
        raise ConfigError(f"--rows {text!r}: expected 0 <= A < B")
    return slice(lo, hi)


def open_packed_prefix(prefix, seq_length: int, algorithm: str = "bfd", overlong: str = "truncate",
                       context_parallel_size: int = 1, weighting=None, seed: int = 1234, cache_dir=None):
    """PREFIX's `PackedDataset` as `tokweight train` opens a one-prefix run (split 100,0,0, the
    seed's packing and row order, the index cache next to the prefix unless `cache_dir`)."""
    from megatron_tokweight.data.packed_dataset import (
        PackedDatasetConfig,
        build_packed_datasets,
    )

    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataFormatError(f"{prefix}{suffix} not found: is {prefix!r} a prefix written by `tokweight prepare`?")
    config = PackedDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        path_to_cache=cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache"),
        pack_algorithm=algorithm, overlong=overlong, context_parallel_size=context_parallel_size,
        weighting=weighting,
    )
    return build_packed_datasets(config, [None, None, None])[0]


def row_views(dataset, rows: slice, tokenizer) -> List[RowView]:
    """The views of `dataset[rows]` (a `PackedDataset`); ConfigError naming the range when a row
    is outside it."""
    count = len(dataset)
    lo, hi = rows.start or 0, count if rows.stop is None else rows.stop
    if not 0 <= lo < hi <= count:
        raise ConfigError(
            f"rows {lo}:{hi} are out of range: {dataset.dataset_path} packs into {count} rows "
            f"(0:{count}) at seq_length {dataset.config.sequence_length}"
        )
    return [row_view(dataset, index, tokenizer) for index in range(lo, hi)]


def row_view(dataset, index: int, tokenizer) -> RowView:
    """Row `index` as `dataset[index]` returns it, with its segments and decoded tokens."""
    arrays = {name: value.numpy() for name, value in dataset[index].items()}
    pack_row = int(dataset.shuffle_index[index])
    pieces = dataset.pack_index.pieces[dataset.pack_index.row_ptr[pack_row]:dataset.pack_index.row_ptr[pack_row + 1]]
    offsets = {int(p[4]): int(p[1]) for p in pieces}  # physical offset in the row -> start within the sample
    side, weights = dataset.sidecar, dataset.sample_weights
    count = int(arrays["num_segments"])
    padded, real = arrays["cu_seqlens_padded"][:count + 1], arrays["cu_seqlens"][:count + 1]

    segments, texts = [], [""] * len(arrays["tokens"])
    target = np.zeros(len(texts), dtype=bool)
    target_weight = np.zeros(len(texts), dtype=np.float32)
    for i in range(count):
        start, end, length = int(padded[i]), int(padded[i + 1]), int(real[i + 1] - real[i])
        sample = int(arrays["sample_ids"][start])
        if sample < 0:
            segments.append(Segment(start, end, length, -1))
            continue
        segments.append(Segment(
            start, end, length, sample, task=side.task_names[int(arrays["task_ids"][start])],
            n=int(dataset.n_trained[sample]), weight=1.0 if weights is None else float(weights[sample]),
            offset=offsets[start], sample_length=int(side.lengths[sample]),
        ))
        texts[start:start + length] = token_texts(tokenizer.decode, arrays["tokens"][start:start + length])
        # token p is the label of position p - 1: its target flag and weight sit there
        target[start + 1:start + length] = arrays["loss_mask"][start:start + length - 1] > 0
        target_weight[start + 1:start + length] = arrays["loss_weights"][start:start + length - 1]
    return RowView(index, pack_row, arrays, texts, segments, target, target_weight)
