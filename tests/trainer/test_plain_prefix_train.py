"""`tokweight train` on a plain Megatron prefix (no sidecar) blended with a prepared dataset."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.plan import plan_run

EOD = 257  # the byte tokenizer's end of document


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, prepared_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("plain-train")
    rng = np.random.default_rng(2)
    records = [{"prompt": f"what is {a} + {b}?", "response": str(a + b), "task": "sum"}
               for a, b in rng.integers(0, 50, size=(60, 2))]
    prepared_prefix(root, "sft", records)
    # pretraining text as Megatron-LM writes it: byte ids, documents ending in EOD, some split in sentences
    builder = IndexedDatasetBuilder(str(root / "web.bin"), dtype=np.uint16)
    for i in range(80):
        sentences = [f"document {i} sentence {k} says {'ab' * int(rng.integers(1, 9))}. " for k in range(1 + i % 3)]
        ids = [list(s.encode()) for s in sentences]
        ids[-1].append(EOD)
        builder.add_document(np.concatenate(ids).astype(np.uint16), [len(s) for s in ids])
    builder.finalize(str(root / "web.idx"))
    return root


def config_dict(data_dir, prefixes, weights=None, **data):
    return {
        "data": {"prefixes": [str(data_dir / p) for p in prefixes], "weights": weights, "seq_length": 128, **data},
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
        "weighting": "molmo2", "steps": 3, "micro_batch_size": 2, "num_micro_batches": 1, "log_interval": 1,
    }


def test_plain_prefix_trained_in_a_blend(data_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(data_dir, ["web", "sft"], weights=[0.5, 0.5])))
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_tokweight.cli", "train", "--config", str(path), "--summary", str(summary)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(summary.read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    totals = {key: sum(s["reports"].get(key, 0.0) for s in steps)
              for key in ("task/web/loss tokens", "task/sum/loss tokens", "dataset/web/loss tokens")}
    # both datasets' targets were trained: the text documents' (task "web") and the answers'
    assert totals["task/web/loss tokens"] > 0 and totals["task/sum/loss tokens"] > 0, steps[0]["reports"]
    assert totals["dataset/web/loss tokens"] == totals["task/web/loss tokens"]
    assert all(np.isfinite(s["reports"]["weighted loss"]) for s in steps)
    assert not (data_dir / "web.tokweight").exists()


def test_plain_prefix_alone_needs_data_tokenizer(data_dir):
    with pytest.raises(ConfigError, match="data.tokenizer is needed: no prefix .* has a sidecar naming a tokenizer"):
        plan_run(TrainConfig.from_dict(config_dict(data_dir, ["web"])))
    plan = plan_run(TrainConfig.from_dict(config_dict(data_dir, ["web"], tokenizer="byte")))
    assert plan.vocab_size == 262 and plan.task_names == ["web"]
    # a tokenizer other than the prepared data's is refused, naming the difference
    with pytest.raises(ConfigError, match=r"different vocabularies \(\[3, 262\]\)"):
        plan_run(TrainConfig.from_dict(config_dict(data_dir, ["sft", "web"], weights=[1, 1],
                                                   tokenizer=str(_other_tokenizer(data_dir)))))


def _other_tokenizer(root):
    """A tiny Hugging Face tokenizer.json (word level) that is not the byte tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = root / "other" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    return path
