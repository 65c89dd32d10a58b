"""A dataset is all old or all new, its files are the ones its sidecar describes, and a damaged
cache says which file and what to do: content checks that shapes alone cannot make."""
import os
import shutil

import numpy as np
import pytest

from megatron_tokweight.data.content_identity import dataset_identity
from megatron_tokweight.data.indexed_validation import validate_against_indexed_dataset
from megatron_tokweight.data.prepare import prepare_jsonl
from megatron_tokweight.errors import DataFormatError


def texts(letters, count=12):
    """{"text"} records whose lengths depend only on `count`: two sets of letters give two
    datasets of identical shape (lengths, sample count, .bin size) and different tokens."""
    return [{"text": letters[i % len(letters)] * (3 + i)} for i in range(count)]


def test_a_bin_swapped_for_another_of_the_same_size_is_refused(tmp_path, prepared_prefix):
    a = prepared_prefix(tmp_path, "a", texts("xy"))
    b = prepared_prefix(tmp_path, "b", texts("uv"))
    assert os.path.getsize(a + ".bin") == os.path.getsize(b + ".bin")
    validate_against_indexed_dataset(a, check_token_ids=True)  # as prepared: fine
    shutil.copyfile(b + ".bin", a + ".bin")
    with pytest.raises(DataFormatError, match=rf"{a}.bin is not the file .* was prepared with .* prepare {a} again"):
        validate_against_indexed_dataset(a, check_token_ids=True)


def test_an_interrupted_prepare_leaves_no_dataset_that_validates(tmp_path, prepared_prefix, monkeypatch):
    """The sidecar is renamed into place before .idx and .bin: a death between the renames left
    new metadata over old tokens, and every check passed."""
    import megatron_tokweight.common.files as files

    prefix = prepared_prefix(tmp_path, "ds", texts("ab"))
    (tmp_path / "new.jsonl").write_text("".join(f'{{"text": "{r["text"].upper()}"}}\n' for r in texts("ab")))
    renames = []
    real = files.replace_path

    def dies_after_the_sidecar(tmp, final):
        if renames:
            raise KeyboardInterrupt  # the process dies here
        renames.append(final)
        real(tmp, final)

    monkeypatch.setattr(files, "replace_path", dies_after_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        prepare_jsonl(tmp_path / "new.jsonl", prefix)
    monkeypatch.undo()
    assert renames == [prefix + ".tokweight"]  # new sidecar, old .bin / .idx
    with pytest.raises(DataFormatError, match="was interrupted between its renames"):
        validate_against_indexed_dataset(prefix, check_token_ids=True)
    # leftovers of the interrupted run: none
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.jsonl", "ds.tokweight", "new.jsonl"]


def test_identity_follows_content_not_path(tmp_path, prepared_prefix):
    a = prepared_prefix(tmp_path, "a", texts("xy"))
    for suffix in (".bin", ".idx", ".tokweight"):
        copy = shutil.copytree if suffix == ".tokweight" else shutil.copyfile
        copy(a + suffix, str(tmp_path / "moved") + suffix)
    assert dataset_identity(str(tmp_path / "moved")) == dataset_identity(a)
    b = prepared_prefix(tmp_path, "b", texts("xz"))
    assert dataset_identity(b) != dataset_identity(a)


def test_a_damaged_index_cache_names_the_file_and_the_fix(tmp_path, prepared_prefix):
    from megatron_tokweight.data.packed_dataset import (
        PackedDatasetConfig,
        build_packed_datasets,
    )

    prefix = prepared_prefix(tmp_path, "ds", texts("ab", 40))
    config = PackedDatasetConfig(random_seed=1, sequence_length=32, blend=([prefix], None), split="1,0,0",
                                 path_to_cache=str(tmp_path / "cache"))
    train = build_packed_datasets(config, [None, None, None])[0]
    want = train[0]["tokens"]
    caches = sorted(os.listdir(tmp_path / "cache"))
    for name, damage in (("pieces.npy", lambda p: open(p, "r+b").truncate(100)),
                         ("pack_stats.json", lambda p: open(p, "w").write("{\"rows\": ")),
                         ("shuffle_index.npy", lambda p: np.save(p, np.array([10**6])))):
        path = str(tmp_path / "cache" / next(c for c in caches if c.endswith(name)))
        saved = open(path, "rb").read()
        damage(path)
        with pytest.raises(DataFormatError, match=rf"{path}: damaged index cache .* delete the files .* rebuilt"):
            build_packed_datasets(config, [None, None, None])
        with open(path, "wb") as f:
            f.write(saved)
    assert np.array_equal(build_packed_datasets(config, [None, None, None])[0][0]["tokens"], want)
