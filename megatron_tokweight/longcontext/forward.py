"""Scoring forwards: a GPT model's log p(label) on packed rows and on short-context windows.

Both run under no_grad with the model in eval mode (dropout off, so scores are deterministic) and
restore its training flag afterwards, and the torch (CPU and current CUDA device) RNG states: a
training step that scores first draws the same dropout masks as one that does not. Inputs are on
the model's device. Logits stay vocab-parallel; `target_logprobs` reduces them over `tp_group`,
so every TP rank of a group gets the same values.
"""
from contextlib import contextmanager

import torch

from megatron_tokweight.longcontext.logprobs import target_logprobs
from megatron_tokweight.longcontext.windows import WindowPlan, split_plan


@contextmanager
def scoring_mode(model):
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)


def stream_logprobs(model, batch: dict, tp_group=None) -> torch.Tensor:
    """log p(labels) [T] (fp32, full context) of a flattened THD micro-batch
    (`data.thd_batch.flatten_rows` format: per-token keys [1, T])."""
    with scoring_mode(model):
        return _logprobs(model, batch, batch["labels"].reshape(-1), tp_group)


def _logprobs(model, batch: dict, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """log p(labels) [T] of one packed forward: through the fused output layer when the model has
    it (no logits), else from the vocab-parallel logits."""
    from megatron_tokweight.model.fused_output import fused_enabled, fused_logprobs
    from megatron_tokweight.model.gpt import packed_logits

    if fused_enabled(model):
        return fused_logprobs(model, batch, labels)
    logits = packed_logits(model, batch)[:, 0]  # [T, v/tp]
    return target_logprobs(logits, labels, tp_group)


def window_logprobs(
    model,
    plan: WindowPlan,
    flat_tokens: torch.Tensor,
    flat_labels: torch.Tensor,
    out: torch.Tensor,
    tp_group=None,
    max_tokens: int = 8192,
) -> torch.Tensor:
    """Write into `out` (flat, fp32) the log p(label) of every position `plan` scores.

    flat_tokens / flat_labels: the source positions' tokens and labels (label = the token that
    position predicts). Windows run in packed batches of at most `max_tokens` tokens (a single
    longer window runs alone).
    """
    flat_tokens = flat_tokens.reshape(-1)
    flat_labels = flat_labels.reshape(-1)
    with scoring_mode(model):
        for part in split_plan(plan, max_tokens):
            batch = part.batch(flat_tokens)
            # the windowed stream's labels: each scored position's, 0 (a valid id) elsewhere
            labels = torch.zeros(batch["tokens"].numel(), dtype=flat_labels.dtype, device=batch["tokens"].device)
            score_from, score_to = part.score_from.to(labels.device), part.score_to.to(out.device)
            labels[score_from] = flat_labels[score_to.to(flat_labels.device)].to(labels.device)
            out[score_to] = _logprobs(model, batch, labels, tp_group)[score_from].to(out.device)
    return out
