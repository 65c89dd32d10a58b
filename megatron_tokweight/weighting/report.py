"""Per-task share of the loss: how much of the total token weight each task holds.

Every loss token of sample i carries w_i, so task k holds sum_{i in k} w_i * n_i of the total
weight; under `weight_sum` normalization that is its share of the loss (and, for equal per-token
losses, of the gradient).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_tokweight.errors import TokweightError
from megatron_tokweight.weighting.sample_rules import SampleWeightReport


@dataclass(frozen=True)
class TaskWeightShare:
    task: str
    samples: int
    loss_tokens: int
    token_share: float  # of all loss tokens
    total_weight: float  # sum of w_i * n_i
    weight_share: float  # of the total weight


def weight_share_by_task(
    task_names: Sequence[str], task_ids, n_answer, weights
) -> List[TaskWeightShare]:
    """One `TaskWeightShare` per entry of `task_names` (task id = index), in that order."""
    task_ids = np.asarray(task_ids)
    n_answer = np.asarray(n_answer)
    weights = np.asarray(weights, dtype=np.float64)
    if not (task_ids.shape == n_answer.shape == weights.shape) or task_ids.ndim != 1:
        raise TokweightError(
            f"task_ids {task_ids.shape}, n_answer {n_answer.shape} and weights {weights.shape} must be 1-D of equal length"
        )
    num_tasks = len(task_names)
    if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
        raise TokweightError(f"task ids must lie in [0, {num_tasks}), got range [{task_ids.min()}, {task_ids.max()}]")
    ids = task_ids.astype(np.int64)
    samples = np.bincount(ids, minlength=num_tasks)
    tokens = np.bincount(ids, weights=n_answer.astype(np.float64), minlength=num_tasks)
    total = np.bincount(ids, weights=weights * n_answer, minlength=num_tasks)
    token_sum, weight_sum = tokens.sum(), total.sum()
    return [
        TaskWeightShare(
            task=str(task_names[k]),
            samples=int(samples[k]),
            loss_tokens=int(tokens[k]),
            token_share=float(tokens[k] / token_sum) if token_sum else 0.0,
            total_weight=float(total[k]),
            weight_share=float(total[k] / weight_sum) if weight_sum else 0.0,
        )
        for k in range(num_tasks)
    ]


def weight_share_for_metadata(meta, config) -> Tuple[List[TaskWeightShare], SampleWeightReport]:
    """Per-task shares of a prepared dataset under `config` (a preset name or a `WeightingConfig`)
    from its sidecar `meta` (`data.sidecar.read_sidecar(prefix)`): whole untruncated samples,
    sample rules only (token rules need the tokens and are not applied here)."""
    from megatron_tokweight.weighting.config import WeightingConfig
    from megatron_tokweight.weighting.weighter import Weighter

    config = WeightingConfig(preset=config) if isinstance(config, str) else config
    weighter = Weighter(config, meta.task_names, meta.span_kinds, int(meta.tokenizer["vocab_size"]))
    weights, report = weighter.sample_weights_with_report(meta.task_id, meta.n_answer, meta.group_id)
    return weight_share_by_task(meta.task_names, meta.task_id, meta.n_answer, weights), report


def format_weight_share(rows: Sequence[TaskWeightShare], title: Optional[str] = None) -> str:
    """A plain-text table (one line per task and a total line) for logs and CLI output."""
    header = ("task", "samples", "loss tokens", "token share", "total weight", "weight share")
    body = [
        (r.task, f"{r.samples:,}", f"{r.loss_tokens:,}", f"{100 * r.token_share:.2f}%",
         f"{r.total_weight:,.1f}", f"{100 * r.weight_share:.2f}%")
        for r in rows
    ]
    body.append((
        "total",
        f"{sum(r.samples for r in rows):,}",
        f"{sum(r.loss_tokens for r in rows):,}",
        "100.00%" if any(r.loss_tokens for r in rows) else "0.00%",
        f"{sum(r.total_weight for r in rows):,.1f}",
        "100.00%" if any(r.total_weight for r in rows) else "0.00%",
    ))
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def fmt(line):
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "-" * len(fmt(header))
    lines = ([title] if title else []) + [fmt(header), rule] + [fmt(line) for line in body[:-1]] + [rule, fmt(body[-1])]
    return "\n".join(lines)
