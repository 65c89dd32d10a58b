"""The Megatron-LM datasets provider on plain Megatron prefixes (`.bin`/`.idx`, no sidecar)."""
import numpy as np
import pytest
from test_megatron_hooks import megatron_args

from megatron_tokweight.errors import ConfigError

EOD = 257


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, prepared_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("provider-plain")
    sft = prepared_prefix(root, "sft", [{"prompt": "q" * (1 + i % 7), "response": "a" * (1 + i % 5), "task": "qa"}
                                        for i in range(50)])
    rng = np.random.default_rng(4)
    documents = []
    builder = IndexedDatasetBuilder(str(root / "web.bin"), dtype=np.uint16)
    for i in range(60):
        sequences = [list(rng.integers(0, 256, size=int(rng.integers(1, 12)))) for _ in range(1 + i % 2)]
        sequences[-1].append(EOD)
        documents.append([int(t) for s in sequences for t in s])
        builder.add_document(np.concatenate(sequences).astype(np.uint16), [len(s) for s in sequences])
    builder.finalize(str(root / "web.idx"))
    return str(root / "web"), sft, documents


def test_plain_prefix_blended_through_the_provider(prefixes):
    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.megatron.datasets_provider import (
        packed_dataset_config_from_args,
        report_names,
    )

    web, sft, documents = prefixes
    config = packed_dataset_config_from_args(megatron_args(
        ["--data-path", "50", web, "50", sft, "--split", "100,0,0", "--seq-length", "48",
         "--token-weighting-preset", "molmo2"]))
    assert config.pad_id == 256  # the prepared prefix's byte tokenizer
    assert report_names(config) == ((), ("web", "sft"))  # tasks differ (web, qa): per-dataset reports
    train, _, _ = build_packed_datasets(config, [40, 0, 0])
    web_rows = 0
    for i in range(len(train)):
        row = train[i]
        if int(row["dataset_id"]) != 0:
            continue
        web_rows += 1
        tokens, mask, sample_ids = row["tokens"].numpy(), row["loss_mask"].numpy(), row["sample_ids"].numpy()
        cu = row["cu_seqlens"].numpy()[: int(row["num_segments"]) + 1]
        for lo, hi in zip(cu[:-1], cu[1:]):
            if sample_ids[lo] < 0:
                continue  # the padding tail
            doc = documents[int(sample_ids[lo])]
            # a document as a text sample: its tokens (truncated to the row), every position but
            # the last predicting its next token
            assert tokens[lo:hi].tolist() == doc[: hi - lo]
            assert mask[lo:hi].tolist() == [1.0] * (hi - lo - 1) + [0.0]
    assert web_rows > 0


def test_plain_prefixes_alone_need_the_pad_id_flag(prefixes):
    from megatron_tokweight.megatron.datasets_provider import (
        check_vocab_size,
        packed_dataset_config_from_args,
    )

    web = prefixes[0]
    with pytest.raises(ConfigError, match="plain Megatron prefixes\\): pass --pack-pad-id ID"):
        packed_dataset_config_from_args(megatron_args(["--data-path", web, "--seq-length", "48"]))
    args = megatron_args(["--data-path", web, "--seq-length", "48", "--pack-pad-id", str(EOD)])
    config = packed_dataset_config_from_args(args)
    assert config.pad_id == EOD and config.tokenizer_spec == {}
    args.padded_vocab_size = 256
    with pytest.raises(ConfigError, match="--vocab-size 258"):  # the pad id must be a token of the model
        check_vocab_size(args)
    args.padded_vocab_size = 512
    check_vocab_size(args)
