"""A CPU step loop with Megatron-Core's loss protocol: the no-pipelining schedule, DDP's gradient
reduction and `finalize_model_grads`, without CUDA.

Megatron's schedules and DDP allocate on CUDA; this loop follows them step for step so the loss
functions meant for Megatron can be run and checked on CPU (gloo):

1. per micro-batch: `forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`, then
   Megatron's own `forward_step_calc_loss` (imported, not re-implemented): a 3-value
   `(loss, num_tokens, report)` is divided by clamp(num_tokens, 1) and by M unless
   `calculate_per_token_loss`; a 2-value `(loss, report)` is multiplied by the CP size and
   divided by M;
2. `total_num_tokens += num_tokens` in an int32 tensor (the loss function's `num_tokens` must be
   int32, as in Megatron);
3. backward per micro-batch (through `config.grad_scale_func` when set), gradients accumulating
   in `param.grad` as in DDP's buffers;
4. `finalize_grads`: without per-token loss, every gradient is scaled by 1/|DP x CP| and summed
   over the DP x CP group (DDP's `gradient_scaling_factor` then all-reduce); with it, the
   gradients are summed, `total_num_tokens` is all-reduced over DP x CP (in place, as Megatron
   does) and the gradients are scaled by 1 / total when total > 0.

Not covered: pipeline parallelism (no PP stages, so no `num_tokens` broadcast over PP and no
embedding-gradient all-reduce between stages), virtual stages, MoE/MTP auxiliary-loss scales,
sequence-parallel layer-norm gradients, distributed optimizer. TP-sharded parameters need no
reduction (their gradients are local) and replicated ones get identical gradients on every TP
rank, as in Megatron without sequence parallelism.
"""
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_tokweight.common.process_groups import group_size
from megatron_tokweight.errors import ConfigError


@dataclass(frozen=True)
class ScheduleConfig:
    """The model-config fields the loss protocol reads (Megatron's `forward_step_calc_loss` reads
    `calculate_per_token_loss` and `timers`; `backward_step` applies `grad_scale_func`)."""

    calculate_per_token_loss: bool = False
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    timers: None = None

    @classmethod
    def from_config(cls, config: Any) -> "ScheduleConfig":
        """From a Megatron `TransformerConfig`, a `ScheduleConfig` or anything with
        `calculate_per_token_loss`."""
        if isinstance(config, cls):
            return config
        if not hasattr(config, "calculate_per_token_loss"):
            raise ConfigError(f"the schedule config needs a calculate_per_token_loss attribute; got {type(config).__name__}")
        return cls(bool(config.calculate_per_token_loss), getattr(config, "grad_scale_func", None))


def _parameters(model) -> List[torch.nn.Parameter]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]


def finalize_grads(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    num_tokens: Optional[torch.Tensor],
    dp_cp_group=None,
    calculate_per_token_loss: bool = False,
) -> Optional[torch.Tensor]:
    """DDP's gradient reduction plus `finalize_model_grads`' per-token scaling (module docstring).

    Gradients of every trainable parameter are flattened into one buffer per dtype (missing
    gradients count as zeros, like DDP's zeroed buffers) and all-reduced (SUM) over
    `dp_cp_group` (None: a single rank). `num_tokens` (the schedule's int32 total) is used only
    with `calculate_per_token_loss`; it is all-reduced in place and returned.
    """
    params = _parameters(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    size = group_size(dp_cp_group)
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        grads = [p.grad for p in group_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if not calculate_per_token_loss:
            flat *= 1.0 / size  # DDP: gradient_scaling_factor = 1 / |DP x CP|, applied before the reduction
        if size > 1:
            dist.all_reduce(flat, group=dp_cp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    if not calculate_per_token_loss:
        return None
    if num_tokens is None:
        raise ConfigError("calculate_per_token_loss needs the schedule's total num_tokens")
    if size > 1:
        dist.all_reduce(num_tokens, group=dp_cp_group)
    if num_tokens > 0:
        scaling = 1.0 / num_tokens
        for p in params:
            p.grad.mul_(scaling)
    return num_tokens


def forward_backward(
    forward_step_func: Callable[[Iterator, Any], Tuple[Any, Callable]],
    data_iterator: Iterator,
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    num_microbatches: int,
    config: Any,
    dp_cp_group=None,
    *,
    cp_size: int = 1,
    forward_only: bool = False,
    finalize: bool = True,
) -> Tuple[List[Any], torch.Tensor]:
    """One step of Megatron's no-pipelining schedule on CPU; returns (reports, total_num_tokens).

    Args:
        forward_step_func, data_iterator, model, num_microbatches: as for Megatron's
            `forward_backward_func`.
        config: a `ScheduleConfig` or a Megatron model config (`calculate_per_token_loss`,
            `grad_scale_func`).
        dp_cp_group: the DP x CP group for the gradient and token-count reductions (None: one rank).
        cp_size: the context-parallel size (only the 2-value loss form uses it).
        forward_only: no backward, no gradient reduction.
        finalize: reduce gradients (`finalize_grads`) after the last micro-batch, as Megatron does
            when `finalize_model_grads_func` is set.

    `reports` holds each micro-batch's report (the loss function's last value), as Megatron's
    `forward_data_store`; `total_num_tokens` is the int32 sum of the micro-batches' num_tokens
    (all-reduced over DP x CP when per-token loss gradients were finalized).
    """
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ConfigError("the no-pipelining schedule takes one model chunk")
        model = model[0]
    config = ScheduleConfig.from_config(config)
    reports: List[Any] = []
    total_num_tokens = torch.zeros([], dtype=torch.int)
    for _ in range(num_microbatches):
        output_tensor, loss_func = forward_step_func(data_iterator, model)
        loss, num_tokens = forward_step_calc_loss(
            model, output_tensor, loss_func, config, None, False, num_microbatches, reports,
            cp_group_size=cp_size, is_last_stage=True,
        )
        # Megatron's forward_step rebinds output_tensor to the loss: the model output (e.g. the
        # [s, b] per-token loss) is not kept alive through the backward
        del output_tensor, loss_func
        total_num_tokens += num_tokens.to(total_num_tokens.device)
        if not forward_only:
            if config.grad_scale_func is not None:
                loss = config.grad_scale_func(loss)
            torch.autograd.backward(loss)
    if finalize and not forward_only:
        finalize_grads(model, total_num_tokens, dp_cp_group, config.calculate_per_token_loss)
    return reports, total_num_tokens


def make_forward_step(stats, settings, fused: bool = False):
    """The forward_step_func of Megatron's schedule protocol for packed THD micro-batches; `fused`:
    the model's output layer is fused (`model.fused_output`) and returns w_t * l_t directly."""
    from megatron_tokweight.loss import make_loss_func
    from megatron_tokweight.model.fused_output import packed_fused_loss
    from megatron_tokweight.model.gpt import packed_token_loss

    def forward_step(data_iterator, model):
        batch, _ = next(data_iterator)
        if fused:
            weighted, per_token = packed_fused_loss(model, batch)
            return weighted, make_loss_func(batch, stats, settings, per_token_loss=per_token)
        # per-token cross-entropy [1, T] over the model's TP group (model.TokweightGPTModel)
        return packed_token_loss(model, batch), make_loss_func(batch, stats, settings)

    return forward_step


def settings_schedule(config) -> ScheduleConfig:
    """The schedule settings of a `TrainConfig`."""
    return ScheduleConfig(calculate_per_token_loss=config.calculate_per_token_loss)
