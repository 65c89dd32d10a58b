"""Sidecar arrays: write/read round trip, internal checks, and validation against .bin/.idx."""
import dataclasses
import json
import os

import numpy as np
import pytest

from megatron_tokweight.data.indexed_validation import validate_against_indexed_dataset
from megatron_tokweight.data.sidecar import (
    SampleMetadata,
    count_targets,
    read_sidecar,
    sidecar_dir,
    write_sidecar,
)
from megatron_tokweight.data.sidecar_builder import SampleMetadataBuilder
from megatron_tokweight.data.tokenizer import ByteTokenizer
from megatron_tokweight.errors import DataFormatError


def hand_metadata(**changes) -> SampleMetadata:
    """3 samples of 5, 8, 3 tokens; n by hand: [1,5) -> 4; [0,3) -> 2 (position 0 is no target) + [3,6) -> 3; none."""
    fields = dict(
        lengths=np.array([5, 8, 3], np.int32),
        task_id=np.array([0, 1, 0], np.int32),
        group_id=np.array([0, 0, 1], np.int64),
        n_answer=np.array([4, 5, 0], np.int32),
        span_offsets=np.array([0, 1, 3, 3], np.int64),
        spans=np.array([[1, 5], [0, 3], [3, 6]], np.int32),
        span_kind=np.array([0, 1, 0], np.int16),
        task_names=["a", "b"],
        span_kinds=["answer", "rationale"],
        tokenizer=ByteTokenizer().spec(),
        token_dtype="uint16",
        counts={"empty_answer": 1},
    )
    fields.update(changes)
    return SampleMetadata(**fields)


def test_count_targets():
    assert count_targets([(1, 5)]) == 4
    assert count_targets([(0, 3), (3, 6)]) == 5
    assert count_targets([(0, 1)]) == 0
    assert count_targets(np.zeros((0, 2), np.int32)) == 0


def test_builder_matches_hand_metadata():
    b = SampleMetadataBuilder()
    assert b.add(5, "a", ("s", "q1"), [(1, 5, "answer")]) == 4
    assert b.add(8, "b", ("s", "q1"), [(0, 3, "rationale"), (3, 6, "answer")]) == 5
    assert b.add(3, "a", None, []) == 0
    built = b.build(ByteTokenizer().spec(), "uint16", counts={"empty_answer": 1})
    ref = hand_metadata()
    for name in ("lengths", "task_id", "group_id", "n_answer", "span_offsets", "spans", "span_kind"):
        np.testing.assert_array_equal(getattr(built, name), getattr(ref, name), err_msg=name)
        assert getattr(built, name).dtype == getattr(ref, name).dtype
    assert built.meta() == ref.meta()
    built.check()


