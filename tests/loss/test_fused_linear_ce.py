"""The fused linear weighted cross-entropy against plain float64 torch, one process.

The distributed cases (TP 1/2/4, sequence parallel, micro-batches, every normalization mode) are
in `test_loss_invariance.py`; here: chunking, zero weights, the backward's shortcut and its exact
recompute, log-probs, bf16, Megatron's main_grad fusion, bad input, and the Triton kernels under
Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_tokweight.errors import DataFormatError
from megatron_tokweight.loss import (
    fused_linear_weighted_cross_entropy,
    fused_target_logprobs,
)
from megatron_tokweight.loss.fused_linear_cross_entropy import STATS

S, B, H, V = 23, 2, 16, 40


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype)
    labels = torch.randint(0, V, (S, B), generator=g)
    weights = torch.rand(S, B, generator=g) * 3
    weights[::4] = 0.0  # zero-weight tokens
    return hidden, weight, labels, weights


def _reference(hidden, weight, labels, weights, grad_output=None):
    """Float64: per-token w * l and the gradients for hidden and weight."""
    x = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = F.cross_entropy((x @ w.t()).reshape(-1, V), labels.reshape(-1), reduction="none").reshape(S, B)
    weighted = loss * weights.double()
    weighted.backward(torch.full_like(weighted, 0.37) if grad_output is None else grad_output.double())
    return weighted.detach(), x.grad, w.grad


def _fused(hidden, weight, labels, weights, grad_output=None, **kwargs):
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_weighted_cross_entropy(x, w, labels, weights, **kwargs)
    if grad_output is None:
        (out.sum() * 0.37).backward()  # the schedules' form: a sum times a constant
    else:
        out.backward(grad_output)
    return out.detach(), x.grad, w.grad


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, None, 10_000])
def test_equals_the_float64_reference_for_any_chunk_size(chunk_size):
    inputs = _inputs()
    before = STATS.shortcut_backwards
    for got, ref in zip(_fused(*inputs, chunk_size=chunk_size), _reference(*inputs)):
        assert _rel(got, ref) < 2e-6
    assert STATS.shortcut_backwards == before + 1


def test_zero_weights_give_exactly_zero_loss_and_gradient():
    hidden, weight, labels, weights = _inputs()
    out, grad_x, _ = _fused(hidden, weight, labels, weights, chunk_size=4)
    zero = weights == 0
    assert (out[zero] == 0).all() and (grad_x[zero] == 0).all()
    out, grad_x, grad_w = _fused(hidden, weight, labels, torch.zeros_like(weights), chunk_size=4)
    assert not out.any() and not grad_x.any() and not grad_w.any()


def test_per_token_grad_output_is_recomputed_exactly():
    inputs = _inputs(1)
    grad_output = torch.rand(S, B, generator=torch.Generator().manual_seed(5))
    recomputed = STATS.recomputed_backwards
    for got, ref in zip(_fused(*inputs, grad_output, chunk_size=7), _reference(*inputs, grad_output)):
        assert _rel(got, ref) < 2e-6
    assert STATS.recomputed_backwards == recomputed + 1
    # a materialised uniform tensor is recognised (one device comparison) and takes the shortcut
    shortcut = STATS.shortcut_backwards
    _fused(*inputs, torch.full((S, B), 0.37), chunk_size=7)
    assert STATS.shortcut_backwards == shortcut + 1 and STATS.recomputed_backwards == recomputed + 1


def test_logprobs_and_no_grad_scoring():
    hidden, weight, labels, weights = _inputs(2)
    expected = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    _, logprobs = fused_linear_weighted_cross_entropy(hidden, weight, labels, weights, return_logprobs=True, chunk_size=6)
    assert _rel(logprobs, expected) < 2e-6 and not logprobs.requires_grad
    scored = fused_target_logprobs(hidden.requires_grad_(), weight, labels, chunk_size=6)
    assert _rel(scored, expected) < 2e-6 and scored.grad_fn is None


def test_bf16_matches_megatrons_bf16_output_layer_path():
    """bf16 logits from the matmul, the cross-entropy in fp32 (Megatron's order)."""
    hidden, weight, labels, weights = _inputs(3, torch.bfloat16)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy((x @ w.t()).float().reshape(-1, V), labels.reshape(-1), reduction="none").reshape(S, B)
    (loss * weights).sum().backward()
    out, grad_x, grad_w = _fused(hidden, weight, labels, weights, chunk_size=8)
    assert grad_x.dtype == grad_w.dtype == torch.bfloat16
    assert _rel(out, loss.detach() * weights) < 1e-5
    assert _rel(grad_x.float() / 0.37, x.grad) < 2e-2 and _rel(grad_w.float() / 0.37, w.grad) < 2e-2


def test_weight_gradient_goes_to_main_grad_with_accumulation_fusion():
    hidden, weight, labels, weights = _inputs(4)
    _, _, ref_w = _reference(hidden, weight, labels, weights)
    w = weight.clone().requires_grad_()
    w.main_grad = torch.ones(V, H)  # Megatron's fp32 buffer, already holding an earlier micro-batch
    w.grad_added_to_main_grad = False
    out = fused_linear_weighted_cross_entropy(hidden, w, labels, weights, main_grad_fusion=True)
    (out.sum() * 0.37).backward()
    assert w.grad_added_to_main_grad and not w.grad.any()
    assert _rel(w.main_grad - 1, ref_w) < 2e-6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, y, t: (h[..., :-1], w, y, t), "hidden size"),
        (lambda h, w, y, t: (h, w, y[:-1], t), "labels have shape"),
        (lambda h, w, y, t: (h, w, y, t[:, :1]), "weights has shape"),
        (lambda h, w, y, t: (h, w, y.float(), t), "integer"),
        (lambda h, w, y, t: (h, w.double(), y, t), "dtype"),
        (lambda h, w, y, t: (h, w, y.clone().fill_(V), t), "outside [0, 40)"),
        (lambda h, w, y, t: (h, w, y, t.clone().fill_(float("nan"))), "NaN/inf"),
        (lambda h, w, y, t: (h, w, y, -t - 1), "negative"),
        (lambda h, w, y, t: (h[0], w, y, t), "[s, b, h]"),
    ],
)
def test_bad_input_is_refused_before_any_chunk(change, message):
    forwards = STATS.forwards
    with pytest.raises(DataFormatError) as error:
        fused_linear_weighted_cross_entropy(*change(*_inputs()))
    assert message in str(error.value)
    assert STATS.forwards == forwards


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from megatron_tokweight.common.cpu_math import settle_vector_math
    from megatron_tokweight.loss import fused_ce_torch, fused_ce_triton
    from megatron_tokweight.loss.fused_linear_cross_entropy import fused_linear_weighted_cross_entropy

    settle_vector_math()  # before the first multi-threaded exp (the module says why)
    g = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(7, 1500, generator=g) * 4).to(dtype)  # two vocabulary tiles, ragged
        local = torch.randint(0, 1500, (7,), generator=g)
        mine = torch.rand(7, generator=g) > 0.3
        scale = torch.rand(7, generator=g)
        a = fused_ce_torch.chunk_statistics(logits.clone(), local, mine)
        b = fused_ce_triton.chunk_statistics(logits.clone(), local, mine)
        lse = a[1] + torch.log(a[2])
        ga = fused_ce_torch.chunk_gradient_(a[0], a[1], lse, local, mine, scale, dtype)
        gb = fused_ce_triton.chunk_gradient_(b[0], b[1], lse, local, mine, scale, dtype)
        rel = lambda x, y: float((x.double() - y.double()).abs().max() / y.double().abs().max())
        worst[str(dtype)] = max(rel(b[1], a[1]), rel(b[2], a[2]), rel(b[3], a[3]), rel(gb, ga))
    hidden = torch.randn(9, 2, 16, generator=g)
    weight = torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 70, (9, 2), generator=g)
    weights = torch.rand(9, 2, generator=g)
    grads = {}
    for impl in ("torch", "triton"):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_weighted_cross_entropy(x, w, labels, weights, chunk_size=4, implementation=impl)
        out.sum().backward()
        grads[impl] = (out.detach(), x.grad, w.grad)
    worst["function"] = max(rel(b, a) for a, b in zip(grads["torch"], grads["triton"]))
    print(worst)
    assert worst["torch.float32"] < 1e-6 and worst["function"] < 1e-6, worst
    assert worst["torch.bfloat16"] < 1e-2, worst  # bf16 storage of the gradient: 8 mantissa bits
    """
)


def test_triton_kernels_equal_the_torch_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from megatron_tokweight.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        fused_linear_weighted_cross_entropy(*_inputs(), implementation="triton")
