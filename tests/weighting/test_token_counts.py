"""Token-id counting (C++) against np.bincount, on arrays, memmaps and a real IndexedDataset."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.weighting import _counting
from megatron_tokweight.weighting.token_counts import (
    count_token_ids,
    count_token_ids_in_dataset,
)


@settings(max_examples=60, deadline=None)
@given(
    vocab_size=st.integers(1, 70000),
    ids=st.lists(st.integers(0, 2**16 - 1), max_size=300),
    dtype=st.sampled_from([np.uint16, np.int32, np.int64, np.uint8, np.uint32]),
)
def test_count_matches_bincount(vocab_size, ids, dtype):
    info = np.iinfo(dtype)
    tokens = np.array([i % min(vocab_size, int(info.max) + 1) for i in ids], dtype=dtype)
    expected = np.bincount(tokens.astype(np.int64), minlength=vocab_size)
    counts = count_token_ids(tokens, vocab_size)
    assert counts.dtype == np.int64 and counts.shape == (vocab_size,)
    np.testing.assert_array_equal(counts, expected)


def test_large_buffer_2d_and_noncontiguous():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, size=(1000, 300)).astype(np.int32)
    expected = np.bincount(tokens.ravel(), minlength=50000)
    np.testing.assert_array_equal(count_token_ids(tokens, 50000), expected)
    strided = tokens[:, ::3]
    np.testing.assert_array_equal(count_token_ids(strided, 50000), np.bincount(strided.ravel(), minlength=50000))


def test_memmap(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "tokens.bin"
    rng.integers(0, 30000, size=100_000).astype(np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    np.testing.assert_array_equal(count_token_ids(tokens, 30000), np.bincount(tokens, minlength=30000))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_out_of_range_ids_name_position_and_id(dtype):
    with pytest.raises(DataFormatError, match=r"token position 2: id 7 is outside \[0, 7\)"):
        count_token_ids(np.array([0, 6, 7, 1], dtype=dtype), 7)
    with pytest.raises(DataFormatError, match=r"token position 1: id -3 is outside \[0, 7\)"):
        count_token_ids(np.array([0, -3, 9], dtype=dtype), 7)
    with pytest.raises(DataFormatError, match=r"token position 0: id 9"):
        count_token_ids(np.array([9], dtype=np.uint16), 7)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="vocab_size"):
        count_token_ids(np.array([0], dtype=np.int32), 0)
    with pytest.raises(DataFormatError, match="integer dtype"):
        count_token_ids(np.array([0.0]), 4)
    with pytest.raises(TypeError):  # the C++ never converts silently
        _counting.count_token_ids_int32(np.array([1], dtype=np.int64), 4)
    with pytest.raises(ValueError, match="vocab_size"):
        _counting.count_token_ids_int32(np.array([1], dtype=np.int32), 0)


def _write_indexed_dataset(prefix, documents, dtype):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_count_in_indexed_dataset(tmp_path, dtype):
    rng = np.random.default_rng(2)
    documents = [rng.integers(0, 1000, size=n).tolist() for n in (5, 0, 17, 1, 300)]
    prefix = tmp_path / "data"
    _write_indexed_dataset(prefix, documents, dtype)
    expected = np.bincount(np.concatenate([np.array(d, dtype=np.int64) for d in documents]), minlength=1000)
    np.testing.assert_array_equal(count_token_ids_in_dataset(prefix, 1000), expected)


def test_indexed_dataset_errors(tmp_path):
    prefix = tmp_path / "data"
    _write_indexed_dataset(prefix, [[1, 2, 3], [4, 5, 99, 6]], np.int32)
    with pytest.raises(DataFormatError, match=r"data\.bin: sample 1, token 2: id 99 is outside \[0, 50\)"):
        count_token_ids_in_dataset(prefix, 50)
    with pytest.raises(DataFormatError, match="no IndexedDataset"):
        count_token_ids_in_dataset(tmp_path / "missing", 50)
    # A .bin cut short of what its .idx describes.
    data = (tmp_path / "data.bin").read_bytes()
    (tmp_path / "data.bin").write_bytes(data[:-8])
    with pytest.raises(DataFormatError, match="fewer than the 7 tokens"):
        count_token_ids_in_dataset(prefix, 200)