def test_write_read_round_trip(tmp_path):
    prefix = tmp_path / "sub" / "data"
    md = hand_metadata(source="in.jsonl")
    assert write_sidecar(prefix, md) == str(prefix) + ".tokweight"
    for mmap in (True, False):
        back = read_sidecar(prefix, mmap=mmap)
        assert isinstance(back.spans, np.memmap) == mmap
        assert back.meta() == md.meta()
        np.testing.assert_array_equal(back.spans, md.spans)
        np.testing.assert_array_equal(back.group_id, md.group_id)
        s, k = back.sample_spans(1)
        np.testing.assert_array_equal(s, [[0, 3], [3, 6]])
        np.testing.assert_array_equal(k, [1, 0])
    # overwrite in place: the new content replaces the old, nothing temporary is left behind
    write_sidecar(prefix, hand_metadata(task_names=["x", "y"]))
    assert read_sidecar(prefix).task_names == ["x", "y"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["data.tokweight"]


BAD_VALUES = [
    (dict(spans=np.array([[1, 6], [0, 3], [3, 6]], np.int32)), "spans.npy: sample 0, span 0: span ends past"),
    (dict(spans=np.array([[1, 5], [0, 4], [3, 6]], np.int32)), "sample 1, span 1: span overlaps"),
    (dict(spans=np.array([[1, 5], [3, 3], [3, 6]], np.int32)), "sample 1, span 0: span is empty"),
    (dict(span_offsets=np.array([0, 2, 1, 3], np.int64)), "span_offsets.npy: sample 1: offsets decrease"),
    (dict(span_offsets=np.array([0, 1, 3, 2], np.int64)), "span_offsets.npy: must run from 0"),
    (dict(task_id=np.array([0, 2, 0], np.int32)), "task_id.npy: sample 1: task id outside [0, 2)"),
    (dict(span_kind=np.array([0, 1, 2], np.int16)), "span_kind.npy: sample 1, span 1: span kind outside"),
    (dict(n_answer=np.array([4, 6, 0], np.int32)), "n_answer.npy: sample 1: n_answer differs"),
    (dict(group_id=np.array([0, -1, 1], np.int64)), "group_id.npy: sample 1: negative"),
    (dict(span_kinds=["rationale", "answer"]), "span_kinds must start with 'answer'"),
    (dict(task_names=["a", "a"]), "task_names has duplicates"),
]


@pytest.mark.parametrize("changes,message", BAD_VALUES)
def test_check_names_file_and_sample(tmp_path, changes, message):
    md = hand_metadata(**changes)
    with pytest.raises(DataFormatError) as err:
        md.check()
    assert message in str(err.value)
    with pytest.raises(DataFormatError):
        write_sidecar(tmp_path / "d", md)  # never written when inconsistent
    assert os.listdir(tmp_path) == []


def test_shapes_and_dtypes_checked():
    with pytest.raises(DataFormatError, match=r"lengths.npy: expected int32"):
        hand_metadata(lengths=np.array([5, 8, 3], np.int64))
    with pytest.raises(DataFormatError, match=r"task_id.npy has 2 entries"):
        hand_metadata(task_id=np.array([0, 1], np.int32))
    with pytest.raises(DataFormatError, match=r"span_offsets.npy has 3 entries, expected 4"):
        hand_metadata(span_offsets=np.array([0, 1, 3], np.int64))


def test_read_sidecar_errors(tmp_path):
    prefix = tmp_path / "d"
    with pytest.raises(DataFormatError, match=r"d.tokweight/meta.json not found.*tokweight prepare"):
        read_sidecar(prefix)
    write_sidecar(prefix, hand_metadata())
    meta_path = tmp_path / "d.tokweight" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "num_samples": 4}))
    with pytest.raises(DataFormatError, match="num_samples 4 but lengths.npy has 3"):
        read_sidecar(prefix)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataFormatError, match="format_version 99"):
        read_sidecar(prefix)
    meta_path.write_text(json.dumps(meta))
    spans = tmp_path / "d.tokweight" / "spans.npy"
    spans.write_bytes(spans.read_bytes()[:-4])
    with pytest.raises(DataFormatError, match="spans.npy: unreadable or truncated"):
        read_sidecar(prefix, mmap=False)
    spans.unlink()
    with pytest.raises(DataFormatError, match="spans.npy not found"):
        read_sidecar(prefix)


# ---- against a Megatron IndexedDataset ------------------------------------------------------

