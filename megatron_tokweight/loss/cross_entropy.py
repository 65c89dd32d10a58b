"""Per-token and weighted vocab-parallel cross-entropy on Megatron's implementation.

`weighted_cross_entropy(logits, labels, weights, tp_group)` returns w_t * l_t, [s, b] fp32,
where l_t is Megatron's `tensor_parallel.vocab_parallel_cross_entropy`. Megatron's backward is
(softmax - onehot) * grad_output per token, so multiplying the per-token loss by w_t gives the
exact weighted gradient through plain autograd: no extra [s, b, v] tensor, no custom kernel.

Which implementation runs (`cross_entropy_path(tp_group)` says it):

- ``"megatron"``: Megatron's `vocab_parallel_cross_entropy` on Megatron's global TP group. Used
  when `tp_group` is None and Megatron's parallel state is initialised, or when `tp_group` has the
  same ranks as that global group.
- ``"megatron-tp-group"``: Megatron's function with `tp_group=` passed through, on Megatron
  versions whose signature accepts it (0.16.1 does not).
- ``"explicit-group"``: on Megatron versions without `tp_group`, for any other group (a subgroup
  made with `torch.distributed.new_group`), or with no TP at all (`tp_group` None and Megatron's
  parallel state not initialised, or a group of one). The forward and backward are Megatron's own
  `VocabParallelCrossEntropy` steps, in Megatron's order; only the three all-reduces name the
  group explicitly. Same math, same round-off.

Like Megatron, every path overwrites fp32 logits in place (they become the softmax kept for the
backward), so a caller must not reuse fp32 logits after the call; bf16/fp16 logits are copied to
fp32 first. Label smoothing is not offered: Megatron's is wrong for TP > 1.
"""
import functools
import inspect
from typing import Optional

import torch

from megatron_tokweight.common.process_groups import group_rank, group_size
from megatron_tokweight.errors import DataFormatError
from megatron_tokweight.loss import checks

PATH_MEGATRON = "megatron"
PATH_MEGATRON_TP_GROUP = "megatron-tp-group"
PATH_EXPLICIT_GROUP = "explicit-group"


@functools.lru_cache(maxsize=None)
def _megatron_accepts_tp_group() -> bool:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters


