"""Plain Megatron prefixes (a `.bin`/`.idx` pair without a sidecar) as text samples.

The prefixes are written with Megatron-Core's own `IndexedDatasetBuilder`, documents of one or
several sequences (Megatron-LM's `--split-sentences`) ending in an end-of-document token. The
oracle is the list of documents as written: rows come from `test_packed_dataset.reference_row`
over those documents, every token but a document's first a target, one task named after the
prefix.
"""
import os
import struct

import numpy as np
import pytest
from test_packed_dataset import (
    build,
    check_row_invariants,
    make_config,
    random_samples,
    reference_row,
    write_prefix,
)

from megatron_tokweight.data.plain_prefix import is_plain_prefix, sample_metadata
from megatron_tokweight.errors import ConfigError, DataFormatError

EOD, PAD, VOCAB = 1, 0, 500


def write_plain_prefix(prefix, documents, dtype=np.uint16):
    """Megatron's builder; each document a list of sequences (token lists)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for sequences in documents:
        tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]).astype(dtype)
        builder.add_document(tokens, [len(s) for s in sequences])
    builder.finalize(prefix + ".idx")
    return prefix


def random_documents(rng, num, max_length):
    """Documents ending in EOD; a third split into several sequences; one of just EOD."""
    documents = []
    for i in range(num):
        length = 1 if i == 3 else int(rng.integers(2, max_length + 1))
        tokens = list(rng.integers(2, VOCAB, size=length - 1)) + [EOD]
        cuts = sorted(rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False)) \
            if rng.random() < 0.35 and length > 2 else []
        documents.append([tokens[a:b] for a, b in zip([0, *cuts], [*cuts, length])])
    return documents


def joined(documents):
    return [[int(t) for s in doc for t in s] for doc in documents]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(11)
    documents = random_documents(rng, 120, 90)
    write_plain_prefix(str(root / "web"), documents)
    write_plain_prefix(str(root / "books"), random_documents(rng, 40, 30), dtype=np.int32)
    write_prefix(str(root / "sft"), random_samples(rng, 80, 50))  # prepared: sidecar, vocab 500, pad 0
    return root, documents


def test_metadata_comes_from_the_idx_documents(plain_dir):
    root, documents = plain_dir
    prefix = str(root / "web")
    assert is_plain_prefix(prefix) and not is_plain_prefix(str(root / "sft"))
    side = sample_metadata(prefix)
    docs = joined(documents)
    assert side.plain and side.task_names == ["web"] and side.tokenizer == {}
    assert side.lengths.tolist() == [len(d) for d in docs]
    assert side.n_answer.tolist() == [len(d) - 1 for d in docs]  # no label predicts the first token
    assert side.spans.tolist() == [[0, len(d)] for d in docs]
    assert side.task_id.tolist() == [0] * len(docs) and side.group_id.tolist() == list(range(len(docs)))
    side.check()  # a valid sidecar in every respect
    assert not os.path.exists(prefix + ".tokweight")  # nothing written next to the user's data


@pytest.mark.parametrize("algorithm, overlong", [("bfd", "truncate"), ("next-fit", "split")])
def test_rows_are_the_documents_as_text_samples(plain_dir, tmp_path, algorithm, overlong):
    root, documents = plain_dir
    docs = joined(documents)
    config = make_config([str(root / "web")], tmp_path, split="1,0,0", pad_id=PAD, weighting="molmo2",
                         pack_algorithm=algorithm, overlong=overlong)
    (train, *_) = build(config)
    buffer = np.array([t for d in docs for t in d], dtype=np.int64)
    lengths = np.array([len(d) for d in docs])
    pointers = np.cumsum(lengths) - lengths
    spans = np.array([[0, n] for n in lengths], dtype=np.int64)
    n = train.n_trained
    if overlong == "truncate":  # every target of the kept tokens: n = min(length, L) - 1
        assert n.tolist() == (np.minimum(lengths, 64) - 1).tolist()
    weights = np.where(n > 0, 4.0 / np.sqrt(np.maximum(n, 1)), 0.0)  # molmo2: "web" is no caption/pointing
    pieces, row_ptr = np.asarray(train.pack_index.pieces), np.asarray(train.pack_index.row_ptr)
    for idx in range(len(train)):
        item = train[idx]
        check_row_invariants(item, 64, PAD, 1)
        want = reference_row(buffer, pointers, np.zeros(len(docs), np.int64), np.arange(len(docs) + 1), spans,
                             np.zeros(len(docs), np.int16), pieces, row_ptr, int(train.shuffle_index[idx]), 64, PAD,
                             sample_weights=weights)
        for name in ("tokens", "labels", "position_ids", "sample_ids", "loss_mask", "cu_seqlens"):
            np.testing.assert_array_equal(item[name].numpy(), want[name], err_msg=name)
        np.testing.assert_allclose(item["loss_weights"].numpy(), want["loss_weights"], rtol=1e-6)
    assert train.pack_stats["empty"] == 1  # the document of only an end-of-document token


def test_blend_with_a_prepared_prefix_takes_its_tokenizer(plain_dir, tmp_path):
    import torch.distributed as dist

    root, _ = plain_dir
    prefixes = [str(root / "web"), str(root / "sft"), str(root / "books")]
    config = make_config(prefixes, tmp_path, weights=[0.4, 0.4, 0.2], split="1,0,0", weighting="molmo2")
    assert config.pad_id == PAD and config.tokenizer_spec["vocab_size"] == VOCAB  # the prepared prefix's
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        (train, *_) = build(config, sizes=(60, 0, 0))
    finally:
        dist.destroy_process_group()
    used = {int(train[i]["dataset_id"]) for i in range(len(train))}
    assert used == {0, 1, 2}
    web, sft, books = train.datasets
    assert web.sidecar.tokenizer == sft.sidecar.tokenizer and books.row_gather.token_buffer.dtype == np.int32
    assert web.sidecar.task_names == ["web"] and books.sidecar.task_names == ["books"]

    other = {"kind": "byte", "path": None, "vocab_size": 262, "pad_id": 256, "eod_id": 257}
    with pytest.raises(ConfigError, match="tokenizer.*a blend needs one tokenizer"):
        make_config(prefixes, tmp_path, weights=[1, 1, 1], plain_prefix_tokenizer=other)


def test_plain_prefix_alone_takes_the_tokenizer_as_an_option(plain_dir, tmp_path):
    root, _ = plain_dir
    prefix = str(root / "web")
    with pytest.raises(ConfigError, match="web have no sidecar naming a tokenizer; set .*plain_prefix_tokenizer"):
        make_config([prefix], tmp_path)
    byte = make_config([prefix], tmp_path, plain_prefix_tokenizer="byte", split="1,0,0")
    assert byte.pad_id == 256 and byte.tokenizer_spec["vocab_size"] == 262
    (train, *_) = build(make_config([prefix], tmp_path, pad_id=PAD, split="1,0,0", weighting="molmo2"))
    assert train.weighter.vocab_size is None  # sample weights need no vocabulary ...
    with pytest.raises(ConfigError, match="web: stop-token and frequency rules need the vocabulary size"):
        build(make_config([prefix], tmp_path, pad_id=PAD, split="1,0,0",
                          weighting={"preset": "molmo2", "stop_token_ids": {EOD: 0.5}}))


# ---- an .idx that does not describe its .bin ---------------------------------------------------

HEADER = struct.calcsize("<9sQBQQ")


def damaged(tmp_path, how):
    """A fresh copy of a small plain prefix with one defect."""
    prefix = str(tmp_path / "damaged")
    write_plain_prefix(prefix, [[[5, 6, 7, EOD]], [[8, 9], [10, EOD]], [[11, EOD]]])
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    idx = bytearray(open(idx_path, "rb").read())
    n_seq = 4  # sequences: 4, 2, 2, 2 tokens
    if how == "truncated bin":
        open(bin_path, "r+b").truncate(2 * 9)
    elif how == "longer bin":
        open(bin_path, "ab").write(b"\0\0\0\0")
    elif how == "pointer":
        struct.pack_into("<q", idx, HEADER + 4 * n_seq + 8 * 2, 14)  # sequence 2 starts at byte 12
    elif how == "negative length":
        struct.pack_into("<i", idx, HEADER + 4 * 1, -2)
    elif how == "documents":
        struct.pack_into("<q", idx, HEADER + 12 * n_seq + 8 * 3, 3)  # the last index must be 4
    open(idx_path, "wb").write(bytes(idx))
    return prefix


@pytest.mark.parametrize("how, message", [
    ("truncated bin", r"damaged.bin: truncated: 18 bytes, but .*damaged.idx describes 20 bytes"),
    ("longer bin", r"damaged.bin: longer than its index describes: 24 bytes, but .*damaged.idx describes 20"),
    ("pointer", r"damaged.idx: sequence 2: pointer 14 but the sequences before it end at byte 12 of .*damaged.bin"),
    ("negative length", r"damaged.idx: sequence 1: length -2 is negative"),
    ("documents", r"damaged.idx: document indices must run from 0 to its 4 sequences, run from 0 to 3"),
])
def test_idx_that_does_not_match_its_bin_is_refused(tmp_path, how, message):
    prefix = damaged(tmp_path, how)
    with pytest.raises(DataFormatError, match=message):
        sample_metadata(prefix)
    with pytest.raises(DataFormatError, match=message):  # the dataset checks before Megatron's reader
        build(make_config([prefix], tmp_path, pad_id=PAD, split="1,0,0"))


def test_undamaged_copy_reads(tmp_path):
    side = sample_metadata(damaged(tmp_path, "nothing"))
    assert side.lengths.tolist() == [4, 4, 2] and side.task_names == ["damaged"]


def test_metadata_is_shared_until_a_file_changes(tmp_path):
    prefix = write_plain_prefix(str(tmp_path / "shared"), [[[5, 6, EOD]], [[7, EOD]]])
    first = sample_metadata(prefix)
    assert sample_metadata(prefix) is first and not first.lengths.flags.writeable  # one copy per process
    open(prefix + ".bin", "r+b").truncate(4)  # a changed .bin is checked again, not served from memory
    with pytest.raises(DataFormatError, match="shared.bin: truncated: 4 bytes"):
        sample_metadata(prefix)
