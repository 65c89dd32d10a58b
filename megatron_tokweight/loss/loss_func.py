"""The loss function in Megatron's schedule protocol, scaled so the stock schedules produce L exactly.

Megatron-Core 0.16.1 (`pipeline_parallel/schedules.py: forward_step_calc_loss`,
`distributed/distributed_data_parallel.py`, `distributed/finalize_model_grads.py`) treats a loss
function returning `(loss, num_tokens, report)` as follows, M micro-batches per rank, D = |DP x CP|:

- `calculate_per_token_loss=False`: backward of loss / clamp(num_tokens, 1) / M per micro-batch;
  DDP scales gradients by 1/D and sums them over DP x CP.
- `calculate_per_token_loss=True`: backward of loss as is; the int32 sum of num_tokens over the
  micro-batches is all-reduced over DP x CP in `finalize_model_grads`, and the summed gradients
  are scaled by 1 / that total (when it is > 0).

With S = sum of this micro-batch's w_t l_t, n = its loss tokens, T and Z from `GlobalBatchStats`,
`weighted_loss_func` returns num_tokens = n and

- without per-token loss: loss = S * clamp(n, 1) * M * D / Z, so the schedule's gradient is S / Z;
- with per-token loss:    loss = S * T / Z, so finalize's 1 / T leaves S / Z.

Summed over all micro-batches and ranks, the gradient is that of L = sum_G w l / Z in both
settings (Z = 0 gives a zero loss and zero gradients, never NaN). `num_tokens` sums to T exactly
because both use `count_loss_tokens` on the same micro-batches.

The loss function takes the per-token cross-entropy l (the shape of `loss_mask`), which is what
Megatron's `GPTModel(..., labels=...)` returns and what the stock `pretrain_gpt.loss_func`
consumes; from logits use `per_token_cross_entropy`.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.loss import checks
from megatron_tokweight.loss.cross_entropy import apply_token_weights
from megatron_tokweight.loss.normalizer import (
    GlobalBatchStats,
    Normalization,
    count_loss_tokens,
    global_batch_stats,
)
from megatron_tokweight.loss.reporting import REPORT_LEVELS, micro_batch_report

LossOutput = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossSettings:
    """What a step's loss functions need besides the data.

    normalization: "weight_sum" | "sample_count" | "token_count".
    num_microbatches: M, micro-batches per rank in the step (as given to the schedule).
    dp_cp_size: D, size of the data-parallel x context-parallel group.
    calculate_per_token_loss: the value in Megatron's model config.
    cp_rank: this rank's index in its context-parallel group (samples count on CP rank 0).
    task_names, dataset_names: names for the per-task / per-dataset reports (index = id).
    report: "full" (float64 `lm loss`, `weighted loss` and the per-task / per-dataset keys of
        `reporting`) or "objective" (only `weighted loss`, the training objective L, as one fp32
        [sum, count] pair like Megatron's stock `lm loss`: no per-token float64 buffer, no
        per-group sums; for runs that log nothing else).
    """

    normalization: Union[Normalization, str]
    num_microbatches: int
    dp_cp_size: int
    calculate_per_token_loss: bool
    cp_rank: int = 0
    task_names: Tuple[str, ...] = field(default=())
    dataset_names: Tuple[str, ...] = field(default=())
    report: str = "full"

    def __post_init__(self):
        object.__setattr__(self, "normalization", Normalization.parse(self.normalization))
        if self.report not in REPORT_LEVELS:
            raise ConfigError(f"LossSettings.report must be one of {REPORT_LEVELS}, got {self.report!r}")
        for name in ("num_microbatches", "dp_cp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LossSettings.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.cp_rank, bool) or not isinstance(self.cp_rank, int) or self.cp_rank < 0:
            raise ConfigError(f"LossSettings.cp_rank must be an integer >= 0, got {self.cp_rank!r}")
        if not isinstance(self.calculate_per_token_loss, bool):
            raise ConfigError(f"LossSettings.calculate_per_token_loss must be True or False, got {self.calculate_per_token_loss!r}")
        for name in ("task_names", "dataset_names"):
            names = tuple(getattr(self, name))
            if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"LossSettings.{name} must be distinct non-empty strings, got {names!r}")
            object.__setattr__(self, name, names)

    def global_batch_stats(self, micro_batches: Iterable[Mapping[str, torch.Tensor]], dp_cp_group=None) -> GlobalBatchStats:
        """`normalizer.global_batch_stats` with this rank's CP index and the configured names."""
        return global_batch_stats(
            micro_batches,
            dp_cp_group,
            cp_rank=self.cp_rank,
            num_tasks=len(self.task_names),
            num_datasets=len(self.dataset_names),
        )


