"""Sample and token weights against plain-Python references; config loading and validation."""
import argparse
import json
import math
import statistics
from fnmatch import fnmatchcase

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import megatron_tokweight
from megatron_tokweight.errors import ConfigError, TokweightError
from megatron_tokweight.megatron.arguments import (
    add_weighting_args,
    weighting_config_from_args,
)
from megatron_tokweight.weighting import (
    FrequencyRule,
    TaskRule,
    TaskRuleEntry,
    Weighter,
    WeightingConfig,
    format_weight_share,
    frequency_factors,
    sample_weights,
    weight_share_by_task,
)
from megatron_tokweight.weighting.token_counts import count_token_ids

# ---- plain-Python references --------------------------------------------------------------

def ref_rule(task, table, default):
    """(c, p) of the first (pattern, (c, p)) whose glob matches, else the default."""
    for pattern, coef in table:
        if fnmatchcase(task, pattern):
            return coef
    return default


def ref_sample_weight(task, n, k, table, default, q):
    c, p = ref_rule(task, table, default)
    if n == 0:
        return 0.0
    return c / n ** p / k ** q


def ref_frequency(counts, alpha, lo, hi):
    occurring = [c for c in counts if c > 0]
    median = statistics.median(occurring)
    return [hi if c == 0 else min(hi, max(lo, (c / median) ** -alpha)) for c in counts]


# ---- presets -------------------------------------------------------------------------------

def test_molmo2_write_up_values():
    weights = megatron_tokweight.sample_weights(["vqa", "docqa", "math", "chart_qa"], [1, 16, 100, 400])
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, np.array([4.0, 1.0, 0.4, 0.2], dtype=np.float32))
    other = sample_weights(
        ["image_captioning", "captions_long", "pointing", "video_point_count", "qa"], [1, 500, 3, 90, 9]
    )
    np.testing.assert_array_equal(other, np.array([0.1, 0.1, 0.2, 0.2, 4 / 3], dtype=np.float32))


def test_molmo2_released_power_and_annotations():
    names = ["qa", "qa", "qa", "caption", "caption", "pointing", "qa"]
    n = np.array([4, 9, 25, 7, 7, 3, 64])
    groups = np.array([10, 10, 10, 11, 11, 12, 13], dtype=np.int64)  # K = 3, 3, 3, 2, 2, 1, 1
    config = WeightingConfig(preset="molmo2-released")
    weighter = Weighter.from_config(config, ["qa", "caption", "pointing"], ["answer"], vocab_size=8)
    task_ids = np.array([["qa", "caption", "pointing"].index(t) for t in names])
    got = weighter.sample_weights(task_ids, n, groups)
    k = [3, 3, 3, 2, 2, 1, 1]
    table = [("*caption*", (0.1, 0)), ("*point*", (0.2, 0))]
    expected = [ref_sample_weight(t, int(m), kk, table, (2.0, 0.5), 0.5) for t, m, kk in zip(names, n, k)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == np.float32(2 / 2 / math.sqrt(3))
    assert config.normalization == "weight_sum"
    # the public function takes K directly
    np.testing.assert_allclose(sample_weights(names, n, "molmo2-released", group_sizes=k), expected, rtol=1e-6)
    # molmo2 (write-up) ignores K
    np.testing.assert_array_equal(sample_weights(["qa"], [16], "molmo2", group_sizes=[4]), [1.0])


def test_uniform_preset_and_explicit_overrides():
    np.testing.assert_array_equal(sample_weights(["caption", "qa"], [5, 100], "uniform"), [1.0, 1.0])
    assert WeightingConfig(preset="uniform").normalization == "token_count"
    config = WeightingConfig(preset="molmo2", default_rule="power:2:1", normalization="sample_count")
    assert config.task_rules == WeightingConfig(preset="molmo2").task_rules  # kept from the preset
    np.testing.assert_allclose(sample_weights(["qa", "caption"], [4, 4], config), [0.5, 0.1], rtol=1e-7)
    assert config.normalization == "sample_count"
    replaced = WeightingConfig(preset="molmo2", task_rules=["*qa*=3"])
    np.testing.assert_allclose(sample_weights(["caption", "qa"], [4, 4], replaced), [2.0, 3.0])


def test_globs_first_match_wins():
    table = ["vqa_*=3", "*_long=power:1:1", "*=none"]
    config = WeightingConfig(task_rules=table, default_rule="constant:7")
    names = ["vqa_long", "doc_long", "other", "VQA_x"]
    got = sample_weights(names, [10, 10, 10, 10], config)
    np.testing.assert_allclose(got, [3.0, 0.1, 1.0, 1.0])  # globs are case-sensitive: VQA_x hits "*"
    reordered = WeightingConfig(task_rules=[table[1], table[0]], default_rule="constant:7")
    np.testing.assert_allclose(sample_weights(names, [10, 10, 10, 10], reordered), [0.1, 0.1, 7.0, 7.0])
    weighter = Weighter.from_config(reordered, ["vqa_long", "other"], ["answer"], 4)
    assert [r.pattern for r in weighter.task_rules] == ["*_long", None]
    assert "default rule" in weighter.describe()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["cap_a", "point_b", "qa_c", "qa_long", "x"]), st.integers(0, 5000),
                  st.integers(0, 6)),
        min_size=1, max_size=40,
    ),
    st.sampled_from([0.0, 0.5, 1.0]),
)
def test_sample_weights_match_python_reference(samples, q):
    task_names = ["cap_a", "point_b", "qa_c", "qa_long", "x"]
    table = [("cap*", (0.3, 0.0)), ("*long", (5.0, 1.0)), ("qa*", (2.0, 0.25))]
    config = WeightingConfig(
        task_rules=["cap*=0.3", "*long=power:5:1", "qa*=power:2:0.25"], default_rule="power:1.5",
        annotation_exponent=q,
    )
    weighter = Weighter.from_config(config, task_names, ["answer"], 16)
    task_ids = np.array([task_names.index(t) for t, _, _ in samples])
    n = np.array([m for _, m, _ in samples], dtype=np.int32)
    groups = np.array([g for _, _, g in samples], dtype=np.int64)
    got, report = weighter.sample_weights_with_report(task_ids, n, groups)
    sizes = {g: int((groups == g).sum()) for g in groups}
    expected = [
        ref_sample_weight(t, m, sizes[g], table, (1.5, 0.5), q) for t, m, g in samples
    ]
    np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), rtol=1e-6)
    assert np.isfinite(got).all() and (got >= 0).all()
    assert report.zero_answer_samples == sum(m == 0 for _, m, _ in samples)


