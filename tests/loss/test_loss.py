"""Single-process tests of megatron_tokweight.loss: the cross-entropy against
torch.nn.functional.cross_entropy (float64), validation errors, the global normalizer, Z = 0,
the loss-function scaling and the reports against direct formulas.

Distributed behaviour (TP, DP, CP, micro-batches) is in test_loss_invariance.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.loss import (
    PATH_EXPLICIT_GROUP,
    GlobalBatchStats,
    LossSettings,
    Normalization,
    cross_entropy_path,
    global_batch_stats,
    make_loss_func,
    per_token_cross_entropy,
    reduce_reports,
    stock_loss_func,
    weighted_cross_entropy,
)

S, B, V = 6, 3, 13


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, B, V, generator=g) * 3
    labels = torch.randint(0, V, (S, B), generator=g)
    weights = torch.rand(S, B, generator=g) * 2
    weights[0] = 0.0
    labels[0] = 0  # pad id on weight-0 positions
    return logits, labels, weights


def _reference(logits, labels, weights):
    x = logits.double().requires_grad_()
    per_token = F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(S, B)
    out = per_token * weights.double()
    return x, per_token, out


# ----------------------------------------------------------------------------- cross-entropy


def test_weighted_cross_entropy_matches_torch_value_and_gradient_at_tp1():
    logits, labels, weights = _inputs()
    assert cross_entropy_path(None) == PATH_EXPLICIT_GROUP  # no Megatron parallel state here: no TP
    x = logits.clone().requires_grad_()
    out = weighted_cross_entropy(x * 1.0, labels, weights)  # x * 1.0: the fp32 input is overwritten
    assert out.dtype == torch.float32 and out.shape == (S, B)
    upstream = torch.randn(S, B, generator=torch.Generator().manual_seed(3))
    (out * upstream).sum().backward()
    xr, _, ref = _reference(logits, labels, weights)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    # weight 0 (pad labels there): exactly zero value and exactly zero logit gradient
    assert torch.equal(out[0], torch.zeros(B)) and torch.equal(x.grad[0], torch.zeros(B, V))


def test_per_token_cross_entropy_matches_torch_and_keeps_bf16_input():
    logits, labels, _ = _inputs(1)
    low = logits.bfloat16()
    kept = low.clone()
    per_token = per_token_cross_entropy(low, labels)
    assert torch.equal(low, kept)  # only fp32 logits are overwritten
    ref = F.cross_entropy(low.double().reshape(-1, V), labels.reshape(-1), reduction="none").reshape(S, B)
    torch.testing.assert_close(per_token.double(), ref, rtol=1e-6, atol=1e-6)


def test_cross_entropy_path_selection(monkeypatch):
    from megatron_tokweight.loss import cross_entropy as ce

    global_group, same_ranks, subgroup = object(), object(), object()
    ranks = {global_group: (0, 1), same_ranks: (0, 1), subgroup: (0, 2)}
    monkeypatch.setattr(ce, "_ranks", ranks.__getitem__)
    monkeypatch.setattr(ce, "_megatron_tp_group", lambda: global_group)
    monkeypatch.setattr(ce, "_megatron_accepts_tp_group", lambda: False)  # Megatron-Core 0.16.1
    assert [ce.cross_entropy_path(g) for g in (None, global_group, same_ranks, subgroup)] == [
        "megatron", "megatron", "megatron", "explicit-group"
    ]
    monkeypatch.setattr(ce, "_megatron_accepts_tp_group", lambda: True)  # newer Megatron
    assert ce.cross_entropy_path(subgroup) == "megatron-tp-group"
    monkeypatch.setattr(ce, "_megatron_tp_group", lambda: None)  # parallel state not initialised
    assert ce.cross_entropy_path(None) == "explicit-group"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda l, y, w: (l, y, w[:, :2]), "weights has shape"),
        (lambda l, y, w: (l, y, w.masked_fill(w > 1.5, float("nan"))), "NaN/inf"),
        (lambda l, y, w: (l, y, w.masked_fill(w > 1.5, float("inf"))), "NaN/inf"),
        (lambda l, y, w: (l, y, w - 1.0), "negative"),
        (lambda l, y, w: (l, y, w.long()), "floating-point"),
        (lambda l, y, w: (l, y.masked_fill(y == y[1, 1], V), w), rf"outside \[0, {V}\)"),
        (lambda l, y, w: (l, y.masked_fill(y == y[1, 1], -100), w), "labels outside"),
        (lambda l, y, w: (l, y.float(), w), "integer tensor"),
        (lambda l, y, w: (l[:, :, None], y, w), r"must be \[s, b, vocab / TP\]"),
    ],
)
def test_weighted_cross_entropy_rejects_bad_input(change, message):
    logits, labels, weights = change(*_inputs(2))
    with pytest.raises(DataFormatError, match=message):
        weighted_cross_entropy(logits, labels, weights)


def test_error_names_position_and_value():
    logits, labels, weights = _inputs(4)
    weights[2, 1] = -0.5
    with pytest.raises(DataFormatError, match=r"1 negative.*\(2, 1\).*-0\.5"):
        weighted_cross_entropy(logits, labels, weights)


# ----------------------------------------------------------------------------- normalizer


def _micro_batch(seed, rows=2, seq=8, tasks=2):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, seq, generator=g) > 0.4).float()
    weights = torch.rand(rows, seq, generator=g) * mask
    return {
        "loss_mask": mask,
        "loss_weights": weights,
        "num_samples": torch.randint(1, 4, (rows,), generator=g),
        "task_ids": torch.randint(0, tasks, (rows, seq), generator=g),
        "dataset_id": torch.randint(0, 2, (rows,), generator=g),
    }


def test_normalization_modes_and_parse():
    stats = GlobalBatchStats(weight_sum=2.5, loss_tokens=7, num_samples=3)
    assert [stats.normalizer(m) for m in ("weight_sum", "sample_count", "token_count")] == [2.5, 3.0, 7.0]
    assert Normalization.parse("token_count") is Normalization.TOKEN_COUNT
    with pytest.raises(ConfigError, match="weight_sum, sample_count, token_count"):
        Normalization.parse("mean")


def test_global_batch_stats_single_rank_matches_direct_sums():
    mbs = [_micro_batch(s) for s in range(3)]
    stats = global_batch_stats(mbs, None, num_tasks=2, num_datasets=2)
    assert math.isclose(stats.weight_sum, float(sum(mb["loss_weights"].double().sum() for mb in mbs)), rel_tol=1e-12)
    assert stats.loss_tokens == int(sum(mb["loss_mask"].sum() for mb in mbs))
    assert stats.num_samples == int(sum(mb["num_samples"].sum() for mb in mbs))
    for k in range(2):
        assert stats.task_loss_tokens[k] == int(sum(((mb["task_ids"] == k) & (mb["loss_mask"] > 0)).sum() for mb in mbs))
        in_ds = [mb["dataset_id"][:, None].expand_as(mb["loss_mask"]) == k for mb in mbs]
        assert math.isclose(stats.dataset_weight_sum[k], float(sum(mb["loss_weights"][d].sum() for mb, d in zip(mbs, in_ds))), rel_tol=1e-6)
    # CP rule: samples are counted on CP rank 0 only; weights and tokens on every CP rank
    other = global_batch_stats(mbs, None, cp_rank=1, num_tasks=2, num_datasets=2)
    assert other.num_samples == 0 and other.loss_tokens == stats.loss_tokens and other.weight_sum == stats.weight_sum


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda mb: mb.update(loss_weights=mb["loss_weights"].masked_fill(mb["loss_mask"] > 0, float("nan"))), "NaN/inf"),
        (lambda mb: mb.update(loss_weights=mb["loss_weights"] + (mb["loss_mask"] == 0).float()), "where loss_mask is 0"),
        (lambda mb: mb.update(task_ids=mb["task_ids"] + 5), r"task_ids of loss tokens.*outside \[0, 2\)"),
        (lambda mb: mb.update(dataset_id=mb["dataset_id"][:1]), "dataset_id has shape"),
        (lambda mb: mb.pop("num_samples"), "no 'num_samples' key"),
        (lambda mb: mb.update(loss_mask=mb["loss_mask"][:, :3]), "loss_weights has shape"),
    ],
)
def test_global_batch_stats_rejects_bad_data(change, message):
    mbs = [_micro_batch(0), _micro_batch(1)]
    change(mbs[1])
    with pytest.raises(DataFormatError, match=message):
        global_batch_stats(mbs, None, num_tasks=2, num_datasets=2)


# ----------------------------------------------------------------------------- loss function


def _settings(mode, per_token, m=3, d=4, **kw):
    return LossSettings(mode, m, d, per_token, **kw)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mode", ["weight_sum", "sample_count", "token_count"])
def test_loss_func_scaling_matches_formula(mode, per_token):
    mb = _micro_batch(5)
    stats = GlobalBatchStats(weight_sum=9.0, loss_tokens=40, num_samples=6)
    per_token_loss = torch.rand(mb["loss_mask"].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    loss, num_tokens, report = make_loss_func(mb, stats, _settings(mode, per_token))(per_token_loss)
    s = float((per_token_loss * mb["loss_weights"]).sum())
    n = int(mb["loss_mask"].sum())
    z = stats.normalizer(mode)
    expected = s * stats.loss_tokens / z if per_token else s * max(n, 1) * 3 * 4 / z
    assert num_tokens.dtype == torch.int32 and int(num_tokens) == n
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert all(v.shape == (2,) for v in report.values())


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mode", ["weight_sum", "sample_count", "token_count"])
def test_zero_normalizer_gives_zero_loss_and_gradient(mode, per_token):
    mb = _micro_batch(6)
    mb["loss_mask"].zero_()
    mb["loss_weights"].zero_()
    mb["num_samples"].zero_()
    stats = global_batch_stats([mb], None)
    assert stats.normalizer(mode) == 0.0
    x = torch.rand(mb["loss_mask"].shape, requires_grad=True)
    loss, num_tokens, report = make_loss_func(mb, stats, _settings(mode, per_token))(x)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(x.grad, torch.zeros_like(x)) and int(num_tokens) == 0
    reduced = reduce_reports([report], None)
    assert reduced["weighted loss"] == 0.0 and not any(math.isnan(v) for k, v in reduced.items() if k != "lm loss")


def test_reports_match_direct_formulas():
    mbs = [_micro_batch(s) for s in (7, 8)]
    settings = _settings("token_count", False, m=2, d=1, task_names=("a", "b"), dataset_names=("x", "y"))
    stats = settings.global_batch_stats(mbs)
    g = torch.Generator().manual_seed(2)
    losses = [torch.rand(mb["loss_mask"].shape, generator=g) * 3 for mb in mbs]
    reports = [make_loss_func(mb, stats, settings)(l)[2] for mb, l in zip(mbs, losses)]
    got = reduce_reports(reports, None)

    l = torch.cat([x.reshape(-1) for x in losses]).double()
    mask = torch.cat([mb["loss_mask"].reshape(-1) for mb in mbs]).double()
    w = torch.cat([mb["loss_weights"].reshape(-1) for mb in mbs]).double()
    tasks = torch.cat([mb["task_ids"].reshape(-1) for mb in mbs])
    datasets = torch.cat([mb["dataset_id"][:, None].expand_as(mb["loss_mask"]).reshape(-1) for mb in mbs])
    expected = {"lm loss": (l * mask).sum() / mask.sum(), "weighted loss": (w * l).sum() / mask.sum()}
    for prefix, names, ids in (("task", "ab", tasks), ("dataset", "xy", datasets)):
        for k, name in enumerate(names):
            sel = (ids == k) & (mask > 0)
            expected[f"{prefix}/{name}/lm loss"] = l[sel].mean()
            expected[f"{prefix}/{name}/weighted loss"] = (w * l)[sel].sum() / w[sel].sum()
            expected[f"{prefix}/{name}/loss tokens"] = sel.sum().double()
            expected[f"{prefix}/{name}/weight share"] = w[sel].sum() / w.sum()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isclose(got[key], float(value), rel_tol=1e-6), key


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("mode", ["weight_sum", "sample_count", "token_count"])
def test_objective_report_is_one_fp32_pair_of_the_objective(mode, zero):
    """report="objective": only `weighted loss`, fp32 [2] (Megatron's stock report size), whose
    reduction over micro-batches and CP ranks is L = sum w l / Z, like the full report's."""
    mbs = [_micro_batch(s) for s in (11, 12)]
    if zero:
        for mb in mbs:
            mb["loss_mask"].zero_(), mb["loss_weights"].zero_(), mb["num_samples"].zero_()
    g = torch.Generator().manual_seed(4)
    losses = [torch.rand(mb["loss_mask"].shape, generator=g) * 3 for mb in mbs]
    l = torch.cat([x.reshape(-1) for x in losses] * 2).double()
    w = torch.cat([mb["loss_weights"].reshape(-1) for mb in mbs] * 2).double()
    mask = torch.cat([mb["loss_mask"].reshape(-1) for mb in mbs] * 2)
    samples = int(sum(mb["num_samples"].sum() for mb in mbs))  # counted once: on CP rank 0
    # two CP ranks holding the same micro-batches; stats = what the all-reduce over them gives
    stats = GlobalBatchStats(weight_sum=float(w.sum()), loss_tokens=int((mask > 0).sum()), num_samples=samples)
    reduced = {}
    for level in ("full", "objective"):
        reports = []
        for cp_rank in (0, 1):
            settings = _settings(mode, False, m=2, d=2, cp_rank=cp_rank, report=level)
            reports += [make_loss_func(mb, stats, settings)(l)[2] for mb, l in zip(mbs, losses)]
        if level == "objective":
            assert all(list(r) == ["weighted loss"] for r in reports)
            assert all(r["weighted loss"].dtype == torch.float32 and r["weighted loss"].numel() == 2 for r in reports)
        reduced[level] = reduce_reports(reports, None)["weighted loss"]
    z = {"weight_sum": float(w.sum()), "token_count": float((mask > 0).sum()), "sample_count": float(samples)}[mode]
    expected = 0.0 if zero else float((w * l).sum()) / z
    assert math.isclose(reduced["full"], expected, rel_tol=1e-6, abs_tol=0.0)
    assert math.isclose(reduced["objective"], expected, rel_tol=1e-5, abs_tol=0.0)
    with pytest.raises(ConfigError, match="report must be one of"):
        _settings(mode, False, report="tasks")


def test_report_keys_leave_out_absent_tasks():
    mb = _micro_batch(9)
    mb["task_ids"].fill_(1)
    settings = _settings("weight_sum", True, m=1, d=1, task_names=("absent", "present"))
    stats = settings.global_batch_stats([mb])
    report = make_loss_func(mb, stats, settings)(torch.ones(mb["loss_mask"].shape))[2]
    assert not any(k.startswith("task/absent/") for k in report)
    assert {"task/present/lm loss", "task/present/loss tokens"} <= set(report)
    with pytest.raises(DataFormatError, match="num_tasks=2"):
        make_loss_func(mb, global_batch_stats([mb], None), settings)(torch.ones(mb["loss_mask"].shape))


def test_loss_func_rejects_wrong_output_shape_and_bad_settings():
    mb = _micro_batch(10)
    stats = global_batch_stats([mb], None)
    with pytest.raises(DataFormatError, match="per-token loss"):
        make_loss_func(mb, stats, _settings("weight_sum", False))(torch.ones(3))
    with pytest.raises(ConfigError, match="num_microbatches"):
        LossSettings("weight_sum", 0, 1, False)
    with pytest.raises(ConfigError, match="calculate_per_token_loss"):
        LossSettings("weight_sum", 1, 1, 1)
    with pytest.raises(ConfigError, match="task_names"):
        LossSettings("weight_sum", 1, 1, False, task_names=("a", "a"))
    with pytest.raises(ConfigError, match="unknown"):
        LossSettings("mean", 1, 1, False)


def test_stock_loss_func_is_megatron_masked_sum():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    losses = torch.tensor([[1.0, 5.0, 2.0], [7.0, 3.0, 4.0]])
    loss, num_tokens, report = stock_loss_func(mask, losses)
    assert float(loss) == 10.0 and num_tokens.dtype == torch.int32 and int(num_tokens) == 4
    assert report["lm loss"].tolist() == [10.0, 4.0]