def write_dataset(prefix, lengths, dtype=np.uint16, vocab=262, seed=0):
    """Random tokens written with Megatron's own builder; returns the token arrays."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, n).astype(dtype) for n in lengths]
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return docs


def answer_metadata(lengths, token_dtype="uint16"):
    """Each sample trains on its second half."""
    b = SampleMetadataBuilder()
    for n in lengths:
        b.add(n, "t", None, [(n // 2, n, "answer")])
    return b.build(ByteTokenizer().spec(), token_dtype)


LENGTHS = [7, 12, 3, 30, 9]


def test_validate_ok_and_token_check(tmp_path):
    prefix = tmp_path / "ds"
    write_dataset(prefix, LENGTHS)
    write_sidecar(prefix, answer_metadata(LENGTHS))
    md = validate_against_indexed_dataset(prefix, check_token_ids=True)
    np.testing.assert_array_equal(md.lengths, LENGTHS)
    np.testing.assert_array_equal(md.n_answer, [n - max(n // 2, 1) for n in LENGTHS])

    write_dataset(prefix, LENGTHS, vocab=300, seed=1)  # ids beyond the byte vocabulary
    validate_against_indexed_dataset(prefix)  # structure alone is fine
    with pytest.raises(DataFormatError, match=r"ds.bin: sample \d+: token id \d+ outside the tokenizer's vocabulary of 262"):
        validate_against_indexed_dataset(prefix, check_token_ids=True)


def test_validate_catches_truncated_or_mismatched_files(tmp_path):
    prefix = tmp_path / "ds"
    bin_path, idx_path = tmp_path / "ds.bin", tmp_path / "ds.idx"
    write_dataset(prefix, LENGTHS)
    write_sidecar(prefix, answer_metadata(LENGTHS))
    good_bin, good_idx = bin_path.read_bytes(), idx_path.read_bytes()
    total = 2 * sum(LENGTHS)

    bin_path.write_bytes(good_bin[:-6])
    with pytest.raises(DataFormatError, match=rf"ds.bin: truncated: {total - 6} bytes, but .*ds.idx describes {total} bytes"):
        validate_against_indexed_dataset(prefix)
    bin_path.write_bytes(good_bin + b"\0\0")
    with pytest.raises(DataFormatError, match="longer than its index"):
        validate_against_indexed_dataset(prefix)
    bin_path.write_bytes(b"")
    with pytest.raises(DataFormatError, match="ds.bin: empty, but .*lists 5 sequences"):
        validate_against_indexed_dataset(prefix)
    bin_path.unlink()
    with pytest.raises(DataFormatError, match="ds.bin not found"):
        validate_against_indexed_dataset(prefix)
    bin_path.write_bytes(good_bin)

    idx_path.write_bytes(good_idx[:-8])
    with pytest.raises(DataFormatError, match="ds.idx: truncated"):
        validate_against_indexed_dataset(prefix)
    idx_path.write_bytes(b"NOTANIDX" + good_idx[8:])
    with pytest.raises(DataFormatError, match="not a Megatron IndexedDataset index"):
        validate_against_indexed_dataset(prefix)
    idx_path.write_bytes(good_idx)
    validate_against_indexed_dataset(prefix)

    # a sidecar from another run: other sample count, then same count but other lengths
    write_sidecar(prefix, answer_metadata(LENGTHS[:-1]))
    with pytest.raises(DataFormatError, match="4 samples but .*ds.idx has 5 sequences"):
        validate_against_indexed_dataset(prefix)
    other = list(LENGTHS)
    other[3] += 1
    write_sidecar(prefix, answer_metadata(other))
    with pytest.raises(DataFormatError, match=r"lengths.npy: sample 3: length differs from .*ds.idx \(value 31\)"):
        validate_against_indexed_dataset(prefix)
    write_sidecar(prefix, answer_metadata(LENGTHS, token_dtype="int32"))
    with pytest.raises(DataFormatError, match="token_dtype int32 but .*uint16"):
        validate_against_indexed_dataset(prefix)
    # a sidecar whose values are broken is caught too (written around write_sidecar's own check)
    write_sidecar(prefix, answer_metadata(LENGTHS))
    spans_path = sidecar_dir(prefix) + "/spans.npy"
    spans = np.load(spans_path)
    spans[4] = [5, 10]
    np.save(spans_path, spans)
    with pytest.raises(DataFormatError, match="spans.npy: sample 4, span 0: span ends past"):
        validate_against_indexed_dataset(prefix)


def test_dataclass_replace_keeps_validation():
    md = hand_metadata()
    with pytest.raises(DataFormatError, match="spans.npy: expected int32"):
        dataclasses.replace(md, spans=md.spans.astype(np.int64))