def test_zero_answer_tokens_give_zero_and_are_counted():
    weighter = Weighter.from_config("molmo2", ["qa", "caption"], ["answer"], 4)
    got, report = weighter.sample_weights_with_report(
        np.array([0, 0, 1, 0]), np.array([0, 4, 0, 0]), np.arange(4, dtype=np.int64)
    )
    np.testing.assert_array_equal(got, [0.0, 2.0, 0.0, 0.0])
    assert report.zero_answer_samples == 3 and report.zero_answer_by_task == {"qa": 2, "caption": 1}
    assert weighter.last_report == report and "3 have no answer tokens" in str(report)
    _, public = sample_weights(["qa", "qa"], [0, 1], return_report=True)
    assert public.zero_answer_samples == 1


def test_bad_sample_inputs_are_named():
    weighter = Weighter.from_config(WeightingConfig(default_rule="power:1e39:1"), ["huge"], ["answer"], 4)
    # 1e39 / 100 fits float32, 1e39 / 1 does not
    with pytest.raises(TokweightError, match=r"sample 1 of task 'huge'.*n = 1\).*power:1e\+39:1 \(default rule\)"):
        weighter.sample_weights(np.array([0, 0]), np.array([100, 1]), np.array([0, 1]))
    with pytest.raises(TokweightError, match="sample 1: answer token count -2"):
        sample_weights(["qa", "qa"], [3, -2])
    with pytest.raises(TokweightError, match="task id 5"):
        Weighter.from_config("uniform", ["a"], ["answer"], 4).sample_weights(np.array([5]), np.array([1]), np.array([0]))


# ---- config loading ------------------------------------------------------------------------

