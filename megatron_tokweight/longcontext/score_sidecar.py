"""Per-token log-probabilities next to a prepared dataset, and their gather into packed rows.

`tokweight score` writes a directory (default `PREFIX.tokweight/longcontext/`):

| file | dtype, shape | meaning |
|---|---|---|
| `meta.json` | | `format_version`, `kind`, the scorer checkpoint, `short_context`, `stride`, `seq_length`, `vocab_size`, `num_samples`, `num_tokens`, `lengths_md5`, `counts` |
| `short_logprobs.npy` | float16 [num_tokens] | log p(token) given at most n preceding tokens of its training sequence |
| `long_logprobs.npy` | float16 [num_tokens] | log p(token) given its whole training sequence prefix |

Both arrays are aligned to the `.bin`: entry i is token i of the buffer (samples back to back).
A sample's training sequences are its consecutive chunks of `seq_length` tokens (what `overlong`
"truncate" and "split" train); the first token of each chunk is predicted by nothing there and
holds 0.0 (log 1: it is given). Tokens whose short context equals their long one (the first n of
a chunk) hold the same value in both files, so their score is exactly 0.

In a packed row, position p predicts the token after it, so the row value at p is the value of
the *next* token of the piece (`row_values`); the last position of a piece and padding get 0.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_tokweight.common.files import discard, replace_path, temporary_sibling
from megatron_tokweight.data.indexed_validation import read_idx_header
from megatron_tokweight.data.sidecar import lengths_fingerprint, sidecar_dir
from megatron_tokweight.errors import ConfigError, DataFormatError

FORMAT_VERSION = 1
KIND = "longcontext_logprobs"
ARRAYS = ("short_logprobs", "long_logprobs")
SUBDIR = "longcontext"


def default_scores_dir(prefix) -> str:
    return os.path.join(sidecar_dir(prefix), SUBDIR)


def bin_token_count(prefix) -> int:
    """Tokens in PREFIX.bin, from its size and the .idx dtype."""
    header = read_idx_header(os.fspath(prefix) + ".idx")
    bin_path = os.fspath(prefix) + ".bin"
    if not os.path.isfile(bin_path):
        raise DataFormatError(f"{bin_path} not found")
    return os.path.getsize(bin_path) // header["dtype"].itemsize


class ScoreWriter:
    """Streams both arrays into a temporary directory; `commit` renames it into place."""

    def __init__(self, out_dir: str, num_tokens: int, meta: dict):
        self.out_dir = os.fspath(out_dir)
        os.makedirs(os.path.dirname(os.path.abspath(self.out_dir)), exist_ok=True)
        self.tmp = temporary_sibling(self.out_dir, directory=True)
        self.meta = dict(meta, format_version=FORMAT_VERSION, kind=KIND, num_tokens=int(num_tokens))
        self.arrays = {
            name: np.lib.format.open_memmap(
                os.path.join(self.tmp, f"{name}.npy"), mode="w+", dtype=np.float16, shape=(int(num_tokens),)
            )
            for name in ARRAYS
        }
        self.counts = {"clamped_to_float16": 0}

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        if not np.isfinite(values).all():
            raise DataFormatError(f"non-finite {name} for tokens {start}..{start + len(values)} (scorer output)")
        low = np.finfo(np.float16).min
        clamped = values < low
        self.counts["clamped_to_float16"] += int(clamped.sum())
        self.arrays[name][start:start + len(values)] = np.maximum(values, low).astype(np.float16)

    def commit(self) -> str:
        for array in self.arrays.values():
            array.flush()
        self.arrays = {}
        self.meta["counts"] = dict(self.counts)
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)
        replace_path(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        self.arrays = {}
        discard(self.tmp)


@dataclass
class TokenScores:
    """The arrays of a score directory (memory-mapped), checked against its dataset."""

    short_logprobs: np.ndarray
    long_logprobs: np.ndarray
    meta: dict
    where: str

    @classmethod
    def open(cls, prefix, scores_dir: Optional[str] = None) -> "TokenScores":
        """Load the scores of PREFIX (default directory unless `scores_dir`); DataFormatError
        when they do not belong to PREFIX.bin (token count or sample lengths differ)."""
        where = os.fspath(scores_dir) if scores_dir is not None else default_scores_dir(prefix)
        meta_path = os.path.join(where, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataFormatError(f"{meta_path} not found: run `tokweight score {os.fspath(prefix)} ...` first")
        with open(meta_path) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{meta_path}: not valid JSON ({err})") from err
        if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(
                f"{meta_path}: kind {meta.get('kind')!r} version {meta.get('format_version')!r}; "
                f"this version reads {KIND!r} version {FORMAT_VERSION}"
            )
        bin_tokens = bin_token_count(prefix)
        arrays = {}
        for name in ARRAYS:
            path = os.path.join(where, f"{name}.npy")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise DataFormatError(f"{path}: missing or unreadable ({err})") from err
            if array.dtype != np.float16 or array.ndim != 1:
                raise DataFormatError(f"{path}: expected float16 [tokens], got {array.dtype} {array.shape}")
            if len(array) != bin_tokens:
                raise DataFormatError(
                    f"{path} holds {len(array)} values but {os.fspath(prefix)}.bin has {bin_tokens} tokens: "
                    "the scores belong to another dataset (run `tokweight score` again)"
                )
            arrays[name] = array
        from megatron_tokweight.data.sidecar import read_sidecar

        lengths = read_sidecar(prefix).lengths
        if meta.get("lengths_md5") != lengths_fingerprint(lengths):
            raise DataFormatError(
                f"{meta_path}: the sample lengths differ from {sidecar_dir(prefix)} (same token count, "
                "different samples): the dataset was prepared again; run `tokweight score` again"
            )
        return cls(arrays["short_logprobs"], arrays["long_logprobs"], meta, where)


def row_values(values: np.ndarray, sample_pointer: np.ndarray, pieces: np.ndarray, seq_length: int) -> np.ndarray:
    """Label-aligned float32 [seq_length] row of token-aligned `values`.

    pieces: int64 [k, 5] rows of `PackIndex.pieces` (sample, start, length, row, offset) of one
    row; sample_pointer[i]: element offset of sample i in the .bin. Row position offset + q
    (q < length - 1) gets the value of token start + q + 1 of its sample; the rest 0.
    """
    out = np.zeros(seq_length, np.float32)
    pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, 5)
    for sample, start, length, _, offset in pieces.tolist():
        if length > 1:
            first = int(sample_pointer[sample]) + start + 1
            out[offset:offset + length - 1] = values[first:first + length - 1]
    return out


class ScoredRows(torch.utils.data.Dataset):
    """A `PackedDataset` whose rows also carry the frozen scores, and optionally their weights.

    Adds `short_logprobs` and `long_logprobs` (float32 [L], label-aligned). With a
    `LongContextConfig` whose method is not rho1, `loss_weights` becomes the dataset's weights
    times the long-context weights (normalised per piece), so training needs no other change.
    """

    def __init__(self, dataset, scores: TokenScores, config=None):
        if int(scores.meta.get("seq_length", -1)) != dataset.config.sequence_length:
            raise DataFormatError(
                f"{scores.where}: scored with seq_length {scores.meta.get('seq_length')} but the dataset packs "
                f"rows of {dataset.config.sequence_length}: training sequences differ; score again with "
                f"--seq-length {dataset.config.sequence_length}"
            )
        if config is not None:
            config.check_sequence_length(dataset.config.sequence_length)
            scored = (scores.meta.get("short_context"), scores.meta.get("stride"))
            if scored != (config.short_context, config.stride):
                raise ConfigError(
                    f"{scores.where} was scored with short_context, stride = {scored}, but long_context asks "
                    f"for {(config.short_context, config.stride)}: run `tokweight score` with those, or change "
                    "the config"
                )
            if config.method == "rho1":
                raise ConfigError(
                    "long_context.method 'rho1' needs the trained model's log-probabilities: use "
                    "OnlineScorer, with the frozen long_logprobs as the batch's reference_logprobs"
                )
        self.dataset = dataset
        self.scores = scores
        self.config = config
        index = dataset.dataset.index
        self.sample_pointer = np.asarray(index.sequence_pointers) // np.dtype(index.dtype).itemsize

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        from megatron_tokweight.longcontext.scores import (
            apply_weights,
            long_context_weights,
            segment_ids_from_cu_seqlens,
        )

        item = self.dataset[idx]
        row = int(self.dataset.shuffle_index[idx])
        index = self.dataset.pack_index
        pieces = index.pieces[index.row_ptr[row]:index.row_ptr[row + 1]]
        length = self.dataset.config.sequence_length
        for name in ARRAYS:
            values = getattr(self.scores, name)
            item[name] = torch.from_numpy(row_values(values, self.sample_pointer, pieces, length))
        if self.config is not None:
            segments = segment_ids_from_cu_seqlens(item["cu_seqlens_padded"], item["num_segments"], length)
            weights = long_context_weights(
                self.config, item["loss_mask"], segments,
                short_logprobs=item["short_logprobs"], long_logprobs=item["long_logprobs"],
            )
            item["loss_weights"] = apply_weights(item["loss_weights"], weights)
        return item


def attach_scores(dataset, config):
    """`dataset` with its rows carrying the frozen scores of each prefix (`ScoredRows`).

    dataset: a `PackedDataset`, or Megatron's `BlendedDataset` of them (each member is wrapped
    with its own prefix's scores, in place); None passes through (an empty split). With
    dense/sparse/longce the rows' `loss_weights` include the long-context weights; with rho1
    they carry the reference's `long_logprobs` for the step-time scorer (`step_scorer`).
    """
    if dataset is None:
        return None
    weights = None if config.method == "rho1" else config
    members = getattr(dataset, "datasets", None)
    if members is None:
        return ScoredRows(dataset, TokenScores.open(dataset.dataset_path), weights)
    for i, member in enumerate(members):
        if not isinstance(member, ScoredRows):
            members[i] = ScoredRows(member, TokenScores.open(member.dataset_path), weights)
    return dataset


def with_scores(datasets, config):
    """`datasets` (a list, as `build_packed_datasets` returns) with the frozen scores attached
    when `config` (a LongContextConfig or None) reads them (frozen scorer, rho1)."""
    if config is None or not config.reads_scores:
        return datasets
    return [attach_scores(dataset, config) for dataset in datasets]