def weighted_loss_func(
    micro_batch: Mapping[str, torch.Tensor],
    stats: GlobalBatchStats,
    settings: LossSettings,
    output_tensor: torch.Tensor,
    *,
    per_token_loss: Optional[torch.Tensor] = None,
) -> LossOutput:
    """(loss, num_tokens, report) for one micro-batch; see the module docstring for the scaling.

    `output_tensor` is the per-token cross-entropy, shaped like `micro_batch["loss_mask"]`; or,
    when `per_token_loss` (l, no gradient needed) is given, the already weighted w * l of the
    fused linear cross-entropy (`loss.fused_linear_cross_entropy`), whose gradient then arrives as
    one value for every token. The weights were validated by `global_batch_stats`; here nothing
    syncs with the host and nothing communicates.
    """
    weights, mask = micro_batch["loss_weights"], micro_batch["loss_mask"]
    if not isinstance(output_tensor, torch.Tensor):
        raise DataFormatError(f"the loss function takes the per-token loss tensor, got {type(output_tensor).__name__}")
    checks.check_same_shape("the per-token loss (model output)", output_tensor, "loss_mask", mask)
    if per_token_loss is None:
        weighted, per_token_loss = apply_token_weights(output_tensor, weights), output_tensor
    else:
        checks.check_same_shape("per_token_loss", per_token_loss, "loss_mask", mask)
        weighted = output_tensor.float()
    weighted_sum = weighted.sum()
    num_tokens = count_loss_tokens(mask)
    z = stats.normalizer(settings.normalization)
    if z == 0:
        loss = weighted_sum * 0.0  # defined zero loss, zero gradients
    elif settings.calculate_per_token_loss:
        loss = weighted_sum * (stats.loss_tokens / z)
    else:
        scale = settings.num_microbatches * settings.dp_cp_size / z
        loss = weighted_sum * (num_tokens.clamp(min=1).to(weighted_sum.dtype) * scale)
    report = micro_batch_report(per_token_loss, weighted, micro_batch, stats, settings, weighted_sum)
    return loss, num_tokens, report


def make_loss_func(
    micro_batch: Mapping[str, torch.Tensor],
    stats: GlobalBatchStats,
    settings: LossSettings,
    per_token_loss: Optional[torch.Tensor] = None,
) -> Callable[[torch.Tensor], LossOutput]:
    """The `loss_func(output_tensor)` a forward_step returns for this micro-batch (picklable);
    with `per_token_loss`, the output tensor is the fused path's w * l (`weighted_loss_func`)."""
    return partial(weighted_loss_func, micro_batch, stats, settings, per_token_loss=per_token_loss)


def stock_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> LossOutput:
    """Megatron-LM's `pretrain_gpt.loss_func` semantics, for comparisons: the masked loss sum,
    the int loss-token count and the `lm loss` report; the schedule then turns it into a mean
    of per-micro-batch means (or a per-token mean with `calculate_per_token_loss`)."""
    losses = output_tensor.reshape(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss = (losses * mask).sum()
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.to(loss.dtype)])}
