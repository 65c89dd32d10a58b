"""Held-out evaluation: the unweighted per-task mean loss of an eval prefix (no weighting)."""
from typing import Dict

from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.forward_backward import (
    make_forward_step,
    settings_schedule,
)
from megatron_tokweight.trainer.micro_batches import Groups, RowReader, _Truncated


def evaluate(model, dataset, task_names, groups: Groups, config: TrainConfig, max_rows=None) -> Dict[str, float]:
    """Held-out loss: {"lm loss": mean over all targets, task: the task's unweighted mean}."""
    import torch

    from megatron_tokweight.loss import LossSettings, reduce_reports
    from megatron_tokweight.trainer.forward_backward import forward_backward

    rows = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    mbs, dp = config.micro_batch_size, config.data_parallel_size
    starts = list(range(groups.dp_rank * mbs, rows, mbs * dp))
    reader = RowReader(_Truncated(dataset, rows), groups, mbs, dp)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        micro_batches = [reader.micro_batch(s) for s in starts]
        settings = LossSettings("token_count", len(micro_batches), dp, config.calculate_per_token_loss,
                                task_names=tuple(task_names))
        stats = settings.global_batch_stats([b for b, _ in micro_batches], groups.dp)
        reports, _ = forward_backward(
            make_forward_step(stats, settings, config.fused_cross_entropy != "off"), iter(micro_batches), model, len(micro_batches),
            settings_schedule(config), groups.dp, forward_only=True,
        )
    model.train(was_training)
    reduced = reduce_reports(reports, groups.dp)
    out = {"lm loss": reduced["lm loss"]}
    for name in task_names:
        key = f"task/{name}/lm loss"
        if key in reduced:
            out[name] = reduced[key]
    return out
