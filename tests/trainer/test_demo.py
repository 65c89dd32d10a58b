"""`tokweight demo` end to end (few steps) and its corpus."""
import json
import math

import pytest

from megatron_tokweight.data.sources.demo_corpus import (
    TASKS,
    iter_records,
    number_in_words,
)
from megatron_tokweight.trainer.demo import DemoOptions, run_demo


def reference_shares(records):
    """Token and Molmo2 weight shares per task straight from the JSONL records (byte tokenizer:
    n = answer bytes + the closing end-of-turn token)."""
    tokens, weight = {}, {}
    for r in records:
        n = len(r["response"].encode()) + 1
        w = 0.1 if "caption" in r["task"] else 0.2 if "point" in r["task"] else 4 / math.sqrt(n)
        tokens[r["task"]] = tokens.get(r["task"], 0) + n
        weight[r["task"]] = weight.get(r["task"], 0.0) + w * n
    t_all, w_all = sum(tokens.values()), sum(weight.values())
    return {k: v / t_all for k, v in tokens.items()}, {k: v / w_all for k, v in weight.items()}


def test_short_demo_writes_valid_summary(tmp_path):
    options = DemoOptions(out=str(tmp_path), steps=3, num_train=120, num_eval=24, hidden_size=32,
                          eval_points=1, quiet=True)
    summary = run_demo(options)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["runs"].keys() == {"uniform", "weighted"}
    token_ref, weight_ref = reference_shares(list(iter_records(options.num_train, options.seed)))
    for name, run in on_disk["runs"].items():
        assert set(run["final_loss"]) == set(TASKS)
        assert all(math.isfinite(v) and 0 < v < 10 for v in run["final_loss"].values())
        assert run["tokens_per_s"] > 0 and run["steps"] == 3
        assert [e["step"] for e in run["eval_curve"]] == [0, 3]
        assert len(run["train_curve"]) == 3
        for task in TASKS:
            assert run["token_share"][task] == pytest.approx(token_ref[task], rel=1e-9)
            expected = weight_ref[task] if name == "weighted" else token_ref[task]
            assert run["weight_share"][task] == pytest.approx(expected, rel=1e-6)
    # same seed and rows: both runs start from the same held-out loss
    assert on_disk["runs"]["uniform"]["eval_curve"][0] == on_disk["runs"]["weighted"]["eval_curve"][0]
    # the one-token task holds ~1% of the tokens but >5% of the molmo2 weight
    assert on_disk["runs"]["uniform"]["token_share"]["multiple_choice"] < 0.02
    assert on_disk["runs"]["weighted"]["weight_share"]["multiple_choice"] > 0.05
    assert isinstance(on_disk["one_token_lower_with_weighting"], bool)
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert summary["runs"]["weighted"]["final_loss"] == on_disk["runs"]["weighted"]["final_loss"]


def test_corpus_is_deterministic_and_learnable_from_prompt():
    a, b = list(iter_records(200, 3)), list(iter_records(200, 3))
    assert a == b and a != list(iter_records(200, 4))
    assert {r["task"] for r in a} == set(TASKS)
    for r in a:
        if r["task"] == "short_answer":
            n = int(r["prompt"].split()[1])
            assert r["response"] == number_in_words(n)
        if r["task"] == "multiple_choice":
            assert len(r["response"]) == 1  # one answer token
        if r["task"] == "pointing":
            target = r["prompt"].split("|")[0].split(":")[1].strip()
            assert r["response"].count('x') == r["prompt"].split("|")[1].count(target + " ")
    assert number_in_words(40) == "forty" and number_in_words(47) == "forty-seven" and number_in_words(13) == "thirteen"
    lengths = {t: [len(r["response"]) for r in a if r["task"] == t] for t in TASKS}
    assert min(lengths["caption"]) > 5 * max(lengths["short_answer"])  # the length disparity
