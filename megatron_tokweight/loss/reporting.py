"""Loss reports per micro-batch, in the `[sum, count]` form Megatron's training loop averages.

Megatron-LM's `train_step` takes, for every report key, the 2-element tensors of all
micro-batches, sums them, all-reduces the sum over the DP x CP group and logs sum / count.
`reduce_reports` does exactly that (one all-reduce for all keys) for the CPU loop and the demo.
Each micro-batch's report is local (this rank's tokens); the reduction is over DP x CP, never
TP (every TP rank holds the same tokens and reports the same values).

Keys (values float64 [2]; M micro-batches per rank, D = |DP x CP|):

| key | [sum, count] | after the reduction |
|---|---|---|
| `lm loss` | [sum l * mask, loss tokens] | unweighted mean loss (same as Megatron's stock key) |
| `weighted loss` | [sum w l, this micro-batch's share of Z] | L = sum w l / Z, the training objective |
| `task/NAME/lm loss` | [sum of the task's l, its loss tokens] | the task's unweighted mean loss |
| `task/NAME/weighted loss` | [sum of the task's w l, its weight] | the task's weighted mean loss |
| `task/NAME/loss tokens` | [the task's loss tokens, 1 / (M D)] | the task's loss-token count |
| `task/NAME/weight share` | [the task's weight, all weight] | the task's share of the step's total weight |
| `dataset/NAME/...` | the same four, per blended dataset (`dataset_id`) | |

Every denominator is non-zero after the reduction: a task or dataset key is present only when
the global batch (known before the step from `GlobalBatchStats`, so every rank and micro-batch
has the same keys) gives it a non-zero denominator, and `weighted loss` with Z = 0 is reported as
[0, 1 / (M D)], i.e. 0, the defined loss. Nothing turns into NaN.

`LossSettings.report = "objective"` keeps only `weighted loss`, as one fp32 pair (the size and
dtype of Megatron's stock `lm loss` report): no [4, tokens] float64 buffer and no group sums.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from megatron_tokweight.common.process_groups import group_size
from megatron_tokweight.errors import DataFormatError
from megatron_tokweight.loss.normalizer import (
    GlobalBatchStats,
    Normalization,
    token_group_ids,
)

REPORT_LEVELS = ("full", "objective")

# rows of the report's float64 token columns and of the per-group sums
_L, _WL, _W, _N = range(4)


def _token_columns(
    per_token_loss: torch.Tensor, weighted_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """[4, tokens] float64 rows l * mask, w l, w and loss token (0/1), in token order.

    One buffer filled in place: no float64 copy of each input plus a stacked copy of them all
    (the products are computed in float64, as `l.double() * mask.double()` would)."""
    columns = torch.empty(4, mask.numel(), dtype=torch.float64, device=mask.device)
    columns[_L].view(mask.shape).copy_(per_token_loss).mul_(mask)
    columns[_WL].view(mask.shape).copy_(weighted_loss)
    columns[_W].view(mask.shape).copy_(weights)
    columns[_N].view(mask.shape).copy_(selected)
    return columns


def _group_sums(ids: torch.Tensor, selected: torch.Tensor, columns: torch.Tensor, groups: int) -> torch.Tensor:
    """[4, groups] sums of the `columns` rows ([4, tokens], zero off the loss mask) by id. Ids of
    loss tokens were validated by the normalizer; other positions (id -1 on padding) go to group
    0, adding zeros. No boolean indexing, so no device sync."""
    index = torch.where(selected, ids, 0).reshape(-1)
    sums = torch.zeros(columns.shape[0], groups, dtype=torch.float64, device=columns.device)
    return sums.index_add_(1, index, columns)


_GROUP_KEYS = ("lm loss", "weighted loss", "loss tokens", "weight share")


def _group_block(sums: torch.Tensor, inv_contributors: torch.Tensor, local_weight: torch.Tensor) -> torch.Tensor:
    """[groups * 4, 2]: per group the rows of `_GROUP_KEYS`, in that order."""
    groups = sums.shape[1]
    return torch.stack(
        [
            sums[_L], sums[_N],  # lm loss: [sum l, tokens]
            sums[_WL], sums[_W],  # weighted loss: [sum w l, weight]
            sums[_N], inv_contributors.expand(groups),  # loss tokens: [tokens, 1 / (M D)]
            sums[_W], local_weight.expand(groups),  # weight share: [weight, all weight]
        ],
        dim=1,
    ).reshape(groups * len(_GROUP_KEYS), 2)


def _group_keys(prefix: str, names: Sequence[str], tokens, weight, total_weight: float):
    """(row index in the group block, key) of the keys whose global denominator is non-zero."""
    keep = []
    for k, name in enumerate(names):
        present = (tokens[k] > 0, tokens[k] > 0 and weight[k] > 0, tokens[k] > 0, tokens[k] > 0 and total_weight > 0)
        keep += [(k * len(_GROUP_KEYS) + j, f"{prefix}/{name}/{key}") for j, key in enumerate(_GROUP_KEYS) if present[j]]
    return keep


def _objective_row(weighted_sum, micro_batch, stats: GlobalBatchStats, settings, inv_contributors, local_weight, count):
    """The `weighted loss` pair [sum w l, this micro-batch's share of Z], or [0, 1 / (M D)] when
    Z = 0 (the defined zero loss). `local_weight` and `count` are called only if the mode needs
    them; everything is in the dtype of `inv_contributors`."""
    if stats.normalizer(settings.normalization) == 0:
        return [torch.zeros_like(inv_contributors), inv_contributors]
    mode = settings.normalization
    if mode is Normalization.WEIGHT_SUM:
        share = local_weight()
    elif mode is Normalization.TOKEN_COUNT:
        share = count()
    elif settings.cp_rank == 0:
        share = micro_batch["num_samples"].to(inv_contributors.dtype).sum().to(inv_contributors.device)
    else:  # samples are counted on CP rank 0 only (normalizer.py)
        share = torch.zeros_like(inv_contributors)
    return [weighted_sum.to(inv_contributors.dtype), share]


def micro_batch_report(
    per_token_loss: torch.Tensor,
    weighted_loss: torch.Tensor,
    micro_batch: Mapping[str, torch.Tensor],
    stats: GlobalBatchStats,
    settings,
    weighted_sum: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """This micro-batch's report (keys in the module docstring); `settings` is a `LossSettings`.

    `per_token_loss` l and `weighted_loss` w * l have the shape of `loss_mask`; `weighted_sum`,
    if given, is `weighted_loss.sum()` already computed by the caller. No collective, no host
    sync; the values are the rows of one [keys, 2] tensor.
    """
    mask = micro_batch["loss_mask"]
    weights = micro_batch["loss_weights"]
    dtype = torch.float32 if settings.report == "objective" else torch.float64
    with torch.no_grad():
        inv_contributors = torch.full((), 1.0 / (settings.num_microbatches * settings.dp_cp_size), dtype=dtype, device=mask.device)
        if settings.report == "objective":
            # weights are 0 off the loss mask (checked by the normalizer), so their sum is the loss tokens' weight
            weighted_sum = weighted_loss.detach().sum() if weighted_sum is None else weighted_sum.detach()
            row = _objective_row(weighted_sum, micro_batch, stats, settings, inv_contributors,
                                 lambda: weights.sum(dtype=dtype), lambda: torch.count_nonzero(mask).to(dtype))
            return {"weighted loss": torch.stack(row)}
        selected = mask != 0
        columns = _token_columns(per_token_loss.detach(), weighted_loss.detach(), mask, weights, selected)
        count = selected.sum().double()
        local_weight = columns[_W].sum()
        weighted_row = _objective_row(columns[_WL].sum(), micro_batch, stats, settings, inv_contributors,
                                      lambda: local_weight, lambda: count)
        blocks = [torch.stack([columns[_L].sum(), count, *weighted_row]).reshape(2, 2)]
        keys = [(0, "lm loss"), (1, "weighted loss")]

        groups = []
        if settings.task_names:
            groups.append(("task", "task_ids", settings.task_names, stats.task_loss_tokens, stats.task_weight_sum))
        if settings.dataset_names:
            groups.append(("dataset", "dataset_id", settings.dataset_names, stats.dataset_loss_tokens, stats.dataset_weight_sum))
        offset = 2
        for prefix, key, names, tokens, weight in groups:
            if len(tokens) != len(names):
                raise DataFormatError(
                    f"GlobalBatchStats has totals for {len(tokens)} {prefix}s but {len(names)} {prefix} names are configured; "
                    f"compute the stats with num_{prefix}s={len(names)} (LossSettings.global_batch_stats does)"
                )
            # weights are 0 off the loss mask (checked by the normalizer): every column is 0 there
            sums = _group_sums(token_group_ids(micro_batch, key, mask), selected, columns, len(names))
            blocks.append(_group_block(sums, inv_contributors, local_weight))
            keys += [(offset + row, name) for row, name in _group_keys(prefix, names, tokens, weight, stats.weight_sum)]
            offset += len(names) * len(_GROUP_KEYS)
        table = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        rows = [row for row, _ in keys]
        if rows != list(range(table.shape[0])):  # row views and one stack: no index tensor to copy to the device
            table = torch.stack([table[row] for row in rows])
    return dict(zip((name for _, name in keys), table))


def reduce_reports(reports: List[Mapping[str, torch.Tensor]], dp_cp_group=None) -> Dict[str, float]:
    """What Megatron-LM's training loop logs from the micro-batches' reports of one step.

    2-element values: summed over micro-batches, all-reduced (SUM) over `dp_cp_group`, then
    sum / count. 1-element values (the legacy 2-value loss form): the mean over micro-batches,
    not reduced. One all-reduce over `dp_cp_group` for all keys together; never over TP.
    """
    if not reports:
        return {}
    keys = list(reports[0])
    for index, report in enumerate(reports):
        if list(report) != keys:
            raise DataFormatError(
                f"micro-batch {index} reports keys {sorted(report)} but micro-batch 0 reports {sorted(keys)}; "
                "Megatron's training loop needs the same keys from every micro-batch"
            )
    pairs = [key for key in keys if reports[0][key].numel() == 2]
    singles = [key for key in keys if reports[0][key].numel() == 1]
    bad = [key for key in keys if key not in pairs and key not in singles]
    if bad:
        raise DataFormatError(f"report values must hold 1 or 2 elements; keys {bad} do not")
    out: Dict[str, float] = {}
    if pairs:
        sums = torch.stack(
            [torch.stack([report[key].reshape(-1).double() for report in reports]).sum(0) for key in pairs]
        )
        if group_size(dp_cp_group) > 1:
            torch.distributed.all_reduce(sums, group=dp_cp_group)
        for key, (total, count) in zip(pairs, sums.tolist()):
            out[key] = total / count if count else float("nan")
    for key in singles:
        out[key] = float(torch.stack([report[key].reshape(()).double() for report in reports]).mean())
    return {key: out[key] for key in keys}