def test_config_from_dict_yaml_json_roundtrip(tmp_path):
    raw = {
        "preset": "molmo2",
        "task_rules": ["*caption*=0.05", {"pattern": "*point*", "rule": {"kind": "power", "value": 1, "exponent": 0.25}}],
        "annotation_exponent": 0.5,
        "normalization": "sample_count",
        "stop_token_ids": {3: 0.5, "7": 0.0},
        "frequency": {"alpha": 0.5, "lo": 0.25, "hi": 4},
        "span_weights": {"answer": 2.0},
    }
    config = WeightingConfig.from_dict(raw)
    assert config.task_rules == (
        TaskRuleEntry("*caption*", TaskRule.constant(0.05)),
        TaskRuleEntry("*point*", TaskRule.power(1.0, 0.25)),
    )
    assert config.default_rule == TaskRule.power(4.0)  # from the preset
    assert config.stop_token_ids == {3: 0.5, 7: 0.0}
    assert config.frequency == FrequencyRule(0.5, 0.25, 4.0)
    import yaml

    (tmp_path / "w.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "w.json").write_text(json.dumps(raw))
    assert WeightingConfig.from_file(tmp_path / "w.yaml") == config
    assert WeightingConfig.from_file(tmp_path / "w.json") == config
    assert WeightingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    odd = WeightingConfig(default_rule=TaskRule.power(0.123456789012, 0.3))
    assert WeightingConfig.from_dict(odd.to_dict()) == odd


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"normalisation": "weight_sum"}, r"unknown key\(s\) 'normalisation' \(did you mean 'normalization'"),
        ({"preset": "molmo3"}, "preset 'molmo3' is unknown"),
        ({"normalization": "mean"}, "normalization 'mean' is unknown"),
        ({"task_rules": ["*cap*=pow:2"]}, r"task_rules\[0\] \('\*cap\*'\): cannot read rule 'pow:2'"),
        ({"task_rules": [{"pattern": "*", "rule": -1}]}, r"task_rules\[0\]\.rule: constant rule value: must be >= 0"),
        ({"task_rules": [{"pattern": "*", "weight": 1}]}, r"task_rules\[0\]: unknown key\(s\) 'weight'"),
        ({"task_rules": "*=1"}, "task_rules: expected a list"),
        ({"default_rule": "constant:1:0.5"}, "default_rule: cannot read rule"),
        ({"annotation_exponent": -0.5}, "annotation_exponent: must be >= 0"),
        ({"stop_token_ids": {"the": 0.1}}, "stop_token_ids: key 'the' is not a token id"),
        ({"stop_token_ids": {5: float("inf")}}, r"stop_token_ids\[5\]: must be finite"),
        ({"frequency": {"lo": 1}}, "frequency: 'alpha' is required"),
        ({"frequency": {"alpha": 1, "lo": 3, "hi": 2}}, r"frequency.lo \(3\) must be <= frequency.hi \(2\)"),
        ({"span_weights": {"answer": "heavy"}}, r"span_weights\['answer'\]: expected a number"),
    ],
)
def test_config_rejects_bad_fields(raw, message):
    with pytest.raises(ConfigError, match=message):
        WeightingConfig.from_dict(raw)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: molmo2\nnormalization: per_token\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: normalization 'per_token' is unknown"):
        WeightingConfig.from_file(bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: expected a mapping"):
        WeightingConfig.from_file(tmp_path / "list.json")
    (tmp_path / "w.toml").write_text("")
    with pytest.raises(ConfigError, match="unknown config format '.toml'"):
        WeightingConfig.from_file(tmp_path / "w.toml")
    with pytest.raises(ConfigError, match="not found"):
        WeightingConfig.from_file(tmp_path / "missing.yaml")


def test_config_from_cli_args(tmp_path):
    parser = add_weighting_args(argparse.ArgumentParser())
    args = parser.parse_args([
        "--token-weighting-preset", "molmo2-released",
        "--token-weighting-task-rule", "*ocr*=0.5",
        "--token-weighting-task-rule", "*=power:3",
        "--loss-normalization", "token_count",
        "--token-weighting-stop-token", "13=0.25",
        "--token-weighting-frequency-alpha", "0.5",
        "--token-weighting-span-weight", "answer=2",
    ])
    config = weighting_config_from_args(args)
    assert config.preset == "molmo2-released" and config.annotation_exponent == 0.5
    assert [str(e) for e in config.task_rules] == ["*ocr*=constant:0.5", "*=power:3:0.5"]
    assert config.normalization == "token_count" and config.stop_token_ids == {13: 0.25}
    assert config.frequency == FrequencyRule(0.5) and config.span_weights == {"answer": 2.0}
    # nothing given: no preset, uniform weights
    assert weighting_config_from_args(parser.parse_args([])) == WeightingConfig()
    # flags override the file; the file's explicit fields survive a preset flag
    path = tmp_path / "w.yaml"
    path.write_text("preset: molmo2\ndefault_rule: power:8\nnormalization: sample_count\n")
    from_file = weighting_config_from_args(parser.parse_args(
        ["--token-weighting-config", str(path), "--token-weighting-preset", "molmo2-released"]))
    assert from_file.default_rule == TaskRule.power(8.0) and from_file.annotation_exponent == 0.5
    assert from_file.normalization == "sample_count"
    with pytest.raises(ConfigError, match=r"command-line flags: task_rules\[0\]: expected 'PATTERN=RULE'"):
        weighting_config_from_args(parser.parse_args(["--token-weighting-task-rule", "caption"]))
    with pytest.raises(ConfigError, match="--token-weighting-stop-token: expected ID=FACTOR"):
        weighting_config_from_args(parser.parse_args(["--token-weighting-stop-token", "13"]))
    with pytest.raises(ConfigError, match="need --token-weighting-frequency-alpha"):
        weighting_config_from_args(parser.parse_args(["--token-weighting-frequency-hi", "3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss-normalization", "mean"])


# ---- token rules ---------------------------------------------------------------------------

def test_frequency_factors_match_numpy_reference():
    rng = np.random.default_rng(0)
    vocab = 2000
    tokens = np.minimum(rng.zipf(1.3, size=20_000) - 1, vocab - 1).astype(np.int32)
    tokens = tokens[tokens != 7]  # id 7 never occurs
    counts = np.bincount(tokens, minlength=vocab)
    # many unseen ids, so a median over all ids would differ from the one over occurring ids
    assert (counts == 0).sum() > 100 and np.median(counts) != statistics.median(counts[counts > 0])
    np.testing.assert_array_equal(count_token_ids(tokens, vocab), counts)  # the C++ counting pass
    rule = FrequencyRule(alpha=0.7, lo=0.2, hi=3.0)
    got = frequency_factors(counts, rule)
    expected = ref_frequency(counts.tolist(), 0.7, 0.2, 3.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[7] == np.float32(3.0) and got.min() >= np.float32(0.2)
    assert (got > 1).any() and (got < 1).any()  # both clips and the middle are exercised
    # the median is over occurring ids only: ids at the median count get exactly 1
    median = statistics.median([c for c in counts if c > 0])
    assert np.all(got[counts == median] == 1.0)
    with pytest.raises(ConfigError, match="all zero"):
        frequency_factors(np.zeros(4, dtype=np.int64), rule)


def test_token_factors_match_per_token_python_reference():
    rng = np.random.default_rng(1)
    vocab, span_kinds = 50, ["answer", "reasoning", "final"]
    counts = rng.integers(0, 100, size=vocab)
    counts[[4, 9]] = 0
    config = WeightingConfig(
        preset="molmo2",
        stop_token_ids={2: 0.1, 4: 0.5, 30: 0.0},
        frequency={"alpha": 0.5, "lo": 0.5, "hi": 2.0},
        span_weights={"final": 3.0, "reasoning": 0.5},
    )
    weighter = Weighter.from_config(config, ["qa"], span_kinds, vocab, token_counts=counts)
    labels = rng.integers(0, vocab, size=4000).astype(np.int64)
    kinds = rng.integers(-1, len(span_kinds), size=4000).astype(np.int16)
    got = weighter.token_factors(labels, kinds)
    freq = ref_frequency(counts.tolist(), 0.5, 0.5, 2.0)
    expected = []
    for label, kind in zip(labels.tolist(), kinds.tolist()):
        factor = config.stop_token_ids.get(label, 1.0) * freq[label]
        if kind >= 0:
            factor *= config.span_weights.get(span_kinds[kind], 1.0)
        expected.append(factor)
    assert got.dtype == np.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # full token weight = sample weight x token factors
    sample_w = np.full(labels.shape, 0.8, dtype=np.float32)
    np.testing.assert_allclose(weighter.token_weights(sample_w, labels, kinds), 0.8 * np.array(expected), rtol=1e-6)
    # each rule alone
    only_spans = Weighter.from_config(WeightingConfig(span_weights={"final": 3.0}), ["qa"], span_kinds, vocab)
    np.testing.assert_array_equal(only_spans.token_factors(labels, kinds), np.where(kinds == 2, 3.0, 1.0))
    only_stop = Weighter.from_config(WeightingConfig(stop_token_ids={2: 0.1}), ["qa"], span_kinds, vocab)
    np.testing.assert_array_equal(only_stop.token_factors(labels, kinds), np.where(labels == 2, np.float32(0.1), 1.0))


def test_token_rules_absent_and_bad_inputs():
    plain = Weighter.from_config("molmo2", ["qa"], ["answer"], 10)
    assert plain.token_factors(np.array([1, 2]), np.array([0, 0], dtype=np.int16)) is None
    assert not plain.has_token_rules
    sample_w = np.array([0.5, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(plain.token_weights(sample_w, np.array([1, 2]), np.array([0, 0])), sample_w)
    stop = Weighter.from_config(WeightingConfig(stop_token_ids={3: 0.5}), ["qa"], ["answer"], 10)
    with pytest.raises(TokweightError, match=r"position 1: label 10 is outside the vocabulary \[0, 10\)"):
        stop.token_factors(np.array([1, 10]), np.array([0, 0]))
    with pytest.raises(ConfigError, match=r"token id 12 is outside the vocabulary"):
        Weighter.from_config(WeightingConfig(stop_token_ids={12: 0.5}), ["qa"], ["answer"], 10)
    with pytest.raises(ConfigError, match=r"span kind\(s\) 'reasoning' not in this dataset's span kinds \['answer'\]"):
        Weighter.from_config(WeightingConfig(span_weights={"reasoning": 2}), ["qa"], ["answer"], 10)
    spans = Weighter.from_config(WeightingConfig(span_weights={"answer": 2}), ["qa"], ["answer"], 10)
    with pytest.raises(TokweightError, match="position 0: span kind 1 is outside"):
        spans.token_factors(np.array([1]), np.array([1]))
    with pytest.raises(ConfigError, match="needs corpus token counts"):
        Weighter.from_config(WeightingConfig(frequency={"alpha": 1}), ["qa"], ["answer"], 10)
    big = Weighter.from_config(WeightingConfig(stop_token_ids={1: 1e30}), ["qa"], ["answer"], 10)
    with pytest.raises(TokweightError, match=r"position 0: sample weight 1e\+10 x token factor 1e\+30 \(label 1"):
        big.token_weights(np.array([1e10], dtype=np.float32), np.array([1]), np.array([0]))


# ---- reporting -----------------------------------------------------------------------------

def test_weight_share_by_task_and_table():
    names = ["caption", "qa", "empty"]
    task_ids = np.array([0, 0, 1, 1, 1])
    n = np.array([100, 300, 4, 16, 0])
    w = sample_weights([names[t] for t in task_ids], n, "molmo2")
    rows = weight_share_by_task(names, task_ids, n, w)
    total = 0.1 * 400 + (2.0 * 4 + 1.0 * 16)
    assert [r.samples for r in rows] == [2, 3, 0]
    assert [r.loss_tokens for r in rows] == [400, 20, 0]
    np.testing.assert_allclose([r.total_weight for r in rows], [40.0, 24.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose([r.weight_share for r in rows], [40 / total, 24 / total, 0.0], rtol=1e-6)
    np.testing.assert_allclose([r.token_share for r in rows], [400 / 420, 20 / 420, 0.0])
    table = format_weight_share(rows, title="molmo2")
    lines = table.splitlines()
    assert lines[0] == "molmo2" and "weight share" in lines[1]
    assert lines[3].split()[:3] == ["caption", "2", "400"] and lines[3].endswith(f"{100 * 40 / total:.2f}%")
    assert lines[-1].split()[:3] == ["total", "5", "420"]
    with pytest.raises(TokweightError, match="must be 1-D of equal length"):
        weight_share_by_task(names, task_ids, n[:2], w)


@pytest.mark.parametrize("rule, problem", [("*=-0.5", "must be >= 0, got -0.5"), ("*=inf", "must be finite, got inf"),
                                           ("*=nan", "must be finite, got nan")])
def test_a_bad_number_in_a_rule_says_what_is_wrong(rule, problem):
    """These used to say only "cannot read rule"."""
    with pytest.raises(ConfigError, match=rf"task_rules\[0\] \('\*'\): constant rule value: {problem}"):
        WeightingConfig(task_rules=[rule])
