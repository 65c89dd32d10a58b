"""PackedDataset and the C++ row gather against plain numpy / per-token references.

The oracle `reference_row` builds a packed row with plain numpy from a token buffer rebuilt
sample by sample through Megatron's own IndexedDataset reader; the dataset's rows, weights,
counts and cached indices are checked against it and against brute-force counts over rows.
"""
import json
import os
import pickle
import shutil
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tokweight.data.pack_index import build_pack_index, trained_targets
from megatron_tokweight.data.row_gather import RowGather
from megatron_tokweight.data.sidecar import write_sidecar
from megatron_tokweight.data.sidecar_builder import SampleMetadataBuilder
from megatron_tokweight.errors import ConfigError, DataFormatError

PAD = 0
KINDS = ("answer", "reasoning")


# ---- the oracle -----------------------------------------------------------------------------


def reference_row(token_buffer, sample_pointer, task_id, span_offsets, spans, span_kind, pieces, row_ptr, row,
                  seq_length, pad_id, cp_multiple=1, sample_weights=None):
    """A packed row built with plain numpy, one piece at a time (docs/ARCHITECTURE.md layout);
    loss_weights = the sample's weight (1 without `sample_weights`) on its targets."""
    L = seq_length
    out = {
        "tokens": np.full(L, pad_id, np.int64),
        "labels": np.full(L, pad_id, np.int64),
        "position_ids": np.zeros(L, np.int64),
        "sample_ids": np.full(L, -1, np.int64),
        "task_ids": np.full(L, -1, np.int64),
        "loss_mask": np.zeros(L, np.float32),
        "loss_weights": np.zeros(L, np.float32),
        "span_kinds": np.full(L, -1, np.int16),
    }
    cu, cu_padded, cursor, actual, first_pieces = [0], [0], 0, 0, 0
    for sample, start, length, _, offset in pieces[row_ptr[row]:row_ptr[row + 1]]:
        assert offset == cursor
        first = sample_pointer[sample] + start
        tokens = token_buffer[first:first + length]
        padded = -(-length // cp_multiple) * cp_multiple
        out["tokens"][cursor:cursor + length] = tokens
        out["labels"][cursor:cursor + length - 1] = tokens[1:]
        out["position_ids"][cursor:cursor + padded] = np.arange(padded)
        out["sample_ids"][cursor:cursor + length] = sample
        out["task_ids"][cursor:cursor + length] = task_id[sample]
        for q in range(span_offsets[sample], span_offsets[sample + 1]):
            targets = np.arange(max(spans[q, 0], start + 1), min(spans[q, 1], start + length))
            out["loss_mask"][cursor + targets - 1 - start] = 1.0
            weight = 1.0 if sample_weights is None else sample_weights[sample]
            out["loss_weights"][cursor + targets - 1 - start] = weight
            out["span_kinds"][cursor + targets - 1 - start] = span_kind[q]
        first_pieces += start == 0
        cursor += padded
        actual += length
        cu.append(actual)
        cu_padded.append(cursor)
    if cursor < L:
        out["position_ids"][cursor:] = np.arange(L - cursor)
        cu.append(actual + L - cursor)
        cu_padded.append(L)
    for name, bounds in (("cu_seqlens", cu), ("cu_seqlens_padded", cu_padded)):
        out[name] = np.full(L + 1, -1, np.int32)
        out[name][:len(bounds)] = bounds
    out["num_segments"] = len(cu) - 1
    out["max_seqlen"] = int(np.diff(cu_padded).max())
    out["num_samples"] = first_pieces
    return out


def trained_targets_brute_force(pieces, span_offsets, spans, num_samples):
    n = np.zeros(num_samples, np.int64)
    for sample, start, length, _, _ in pieces:
        for j in range(start + 1, start + length):
            n[sample] += any(a <= j < b for a, b in spans[span_offsets[sample]:span_offsets[sample + 1]])
    return n


# ---- data -------------------------------------------------------------------------------------


def random_samples(rng, num, max_length, vocab_size=500, tasks=("qa", "caption", "math")):
    """(tokens, task, group, spans) with sorted, non-overlapping spans of two kinds."""
    samples = []
    for _ in range(num):
        length = int(rng.integers(0, max_length + 1))
        tokens = rng.integers(2, vocab_size, size=length)
        num_cuts = min((length + 1) // 2 * 2, 2 * int(rng.integers(0, 3)))
        cuts = np.sort(rng.choice(np.arange(length + 1), size=num_cuts, replace=False))
        spans = [(int(a), int(b), KINDS[int(rng.integers(0, 2))]) for a, b in cuts.reshape(-1, 2) if a < b]
        group = int(rng.integers(0, num // 2 + 1)) if rng.random() < 0.5 else None
        samples.append((tokens, tasks[int(rng.integers(0, len(tasks)))], group, spans))
    return samples


def write_prefix(prefix, samples, dtype=np.uint16, vocab_size=500, pad_id=PAD):
    """An IndexedDataset (one document per sample) and its sidecar, written directly."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    meta = SampleMetadataBuilder()
    for tokens, task, group, spans in samples:
        builder.add_document(np.asarray(tokens, dtype=dtype), [len(tokens)])
        meta.add(len(tokens), task, group, spans)
    builder.finalize(prefix + ".idx")
    tokenizer = {"kind": "byte", "path": None, "vocab_size": vocab_size, "pad_id": pad_id, "eod_id": 1}
    write_sidecar(prefix, meta.build(tokenizer, np.dtype(dtype).name))
    return prefix


def rebuilt_buffer(prefix):
    """Every sample read through Megatron's IndexedDataset, concatenated, with element pointers."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tokweight.data.sidecar import read_sidecar

    indexed = IndexedDataset(prefix)
    parts = [np.asarray(indexed[i], dtype=np.int64) for i in range(len(indexed))]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return buffer, np.cumsum(lengths) - lengths, read_sidecar(prefix)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(7)
    write_prefix(str(root / "a"), random_samples(rng, 160, 90))
    write_prefix(str(root / "b"), random_samples(rng, 70, 40), dtype=np.int32)
    return root


def make_config(prefixes, cache, weights=None, split="8,2,0", seed=1234, **kwargs):
    from megatron_tokweight.data.packed_dataset import PackedDatasetConfig

    kwargs.setdefault("sequence_length", 64)
    return PackedDatasetConfig(random_seed=seed, blend=(list(prefixes), weights), split=split,
                               path_to_cache=str(cache), **kwargs)


def build(config, sizes=(None, None, None)):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_tokweight.data.packed_dataset import PackedDataset

    return BlendedMegatronDatasetBuilder(PackedDataset, list(sizes), lambda: True, config).build()


def reference_item(dataset, idx, reconstruction):
    buffer, pointers, side = reconstruction
    config = dataset.config
    return reference_row(buffer, pointers, side.task_id, side.span_offsets, side.spans, side.span_kind,
                         np.asarray(dataset.pack_index.pieces), np.asarray(dataset.pack_index.row_ptr),
                         int(dataset.shuffle_index[idx]), config.sequence_length, config.pad_id, config.cp_multiple)


ITEM_DTYPES = {"tokens": "int64", "labels": "int64", "loss_mask": "float32", "loss_weights": "float32",
               "position_ids": "int64", "cu_seqlens": "int32", "cu_seqlens_padded": "int32",
               "sample_ids": "int64", "task_ids": "int64", "num_segments": "int64", "max_seqlen": "int64",
               "num_samples": "int64"}


def check_row_invariants(item, L, pad_id, cp_multiple):
    """Layout rules that hold whatever the data: checked without the reference."""
    arrays = {k: v.numpy() for k, v in item.items() if k != "dataset_id"}
    segments = int(arrays["num_segments"])
    cu, cup = arrays["cu_seqlens"], arrays["cu_seqlens_padded"]
    assert cup[0] == 0 and cup[segments] == L and np.all(cup[segments + 1:] == -1) and np.all(cu[segments + 1:] == -1)
    assert np.all(np.diff(cup[:segments + 1]) > 0) and np.all(cup[:segments] % cp_multiple == 0)
    assert int(arrays["max_seqlen"]) == np.diff(cup[:segments + 1]).max()
    sample_ids, labels, tokens = arrays["sample_ids"], arrays["labels"], arrays["tokens"]
    for k in range(segments):
        lo, hi = cup[k], cup[k + 1]
        real = cu[k + 1] - cu[k]
        # positions restart at every boundary; the segment's real tokens are one sample
        assert np.array_equal(arrays["position_ids"][lo:hi], np.arange(hi - lo))
        ids = sample_ids[lo:hi]
        if ids[0] >= 0:
            assert np.all(ids[:real] == ids[0]) and np.all(ids[real:] == -1)
            # labels are the next token inside the segment; the last one predicts nothing
            assert np.array_equal(labels[lo:lo + real - 1], tokens[lo + 1:lo + real])
            assert labels[lo + real - 1] == pad_id
        else:
            assert k == segments - 1 and np.all(ids == -1), "only the tail segment is padding"
    assert np.all(arrays["loss_mask"][sample_ids < 0] == 0)
    assert np.all(arrays["loss_weights"][arrays["loss_mask"] == 0] == 0)
    assert np.all(tokens[sample_ids < 0] == pad_id) and np.all(arrays["task_ids"][sample_ids < 0] == -1)


# ---- the row gather ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num=st.integers(0, 30),
    max_length=st.integers(0, 70),
    seq_length=st.sampled_from([8, 16, 32]),
    cp=st.sampled_from([1, 2, 4]),
    algorithm=st.sampled_from(["bfd", "ffd", "next-fit"]),
    overlong=st.sampled_from(["truncate", "split", "drop"]),
    dtype=st.sampled_from([np.uint16, np.int32, np.int64]),
)
def test_rows_match_numpy_reference(seed, num, max_length, seq_length, cp, algorithm, overlong, dtype):
    rng = np.random.default_rng(seed)
    samples = random_samples(rng, num, max_length)
    builder = SampleMetadataBuilder()
    for tokens, task, group, spans in samples:
        builder.add(len(tokens), task, group, spans)
    side = builder.build({"kind": "byte", "pad_id": PAD}, "int32")
    lengths = side.lengths.astype(np.int64)
    buffer = np.concatenate([t for t, *_ in samples] + [np.zeros(0, np.int64)]).astype(dtype)
    pointers = np.cumsum(lengths) - lengths
    cp_multiple = 2 * cp if cp > 1 else 1
    # sample ids of the pieces are positions in a seeded order, as the dataset packs them
    order = rng.permutation(num).astype(np.int64)
    index, stats = build_pack_index(lengths[order], order, seq_length, algorithm, overlong, cp_multiple)
    weights = rng.random(num).astype(np.float32) if seed % 2 else None
    gather = RowGather(buffer, pointers, side.lengths, side.task_id, side.span_offsets, side.spans, side.span_kind,
                       index, seq_length, PAD, cp_multiple, sample_weights=weights)
    assert gather.num_rows == index.num_rows
    for r in range(index.num_rows):
        got = gather.gather(r)
        want = reference_row(buffer.astype(np.int64), pointers, side.task_id, side.span_offsets, side.spans,
                             side.span_kind, index.pieces, index.row_ptr, r, seq_length, PAD, cp_multiple, weights)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    # every token of every kept sample is placed once; lossy cases are counted
    over = lengths > seq_length
    placed = np.bincount(index.pieces[:, 0], weights=index.pieces[:, 2], minlength=num).astype(np.int64)
    expected = {"truncate": np.minimum(lengths, seq_length), "split": lengths,
                "drop": np.where(over, 0, lengths)}[overlong]
    np.testing.assert_array_equal(placed, expected)
    assert (stats.truncated, stats.split, stats.dropped) == tuple(
        int(over.sum()) if overlong == p else 0 for p in ("truncate", "split", "drop"))
    assert stats.zero_length == int((lengths == 0).sum())
    assert stats.real_tokens == int(expected.sum())
    np.testing.assert_array_equal(
        trained_targets(index.pieces, side.span_offsets, side.spans, num),
        trained_targets_brute_force(index.pieces, side.span_offsets, side.spans, num))


def _small_gather():
    builder = SampleMetadataBuilder()
    builder.add(5, "qa", None, [(2, 5, "answer")])
    builder.add(3, "qa", None, [])
    side = builder.build({"kind": "byte"}, "int32")
    buffer = np.arange(10, 18, dtype=np.int32)
    pointers = np.array([0, 5], np.int64)
    index, _ = build_pack_index(side.lengths, np.arange(2), 8)
    return buffer, pointers, side, index


@pytest.mark.parametrize("mutate, message", [
    (lambda p, r: p.__setitem__((0, 0), 2), "sample out of range"),
    (lambda p, r: p.__setitem__((0, 2), 9), "outside the sample"),
    (lambda p, r: p.__setitem__((1, 4), 7), "offset"),
    (lambda p, r: p.__setitem__((0, 3), 1), "belongs to row"),
    (lambda p, r: r.__setitem__(1, 5), "out of range of the pieces"),
])
def test_gather_rejects_bad_pieces(mutate, message):
    buffer, pointers, side, index = _small_gather()
    pieces, row_ptr = index.pieces.copy(), index.row_ptr.copy()
    mutate(pieces, row_ptr)
    gather = RowGather(buffer, pointers, side.lengths, side.task_id, side.span_offsets, side.spans, side.span_kind,
                       type(index)(pieces, row_ptr), 8, PAD)
    with pytest.raises(ValueError, match=message):
        gather.gather(0)


def test_gather_rejects_bad_buffers_and_rows():
    buffer, pointers, side, index = _small_gather()
    args = (side.lengths, side.task_id, side.span_offsets, side.spans, side.span_kind)

    def gather(buffer=buffer, index=index, seq_length=8, cp_multiple=1, spans=side.spans, weights=None):
        return RowGather(buffer, pointers, side.lengths, side.task_id, side.span_offsets, spans, side.span_kind,
                         index, seq_length, PAD, cp_multiple, weights)

    with pytest.raises(ValueError, match="token buffer"):
        gather(buffer[:6]).gather(0)
    with pytest.raises(ValueError, match="row 3 out of range"):
        gather().gather(3)
    with pytest.raises(ValueError, match="ends past the row length"):
        gather(seq_length=6).gather(0)
    with pytest.raises(ValueError, match="offset 5 but the previous piece ends at 8"):
        gather(cp_multiple=4).gather(0)
    alone = type(index)(np.array([[0, 0, 5, 0, 0]], np.int64), np.array([0, 1], np.int64))
    with pytest.raises(ValueError, match="padded to a multiple of 4 it ends past the row length 6"):
        gather(index=alone, seq_length=6, cp_multiple=4).gather(0)
    bad_spans = side.spans.copy()
    bad_spans[0] = (2, 9)
    with pytest.raises(ValueError, match="span 0"):
        gather(spans=bad_spans).gather(0)
    with pytest.raises(ValueError, match="sample_weight"):
        gather(weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="spans: expected int32"):
        gather(spans=side.spans.astype(np.float64))
    with pytest.raises(DataFormatError, match="token dtype int8"):
        RowGather(buffer.astype(np.int8), pointers, *args, index, 8, PAD)


# ---- the dataset ------------------------------------------------------------------------------


def test_items_match_reconstruction_from_bin(data_dir, tmp_path):
    prefix = str(data_dir / "a")
    train, valid, test = build(make_config([prefix], tmp_path, overlong="split"))
    assert test is None and len(train) > 0 and len(valid) > 0
    reconstruction = rebuilt_buffer(prefix)
    for dataset in (train, valid):
        seen = []
        for i in range(len(dataset)):
            item = dataset[i]
            assert set(item) == set(ITEM_DTYPES)
            assert {k: str(v.dtype).replace("torch.", "") for k, v in item.items()} == ITEM_DTYPES
            assert item["tokens"].shape == (64,) and item["cu_seqlens"].shape == (65,)
            want = reference_item(dataset, i, reconstruction)
            for name in set(ITEM_DTYPES) & set(want):
                np.testing.assert_array_equal(item[name].numpy(), want[name], err_msg=name)
            # no weighting: every target weighs 1
            np.testing.assert_array_equal(item["loss_weights"].numpy(), item["loss_mask"].numpy())
            check_row_invariants(item, 64, PAD, 1)
            seen.append(item["sample_ids"].numpy())
        seen = np.concatenate(seen)
        # one epoch: every sample of the split, whole (split policy), exactly once
        lengths = reconstruction[2].lengths
        counts = np.bincount(seen[seen >= 0], minlength=len(lengths))
        np.testing.assert_array_equal(counts[dataset.indices], lengths[dataset.indices])
        assert counts.sum() == lengths[dataset.indices].sum()
        assert sum(int(dataset[i]["num_samples"]) for i in range(len(dataset))) == \
            int((lengths[dataset.indices] > 0).sum())
    assert set(train.indices).isdisjoint(valid.indices)


def test_context_parallel_layout(data_dir, tmp_path):
    prefix = str(data_dir / "a")
    (train, *_) = build(make_config([prefix], tmp_path, context_parallel_size=2, split="1,0,0"))
    reconstruction = rebuilt_buffer(prefix)
    gaps = 0
    for i in range(len(train)):
        item = train[i]
        check_row_invariants(item, 64, PAD, 4)
        want = reference_item(train, i, reconstruction)
        for name in set(ITEM_DTYPES) & set(want):
            np.testing.assert_array_equal(item[name].numpy(), want[name], err_msg=name)
        segments = int(item["num_segments"])
        cu, cup = item["cu_seqlens"].numpy()[:segments + 1], item["cu_seqlens_padded"].numpy()[:segments + 1]
        real, padded = np.diff(cu), np.diff(cup)
        assert np.all(padded % 4 == 0) and np.all(real <= padded) and np.all(padded - real < 4)
        gaps += int((padded - real).sum())
    assert gaps > 0, "the data should need CP padding somewhere"
    with pytest.raises(ConfigError, match="multiple of 2 x context_parallel_size"):
        make_config([prefix], tmp_path, context_parallel_size=3)


@pytest.mark.parametrize("overlong, reasoning_factor", [("truncate", 2.0), ("split", 2.0), ("drop", 2.0),
                                                       ("split", None)])
def test_overlong_counts_and_n_after_truncation(data_dir, tmp_path, overlong, reasoning_factor):
    from megatron_tokweight.weighting import WeightingConfig

    prefix = str(data_dir / "a")
    # without a span weight there is no token rule: the weights come from the C++ gather alone
    span_weights = {"reasoning": reasoning_factor} if reasoning_factor else {}
    weighting = WeightingConfig(task_rules=(), default_rule="power:4", span_weights=span_weights,
                                annotation_exponent=0.5)
    (train, *_) = build(make_config([prefix], tmp_path, overlong=overlong, split="1,0,0", weighting=weighting))
    side = rebuilt_buffer(prefix)[2]
    lengths = side.lengths[train.indices]
    over = int((lengths > 64).sum())
    assert over > 0
    stats = train.pack_stats
    counted = {"truncate": "truncated", "split": "split", "drop": "dropped"}
    assert {k: stats[k] for k in counted.values()} == {k: over * (p == overlong) for p, k in counted.items()}

    items = [train[i] for i in range(len(train))]
    sample_ids = np.concatenate([it["sample_ids"].numpy() for it in items])
    mask = np.concatenate([it["loss_mask"].numpy() for it in items])
    weights = np.concatenate([it["loss_weights"].numpy() for it in items])
    rows = [train.gather_row(int(train.shuffle_index[i])) for i in range(len(train))]
    kinds = np.concatenate([row["span_kinds"] for row in rows])
    # n as trained: loss tokens per sample over the whole epoch (all fragments together)
    n_rows = np.bincount(sample_ids[mask > 0], minlength=len(side.lengths))
    np.testing.assert_array_equal(train.n_trained, n_rows)
    if overlong != "drop":
        assert np.any(n_rows < side.n_answer), "some sample must lose targets to packing"
    kept = np.ones(len(side.lengths), bool)
    kept[train.indices[side.lengths[train.indices] > 64]] = overlong != "drop"
    assert stats["empty"] == int(((n_rows == 0) & kept).sum())
    on = mask > 0
    factor = np.where(kinds[on] == KINDS.index("reasoning"), reasoning_factor or 1.0, 1.0)
    annotations = np.bincount(side.group_id)[side.group_id]  # K of each sample's input
    assert annotations.max() > 1
    owner = sample_ids[on]
    expected = 4.0 / np.sqrt(n_rows[owner]) / np.sqrt(annotations[owner]) * factor
    np.testing.assert_allclose(weights[on], expected, rtol=1e-6)
    assert np.all(weights[~on] == 0)


def test_blend_adds_dataset_id(data_dir, tmp_path):
    import torch.distributed as dist

    prefixes = [str(data_dir / "a"), str(data_dir / "b")]
    # Megatron's BlendedDataset asks for the rank whenever it writes a cache: one gloo rank
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        (train, *_) = build(make_config(prefixes, tmp_path, weights=[0.3, 0.7], split="1,0,0"), sizes=(60, 0, 0))
    finally:
        dist.destroy_process_group()
    assert len(train) == 60
    reconstructions = [rebuilt_buffer(p) for p in prefixes]
    used = set()
    for i in range(len(train)):
        item = train[i]
        d = int(item["dataset_id"])
        used.add(d)
        source = train.datasets[d]
        want = reference_item(source, int(train.dataset_sample_index[i]), reconstructions[d])
        np.testing.assert_array_equal(item["tokens"].numpy(), want["tokens"])
        np.testing.assert_array_equal(item["loss_mask"].numpy(), want["loss_mask"])
    assert used == {0, 1}
    assert train.datasets[1].row_gather.token_buffer.dtype == np.int32


def test_num_samples_spans_epochs(data_dir, tmp_path):
    prefix = str(data_dir / "b")
    (train, *_) = build(make_config([prefix], tmp_path, split="1,0,0"), sizes=(None, 0, 0))
    rows = len(train)
    (longer, *_) = build(make_config([prefix], tmp_path, split="1,0,0"), sizes=(2 * rows + 1, 0, 0))
    assert longer.pack_stats["epochs"] == 3 and len(longer) == 3 * rows
    order = np.asarray(longer.shuffle_index)
    for epoch in range(3):  # each epoch visits every row once
        assert sorted(order[epoch * rows:(epoch + 1) * rows]) == list(range(rows))


def _cache_files(directory):
    return {name: os.path.getmtime(os.path.join(directory, name))
            for name in os.listdir(directory) if not name.endswith(".lock")}


def test_cache_built_once_reused_and_keyed(data_dir, tmp_path):
    prefix = str(data_dir / "a")
    cache = tmp_path / "cache"
    (first, *_) = build(make_config([prefix], cache, split="1,0,0"))
    assert not first.cache_hit
    files = _cache_files(cache)
    assert len(files) == 5
    # reused: memory-mapped, nothing rewritten, same rows
    (again, *_) = build(make_config([prefix], cache, split="1,0,0"))
    assert again.cache_hit and isinstance(again.pack_index.pieces, np.memmap)
    assert isinstance(again.shuffle_index, np.memmap)
    assert _cache_files(cache) == files
    rows_first = [first[i]["tokens"].numpy() for i in range(len(first))]
    assert all(np.array_equal(again[i]["tokens"].numpy(), rows_first[i]) for i in range(len(again)))
    # keyed: a setting that changes the index builds new files
    for change in ({"overlong": "split"}, {"pack_algorithm": "ffd"}, {"sequence_length": 128}, {"seed": 99}):
        (other, *_) = build(make_config([prefix], cache, split="1,0,0", **change))
        assert not other.cache_hit, change
    assert len(_cache_files(cache)) == 5 * 5
    # weighting does not change the index: a hit
    (weighted, *_) = build(make_config([prefix], cache, split="1,0,0", weighting="molmo2"))
    assert weighted.cache_hit
    description = next(n for n in files if n.endswith("description.txt"))
    assert json.loads((cache / description).read_text())["pack_algorithm"] == "bfd"
    # from scratch after a restart: the same index gives the same row
    shutil.rmtree(cache)
    (scratch, *_) = build(make_config([prefix], cache, split="1,0,0"))
    assert not scratch.cache_hit
    assert all(np.array_equal(scratch[i]["tokens"].numpy(), rows_first[i]) for i in range(len(scratch)))
    (reseeded, *_) = build(make_config([prefix], tmp_path / "c2", split="1,0,0", seed=99))
    assert not np.array_equal(np.asarray(reseeded.shuffle_index), np.asarray(scratch.shuffle_index))


def test_concurrent_builders_build_once(data_dir, tmp_path, monkeypatch):
    import time

    from megatron_tokweight.data.packed_dataset import PackedDataset

    build_and_save = PackedDataset._build_and_save

    def slow_build(self, paths):  # long enough for every thread to reach the cache check meanwhile
        time.sleep(0.5)
        return build_and_save(self, paths)

    monkeypatch.setattr(PackedDataset, "_build_and_save", slow_build)

    prefix = str(data_dir / "b")
    config = make_config([prefix], tmp_path, split="1,0,0")
    low = PackedDataset.build_low_level_dataset(prefix, config)
    from megatron.core.datasets.utils import Split

    results = []

    def construct():
        results.append(PackedDataset(low, prefix, np.arange(len(low), dtype=np.int32), None, Split.train, config))

    threads = [threading.Thread(target=construct) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.cache_hit for d in results) == [False, True, True]
    assert all(np.array_equal(np.asarray(d.shuffle_index), np.asarray(results[0].shuffle_index)) for d in results)


def _construct_on_rank(rank, world_size, prefix, cache):
    import time

    import torch.distributed as dist
    from megatron.core.datasets.utils import Split

    from megatron_tokweight.data.packed_dataset import PackedDataset

    build_and_save = PackedDataset._build_and_save

    def slow_build(self, paths):  # long enough for every process to reach the cache check meanwhile
        time.sleep(1.0)
        return build_and_save(self, paths)

    PackedDataset._build_and_save = slow_build
    config = make_config([prefix], cache, split="1,0,0")
    low = PackedDataset.build_low_level_dataset(prefix, config)
    dist.barrier()  # every process reaches the cache check at once
    # constructed directly: Megatron's builder would build on rank 0 first and make the others
    # wait at a barrier; independent processes (jobs sharing a cache) rely on the file lock alone
    dataset = PackedDataset(low, prefix, np.arange(len(low), dtype=np.int32), None, Split.train, config)
    return dataset.cache_hit, np.asarray(dataset.shuffle_index).tolist(), np.asarray(dataset.pack_index.pieces).tolist()


@pytest.mark.distributed
def test_concurrent_processes_build_once(data_dir, tmp_path):
    """Three processes sharing one cache: the file lock lets one build, the others map its
    files; all read the same index, the one a lone build gives."""
    from megatron_tokweight.trainer.spawn import spawn

    prefix = str(data_dir / "b")
    results = spawn(_construct_on_rank, 3, prefix, str(tmp_path / "cache"))
    assert sorted(hit for hit, _, _ in results) == [False, True, True]
    assert all(r[1:] == results[0][1:] for r in results)
    (alone, *_) = build(make_config([prefix], tmp_path / "alone", split="1,0,0"))
    assert results[0][1] == np.asarray(alone.shuffle_index).tolist()
    assert results[0][2] == np.asarray(alone.pack_index.pieces).tolist()


def test_pickled_dataset_reads_the_same_rows(data_dir, tmp_path):
    (train, *_) = build(make_config([str(data_dir / "b")], tmp_path, split="1,0,0", weighting="molmo2"))
    want = train[3]
    clone = pickle.loads(pickle.dumps(train))
    got = clone[3]
    for name in ITEM_DTYPES:
        assert np.array_equal(got[name].numpy(), want[name].numpy()), name
    with pytest.raises(IndexError):
        train[len(train)]


def test_config_validation(data_dir, tmp_path):
    prefix = str(data_dir / "a")
    with pytest.raises(ConfigError, match="pack algorithm"):
        make_config([prefix], tmp_path, pack_algorithm="worst-fit")
    with pytest.raises(ConfigError, match="overlong policy"):
        make_config([prefix], tmp_path, overlong="wrap")
    with pytest.raises(ConfigError, match="context_parallel_size"):
        make_config([prefix], tmp_path, context_parallel_size=0)
    with pytest.raises(ConfigError, match="weighting must be"):
        make_config([prefix], tmp_path, weighting=3)
    with pytest.raises(ConfigError, match="fast_cache_load"):
        make_config([prefix], tmp_path, defer_npy_index_mmap=True)
    with pytest.raises(ConfigError, match="pad_id"):
        make_config([prefix], tmp_path, pad_id=500)
    with pytest.raises(ConfigError, match="needs data"):
        from megatron_tokweight.data.packed_dataset import PackedDatasetConfig

        PackedDatasetConfig(random_seed=1, sequence_length=64)
    with pytest.raises(DataFormatError, match="no sidecar"):
        make_config([str(tmp_path / "missing")], tmp_path)
    other = write_prefix(str(tmp_path / "v"), random_samples(np.random.default_rng(0), 5, 10), vocab_size=300)
    with pytest.raises(ConfigError, match="tokenized differently"):
        make_config([prefix, other], tmp_path, weights=[0.5, 0.5])
    assert make_config([prefix], tmp_path).pad_id == PAD
    assert make_config([prefix], tmp_path, pad_id=3).pad_id == 3
