"""log p(label) from vocab-parallel logits, reduced over the tensor-parallel group, without grad.

Under TP each rank holds logits for a contiguous vocabulary shard [rank * v/tp, (rank+1) * v/tp)
(Megatron's `VocabUtility` layout). log p(y) = z_y - logsumexp_v z_v from each shard's max, sum of
exp(z - max) and target logit (held by exactly one shard, 0 elsewhere): one all-gather over
`tp_group` (`merge_shard_statistics`, shared with the fused loss). Every rank ends with the same
values. Scores are weights, not a loss: nothing here is differentiated.
"""
import torch

from megatron_tokweight.common.process_groups import group_rank, group_size
from megatron_tokweight.loss.fused_linear_cross_entropy import merge_shard_statistics


@torch.no_grad()
def target_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """fp32 log-probability of `labels` [...]; `logits` [..., v/tp] (the local vocab shard).

    tp_group None (or of size 1) means the logits hold the full vocabulary.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "logits must be labels' shape plus a vocabulary dimension"
        )

    tp_size = group_size(tp_group)
    logits = logits.detach().float()
    local_vocab = logits.shape[-1]
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= local_vocab * tp_size):
        raise ValueError(
            f"labels must lie in [0, {local_vocab * tp_size}) (the model vocabulary); "
            f"got {labels.min().item()}..{labels.max().item()}"
        )
    if tp_size == 1:
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    from megatron.core.tensor_parallel.utils import VocabUtility

    first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(
        local_vocab, group_rank(tp_group), tp_size
    )
    maximum = logits.amax(dim=-1)
    sum_exp = (logits - maximum.unsqueeze(-1)).exp().sum(dim=-1)
    mine = (labels >= first) & (labels < last)
    local_index = torch.where(mine, labels - first, torch.zeros_like(labels))
    target = logits.gather(-1, local_index.unsqueeze(-1)).squeeze(-1)
    target = torch.where(mine, target, torch.zeros_like(target))
    lse, target = merge_shard_statistics(maximum, sum_exp, target, tp_group)
    return target - lse