def _megatron_tp_group():
    """Megatron's global TP group, or None when its parallel state is not initialised."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def _ranks(group) -> tuple:
    return tuple(torch.distributed.get_process_group_ranks(group))


def cross_entropy_path(tp_group=None) -> str:
    """Name of the implementation `weighted_cross_entropy(..., tp_group)` runs (module docstring)."""
    global_group = _megatron_tp_group()
    if tp_group is None:
        return PATH_EXPLICIT_GROUP if global_group is None else PATH_MEGATRON
    if global_group is not None and (tp_group is global_group or _ranks(tp_group) == _ranks(global_group)):
        return PATH_MEGATRON
    if _megatron_accepts_tp_group():
        return PATH_MEGATRON_TP_GROUP
    return PATH_EXPLICIT_GROUP


class _ExplicitGroupCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy with the TP group as an argument (None: no TP)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, group):
        from megatron.core.tensor_parallel.cross_entropy import (
            VocabParallelCrossEntropy as steps,
        )
        from megatron.core.tensor_parallel.utils import VocabUtility

        size, rank = group_size(group), group_rank(group)
        logits, logits_max = steps.calculate_logits_max(vocab_parallel_logits)
        if size > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.size(-1), rank, size)
        target_mask, masked_target_1d, predicted_logits, sum_exp_logits, exp_logits = steps.calculate_predicted_logits(
            logits, target, logits_max, start, end
        )
        if size > 1:
            torch.distributed.all_reduce(predicted_logits, op=torch.distributed.ReduceOp.SUM, group=group)
            torch.distributed.all_reduce(sum_exp_logits, op=torch.distributed.ReduceOp.SUM, group=group)
        softmax, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted_logits, sum_exp_logits)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        from megatron.core.tensor_parallel.cross_entropy import (
            VocabParallelCrossEntropy as steps,
        )

        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = steps.prepare_gradient_calculation_operands(softmax, target_mask)
        grad_input = steps.calculate_gradients(grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input, grad_output)
        return grad_input, None, None


def _tp_size(tp_group) -> int:
    if tp_group is None:
        group = _megatron_tp_group()
        return group_size(group)
    return group_size(tp_group)


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataFormatError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise DataFormatError(
            f"vocab-parallel logits must be [s, b, vocab / TP] with labels [s, b]; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )


def _validate(labels: torch.Tensor, vocab_size: int, weights: Optional[torch.Tensor]) -> None:
    # one host sync for every check; the messages are built only on failure
    flags = [((labels < 0) | (labels >= vocab_size)).sum().to(torch.float64)]
    if weights is not None:
        flags.append(checks.weight_flags(weights).sum())
    if any(torch.stack(flags).tolist()):
        checks.check_labels(labels, vocab_size)
        if weights is not None:
            checks.check_weights(weights, name="weights")


def per_token_cross_entropy(
    vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, tp_group=None, *, validate: bool = True
) -> torch.Tensor:
    """Per-token cross-entropy l_t, [s, b] fp32, from logits sharded over the vocabulary.

    Args:
        vocab_parallel_logits: [s, b, vocab / TP]; this TP rank's contiguous vocabulary shard
            (rank r holds ids [r * v_local, (r + 1) * v_local)). fp32 logits are overwritten.
        labels: [s, b] integer ids in [0, v_local * TP).
        tp_group: the tensor-parallel group (module docstring for None).
        validate: check labels (one host sync); off only when the caller already checked them.

    Collectives, all on the TP group, all in the forward: all-reduce MAX of the per-token max
    logit, all-reduce SUM of the target logit, all-reduce SUM of the exp-sum. The backward
    communicates nothing. Nothing is reduced over DP or CP.
    """
    if not isinstance(vocab_parallel_logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataFormatError("per_token_cross_entropy takes tensors (logits, labels)")
    _check_shapes(vocab_parallel_logits, labels)
    if validate:
        _validate(labels, vocab_parallel_logits.size(-1) * _tp_size(tp_group), None)
    return _cross_entropy(vocab_parallel_logits, labels, tp_group)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    labels = labels.contiguous()  # Megatron flattens the target with view(-1)
    path = cross_entropy_path(tp_group)
    if path == PATH_MEGATRON:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, labels)
    if path == PATH_MEGATRON_TP_GROUP:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group)
    return _ExplicitGroupCrossEntropy.apply(logits, labels, tp_group)


def apply_token_weights(per_token_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_t * l_t in fp32. A weight of 0 gives exactly 0 (l_t is finite for finite logits), and
    its token's logit gradient is exactly 0: Megatron's backward multiplies by grad_output = w_t."""
    return per_token_loss.float() * weights.float()


def weighted_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    tp_group=None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """w_t * l_t, [s, b] fp32: token-weighted vocab-parallel cross-entropy.

    Args:
        vocab_parallel_logits: [s, b, vocab / TP], this TP rank's vocabulary shard. fp32 logits
            are overwritten in place (as in Megatron); bf16/fp16 are copied to fp32.
        labels: [s, b] integer ids in [0, vocab); vocab = local shard x TP size.
        weights: [s, b] float, finite and >= 0. The SAME on every rank of the TP group (every TP
            rank holds the same tokens); never summed over it.
        tp_group: the tensor-parallel group; see the module docstring for which implementation
            runs (`cross_entropy_path`).
        validate: check shapes, labels and weights with one host sync (errors name positions).

    Collectives: three all-reduces over `tp_group` in the forward (MAX of the per-token max
    logit, SUM of the target logit, SUM of the exp-sum; skipped for a group of one), none in the
    backward. No DP, CP or PP communication: normalization is `normalizer`'s job.

    A weight of 0 contributes exactly 0 to the value and to the gradient, whatever the label
    (a pad id included), as long as it lies in the vocabulary.
    """
    if not all(isinstance(t, torch.Tensor) for t in (vocab_parallel_logits, labels, weights)):
        raise DataFormatError("weighted_cross_entropy takes tensors (logits, labels, weights)")
    _check_shapes(vocab_parallel_logits, labels)
    checks.check_same_shape("weights", weights, "labels", labels)
    if not weights.is_floating_point():
        raise DataFormatError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if validate:
        _validate(labels, vocab_parallel_logits.size(-1) * _tp_size(tp_group), weights)
    return apply_token_weights(_cross_entropy(vocab_parallel_logits, labels, tp_group), weights)
