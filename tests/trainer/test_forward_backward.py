"""The CPU step loop against direct formulas of Megatron's loss protocol (single rank; the DP x CP
reductions run in test_loss_invariance.py).

A linear toy model makes every micro-batch's gradient a known vector a_m, so the loop's result
can be written down: sum_m a_m / clamp(n_m, 1) / M without per-token loss, sum_m a_m / sum_m n_m
with it, sum_m a_m * cp / M for the 2-value form.
"""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.loss import (
    LossSettings,
    make_loss_func,
    per_token_cross_entropy,
)
from megatron_tokweight.trainer.forward_backward import (
    ScheduleConfig,
    finalize_grads,
    forward_backward,
)

K = 5


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones(K))


def _features(m):
    return torch.arange(1.0, K + 1) * (m + 1) + torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0]) * m


def _three_value(a, n, output):
    return output, torch.tensor(n, dtype=torch.int), {"x": torch.stack([output.detach(), torch.tensor(float(n))])}


def _two_value(output):
    return output, {"x": output.detach().reshape(1)}


def _step(form, data_iterator, model):
    a, n = next(data_iterator)
    output = (model.theta * a).sum()
    return output, (partial(_three_value, a, n) if form == 3 else _two_value)


def _run(counts, per_token, form=3, cp_size=1, **kw):
    model = Linear()
    data = [(_features(m), n) for m, n in enumerate(counts)]
    reports, total = forward_backward(
        partial(_step, form), iter(data), model, len(counts), ScheduleConfig(per_token, **kw), None, cp_size=cp_size
    )
    return model, data, reports, total


@pytest.mark.parametrize("counts", [[4, 0, 7], [3]])
def test_mean_of_means_without_per_token_loss(counts):
    model, data, reports, total = _run(counts, per_token=False)
    expected = sum(a / max(n, 1) for a, n in data) / len(counts)  # clamp(n, 1): n = 0 divides by 1
    torch.testing.assert_close(model.theta.grad, expected)
    assert total.dtype == torch.int32 and int(total) == sum(counts) and len(reports) == len(counts)


def test_per_token_loss_divides_by_the_int32_total():
    model, data, _, total = _run([4, 0, 7], per_token=True)
    torch.testing.assert_close(model.theta.grad, sum(a for a, _ in data) / 11)
    assert total.dtype == torch.int32 and int(total) == 11


def test_per_token_loss_with_no_tokens_leaves_gradients_unscaled():
    model, data, _, total = _run([0, 0], per_token=True)
    torch.testing.assert_close(model.theta.grad, sum(a for a, _ in data))
    assert int(total) == 0


def test_two_value_form_multiplies_by_cp_and_divides_by_micro_batches():
    for per_token in (False, True):
        model, data, reports, total = _run([9, 9, 9], per_token=per_token, form=2, cp_size=2)
        torch.testing.assert_close(model.theta.grad, sum(a for a, _ in data) * 2 / 3)
        assert int(total) == 0 and [r["x"].numel() for r in reports] == [1, 1, 1]


def test_forward_only_and_grad_scale_func():
    model = Linear()
    reports, total = forward_backward(partial(_step, 3), iter([(_features(0), 2)]), model, 1, ScheduleConfig(), forward_only=True)
    assert model.theta.grad is None and int(total) == 2
    assert reports[0]["x"].tolist() == [float(_features(0).sum()), 2.0]  # the report holds the unscaled loss
    scaled, data, _, _ = _run([2], per_token=False, grad_scale_func=lambda loss: loss * 8.0)
    torch.testing.assert_close(scaled.theta.grad, data[0][0] / 2 * 8.0)


def test_config_and_finalize_errors():
    assert ScheduleConfig.from_config(SimpleNamespace(calculate_per_token_loss=True)).calculate_per_token_loss
    with pytest.raises(ConfigError, match="calculate_per_token_loss"):
        ScheduleConfig.from_config(object())
    with pytest.raises(ConfigError, match="num_microbatches"):
        forward_backward(None, iter([]), Linear(), 0, ScheduleConfig())
    model = Linear()
    finalize_grads(model, None, None, False)  # a parameter without gradient gets zeros, as in DDP's buffer
    assert torch.equal(model.theta.grad, torch.zeros(K))
    with pytest.raises(ConfigError, match="total num_tokens"):
        finalize_grads(model, None, None, True)


# ----------------------------------------------------------------------------- end to end


def _batches(m, s=6, b=2, h=4, v=11):
    g = torch.Generator().manual_seed(m)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    return {
        "x": torch.randn(s, b, h, generator=g),
        "labels": torch.randint(0, v, (b, s), generator=g),
        "loss_mask": mask,
        "loss_weights": torch.rand(b, s, generator=g) * mask * (m + 1),
        "num_samples": torch.tensor([m + 1, 1]),
    }


def _weighted_step(stats, settings, data_iterator, model):
    mb = next(data_iterator)
    logits = model(mb["x"])  # [s, b, v]
    per_token = per_token_cross_entropy(logits, mb["labels"].t()).t()
    return per_token, make_loss_func(mb, stats, settings)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mode", ["weight_sum", "sample_count", "token_count"])
def test_weighted_loss_through_the_loop_gives_the_global_objective(mode, per_token):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 11)
    ref = torch.nn.Linear(4, 11).double()
    ref.load_state_dict(model.state_dict())
    mbs = [_batches(m) for m in range(3)]
    settings = LossSettings(mode, 3, 1, per_token)
    stats = settings.global_batch_stats(mbs)
    forward_backward(partial(_weighted_step, stats, settings), iter(mbs), model, 3, ScheduleConfig(per_token))

    total, z = 0.0, stats.normalizer(mode)
    for mb in mbs:
        logits = ref(mb["x"].double())
        l = F.cross_entropy(logits.reshape(-1, 11), mb["labels"].t().reshape(-1), reduction="none").reshape(6, 2).t()
        total = total + (l * mb["loss_weights"].double()).sum()
    (total / z).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-7)
