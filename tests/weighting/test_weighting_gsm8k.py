"""Real data: GSM8K as two tasks (long worked solutions, short final answers) under uniform vs
Molmo2 weights. Uniform weighting hands almost the whole loss to the solution task; Molmo2's
c / sqrt(n) raises the short-answer task's share of the total weight many times over."""
import math
import statistics

import numpy as np
import pytest

from megatron_tokweight.data.prepare import prepare_jsonl
from megatron_tokweight.data.sidecar import read_sidecar
from megatron_tokweight.data.sources.gsm8k import (
    ANSWER_TASK,
    SOLUTION_TASK,
    write_gsm8k_two_task_jsonl,
)
from megatron_tokweight.weighting import (
    Weighter,
    WeightingConfig,
    format_weight_share,
    weight_share_for_metadata,
)


@pytest.fixture(scope="module")
def gsm8k_prefix(gsm8k_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gsm8k_weighting")
    write_gsm8k_two_task_jsonl(gsm8k_dir / "train.jsonl", tmp / "two_task.jsonl")
    prepare_jsonl(tmp / "two_task.jsonl", tmp / "gsm8k")
    return str(tmp / "gsm8k")


def _reference_totals(meta, c):
    """Per task (loss tokens, sum of w_i * n_i) with w = c / sqrt(n), by a plain loop."""
    tokens, totals = {}, {}
    for task_id, n in zip(meta.task_id.tolist(), meta.n_answer.tolist()):
        task = meta.task_names[task_id]
        tokens[task] = tokens.get(task, 0) + n
        totals[task] = totals.get(task, 0.0) + (c / math.sqrt(n) * n if n else 0.0)
    return tokens, totals


def test_answer_task_share_rises_under_molmo2(gsm8k_prefix):
    meta = read_sidecar(gsm8k_prefix)
    tables = {}
    for scheme in ("uniform", "molmo2", "molmo2-released"):
        rows, report = weight_share_for_metadata(read_sidecar(gsm8k_prefix), scheme)
        assert report.zero_answer_samples == 0
        tables[scheme] = {row.task: row for row in rows}
        print("\n" + format_weight_share(rows, title=f"GSM8K train, two tasks, {scheme} weights"))

    uniform, molmo2, released = tables["uniform"], tables["molmo2"], tables["molmo2-released"]
    assert set(uniform) == {SOLUTION_TASK, ANSWER_TASK}
    ref_tokens, ref_molmo2 = _reference_totals(meta, 4.0)
    for task in (SOLUTION_TASK, ANSWER_TASK):
        assert uniform[task].samples == molmo2[task].samples == 7473
        assert uniform[task].loss_tokens == ref_tokens[task]
        assert uniform[task].total_weight == pytest.approx(ref_tokens[task], rel=1e-9)
        assert molmo2[task].total_weight == pytest.approx(ref_molmo2[task], rel=1e-5)
        # uniform: weight share is the token share
        assert uniform[task].weight_share == pytest.approx(uniform[task].token_share, rel=1e-12)

    # uniform: the long solutions hold the overwhelming share of loss tokens and weight
    assert uniform[SOLUTION_TASK].token_share > 0.95
    assert uniform[ANSWER_TASK].weight_share < 0.05
    # molmo2: the short-answer task's share rises several-fold, the solution task's falls
    assert molmo2[ANSWER_TASK].weight_share > 5 * uniform[ANSWER_TASK].weight_share
    assert molmo2[SOLUTION_TASK].weight_share < uniform[SOLUTION_TASK].weight_share
    # released: every question is one group of K = 2 samples, so 2/sqrt(n)/sqrt(2) rescales
    # both tasks alike: same shares as molmo2, total weight x (2/4)/sqrt(2)
    for task in (SOLUTION_TASK, ANSWER_TASK):
        assert released[task].weight_share == pytest.approx(molmo2[task].weight_share, rel=1e-5)
        assert released[task].total_weight == pytest.approx(
            molmo2[task].total_weight * 0.5 / math.sqrt(2), rel=1e-5
        )


def test_frequency_and_span_rules_on_gsm8k_targets(gsm8k_prefix):
    meta = read_sidecar(gsm8k_prefix)
    vocab = int(meta.tokenizer["vocab_size"])
    config = WeightingConfig(
        preset="molmo2", frequency={"alpha": 0.5, "lo": 0.25, "hi": 4.0}, span_weights={"rationale": 0.5}
    )
    # frequency counts come from the .bin through the C++ counting pass
    weighter = Weighter.from_config(config, meta.task_names, meta.span_kinds, vocab, prefix=gsm8k_prefix)
    tokens = np.fromfile(gsm8k_prefix + ".bin", dtype=np.dtype(meta.token_dtype))
    counts = np.bincount(tokens, minlength=vocab).tolist()
    median = statistics.median([c for c in counts if c > 0])
    freq_ref = [4.0 if c == 0 else min(4.0, max(0.25, (c / median) ** -0.5)) for c in counts]

    # the targets of the first 60 samples: label = token j, kind of the span holding j
    starts = np.concatenate(([0], np.cumsum(meta.lengths.astype(np.int64))))
    labels, kinds, expected = [], [], []
    for i in range(60):
        sample_tokens = tokens[starts[i]:starts[i + 1]]
        for s in range(int(meta.span_offsets[i]), int(meta.span_offsets[i + 1])):
            start, end = (int(x) for x in meta.spans[s])
            kind = int(meta.span_kind[s])
            for j in range(max(start, 1), end):
                label = int(sample_tokens[j])
                labels.append(label)
                kinds.append(kind)
                span_factor = 0.5 if meta.span_kinds[kind] == "rationale" else 1.0
                expected.append(freq_ref[label] * span_factor)
    assert len(set(kinds)) == 2  # both rationale and answer spans are present
    got = weighter.token_factors(np.array(labels, dtype=np.int64), np.array(kinds, dtype=np.int16))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # frequency factors vary over real text: common bytes down-weighted, rare ones up
    assert got.min() < 0.5 * 0.9 and got.max() > 1.0
