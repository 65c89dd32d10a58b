"""`forward_step` and `loss_func` for Megatron's schedules, exact with either
`calculate_per_token_loss` setting.

`TokweightSteps` holds everything explicitly (process groups, normalization, M); its
`forward_step(data_iterator, model)` is what Megatron's `forward_backward_func` calls:

1. the data iterator is wrapped (once, on the rank that reads data) in a `GlobalBatchPrefetcher`,
   which reads the step's M micro-batches at the step's first pull and attaches the global
   totals (one DP x CP all-reduce);
2. `batch.get_batch` broadcasts the micro-batch over TP (every key, the totals included),
   flattens it to a THD stream and keeps this CP rank's tokens;
3. the model runs with `labels` (Megatron's vocab-parallel per-token cross-entropy, [1, T/cp]) and
   the THD `PackedSeqParams`;
4. the returned loss function is `megatron_tokweight.loss.make_loss_func(batch, stats, settings)`:
   (loss, int32 num_tokens, report) scaled so the stock schedule, DDP and `finalize_model_grads`
   produce exactly L = sum w l / Z.

Long-context weighting: the frozen scorer's weights come with the rows (the datasets provider
wraps them, `longcontext.score_sidecar.attach_scores`); with the unfrozen scorer (or rho1) the
prefetcher has the model score the step's micro-batches before the totals. That scoring forward
is collective over TP, so then every TP rank reads the step (rank 0's rows broadcast by
`batch.TensorParallelRows`) and holds it whole: no per-micro-batch TP broadcast afterwards.

The module-level `forward_step(data_iterator, model, return_schedule_plan=False)` and
`loss_func(...)` are the Megatron-LM hooks: they build a `TokweightSteps` from Megatron-LM's
global arguments and parallel state (the only place that reads them).
"""
from functools import partial
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from megatron_tokweight.common.process_groups import group_rank, group_size
from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.loss import (
    LossSettings,
    Normalization,
    per_token_cross_entropy,
    weighted_loss_func,
)
from megatron_tokweight.loss.fused_linear_cross_entropy import FUSED_CROSS_ENTROPY
from megatron_tokweight.megatron.batch import (
    TensorParallelRows,
    default_device,
    get_batch,
)
from megatron_tokweight.megatron.prefetch import (
    STATS_KEY,
    GlobalBatchPrefetcher,
    decode_stats,
)


class TokweightSteps:
    """Megatron schedule hooks for packed, token-weighted training (module docstring).

    Args:
        normalization: "weight_sum" | "sample_count" | "token_count" (Z of docs/CONTRACTS.md section 1).
        calculate_per_token_loss: the model config's setting (the loss scaling depends on it).
        num_microbatches: M per step, or a callable returning it (read at each step's start).
        tp_group, cp_group, dp_cp_group: the tensor-, context- and data x context-parallel
            groups of this rank (None: a group of one).
        task_names, dataset_names: names for the per-task / per-blended-dataset reports (index =
            task id / dataset_id); empty: no such reports.
        device: where batches go (default: the current CUDA device, else CPU).
        use_te: CP slicing with Transformer Engine's kernel (None: when the batch is on CUDA and
            TE is installed).
        loss_in_model: True: the model computes the per-token loss (`GPTModel(..., labels=...)`,
            as Megatron-LM's `pretrain_gpt` does; Megatron's cross-entropy then runs on Megatron's
            global TP group, and fused cross-entropy / MTP work as usual). False: the model returns
            logits and `megatron_tokweight.loss.per_token_cross_entropy` runs on `tp_group`
            (no global parallel state needed).
        report: `LossSettings.report`: "full" (per-task / per-dataset keys) or "objective" (only
            `weighted loss`, one fp32 pair, the cost of Megatron's stock report).
        fused_cross_entropy: "off" (Megatron's output layer and cross-entropy), or "torch" /
            "triton": the model's output layer is fused (`model.fused_output`) and returns
            w_t * l_t from the hidden states, no logits held (with either `loss_in_model`).
        long_context_scorer: a `longcontext.OnlineScorer` (e.g. `scorer_online.step_scorer`) run
            on each step's micro-batches before Z; needs pipeline and context parallel size 1
            (it scores whole pieces with the whole model). None: weights come with the data.
    """

    def __init__(
        self,
        normalization: Union[str, Normalization],
        calculate_per_token_loss: bool,
        num_microbatches: Union[int, Callable[[], int]],
        tp_group=None,
        cp_group=None,
        dp_cp_group=None,
        *,
        task_names: Sequence[str] = (),
        dataset_names: Sequence[str] = (),
        device: Optional[torch.device] = None,
        use_te: Optional[bool] = None,
        loss_in_model: bool = True,
        report: str = "full",
        fused_cross_entropy: str = "off",
        long_context_scorer=None,
    ):
        self.normalization = Normalization.parse(normalization)
        if not isinstance(calculate_per_token_loss, bool):
            raise ConfigError(f"calculate_per_token_loss must be True or False, got {calculate_per_token_loss!r}")
        self.calculate_per_token_loss = calculate_per_token_loss
        self.num_microbatches = num_microbatches
        self.tp_group, self.cp_group, self.dp_cp_group = tp_group, cp_group, dp_cp_group
        self.task_names, self.dataset_names = tuple(task_names), tuple(dataset_names)
        self.device = default_device() if device is None else torch.device(device)
        self.use_te = use_te
        self.loss_in_model = loss_in_model
        self.report = report
        if fused_cross_entropy not in FUSED_CROSS_ENTROPY:
            raise ConfigError(f"fused_cross_entropy must be one of {FUSED_CROSS_ENTROPY}, got {fused_cross_entropy!r}")
        self.fused_cross_entropy = fused_cross_entropy
        self.scorer = long_context_scorer
        if self.scorer is not None and group_size(cp_group) > 1:
            raise ConfigError(
                "the unfrozen long-context scorer (and rho1) scores whole pieces: use context parallel size 1, "
                "or the frozen scorer (`tokweight score`)"
            )
        # one prefetcher per data iterator object (train, and each validation iterator)
        self._prefetchers: Dict[int, Tuple[Iterator, GlobalBatchPrefetcher]] = {}

    def prefetcher(self, data_iterator: Iterator) -> GlobalBatchPrefetcher:
        """The `GlobalBatchPrefetcher` wrapping `data_iterator` (created at first use)."""
        if isinstance(data_iterator, GlobalBatchPrefetcher):
            return data_iterator
        entry = self._prefetchers.get(id(data_iterator))
        if entry is None or entry[0] is not data_iterator:
            source = data_iterator
            if self.scorer is not None and group_size(self.tp_group) > 1:
                # every TP rank reads the step: the scoring forward is collective over TP
                source = TensorParallelRows(data_iterator if group_rank(self.tp_group) == 0 else None,
                                            self.tp_group, self.device)
            wrapped = GlobalBatchPrefetcher(
                source,
                self.num_microbatches,
                self.dp_cp_group,
                cp_size=group_size(self.cp_group),
                cp_rank=group_rank(self.cp_group),
                num_tasks=len(self.task_names),
                num_datasets=len(self.dataset_names),
                device=self.device,
                scorer=self.scorer,
            )
            entry = (data_iterator, wrapped)  # holding the iterator keeps its id unique
            self._prefetchers[id(data_iterator)] = entry
        return entry[1]

    def get_batch(self, data_iterator: Optional[Iterator], model=None):
        """(batch, packed_seq_params, stats, settings) of the next micro-batch on this rank.

        `data_iterator` is needed on rank 0 of the TP group only (Megatron-LM passes None on
        the others). `model` is needed with a long-context scorer (it scores the step).
        """
        if self.scorer is not None:  # every TP rank holds the step already (see `prefetcher`)
            if group_rank(self.tp_group) == 0 and data_iterator is None:
                raise ValueError("rank 0 of the tensor-parallel group needs a data iterator, got None")
            source = iter([self.prefetcher(data_iterator).pull(model)])
            batch, params = get_batch(source, None, self.cp_group, self.device, self.use_te)
        else:
            source = None
            if group_rank(self.tp_group) == 0:
                if data_iterator is None:
                    raise ValueError("rank 0 of the tensor-parallel group needs a data iterator, got None")
                source = self.prefetcher(data_iterator)
            batch, params = get_batch(source, self.tp_group, self.cp_group, self.device, self.use_te)
        if STATS_KEY not in batch:
            raise DataFormatError(
                f"the micro-batch carries no {STATS_KEY!r}: read it through a GlobalBatchPrefetcher "
                "(TokweightSteps does this for the iterator it is given)"
            )
        stats, num_microbatches = decode_stats(batch[STATS_KEY], len(self.task_names), len(self.dataset_names))
        settings = LossSettings(
            normalization=self.normalization,
            num_microbatches=num_microbatches,
            dp_cp_size=group_size(self.dp_cp_group),
            calculate_per_token_loss=self.calculate_per_token_loss,
            cp_rank=group_rank(self.cp_group),
            task_names=self.task_names,
            dataset_names=self.dataset_names,
            report=self.report,
        )
        return batch, params, stats, settings

    def forward_step(self, data_iterator: Optional[Iterator], model, return_schedule_plan: bool = False):
        """Megatron's `forward_step_func`: (per-token loss [1, T/cp], loss_func)."""
        if return_schedule_plan:
            raise ConfigError("megatron-tokweight does not build MoE schedule plans; unset --overlap-moe-expert-parallel-comm")
        if self.fused_cross_entropy != "off":  # before get_batch: the unfrozen scorer's forward is fused too
            from megatron_tokweight.model.fused_output import enable_fused_output

            enable_fused_output(model, self.fused_cross_entropy)
        batch, params, stats, settings = self.get_batch(data_iterator, model)
        # attention_mask None: the THD PackedSeqParams carry the per-sample causal masks
        if self.fused_cross_entropy != "off":
            return self._fused_forward(model, batch, params, stats, settings)
        if self.loss_in_model:
            output_tensor = model(
                batch["tokens"], batch["position_ids"], None,
                labels=batch["labels"], loss_mask=batch["loss_mask"], packed_seq_params=params,
            )  # per-token loss [1, T/cp] on the last pipeline stage
        else:
            output_tensor = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
            if _is_logits(output_tensor, batch["labels"]):
                output_tensor = per_token_cross_entropy(
                    output_tensor.transpose(0, 1), batch["labels"].transpose(0, 1), self.tp_group
                ).transpose(0, 1)
        return output_tensor, partial(loss_func, batch, stats, settings, model=model)


    def _fused_forward(self, model, batch, params, stats, settings):
        """The model with its fused output layer: w_t * l_t [1, T/cp] on the last pipeline stage,
        the hidden states on the others."""
        from megatron_tokweight.model.fused_output import (
            fused_model_loss,
            fused_targets,
        )

        with fused_targets(model, batch["labels"], batch["loss_weights"]) as targets:
            output_tensor = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
        per_token = None
        if targets.logprobs is not None:  # this stage has the output layer
            output_tensor, per_token = fused_model_loss(targets, output_tensor)
        return output_tensor, partial(loss_func, batch, stats, settings, model=model, per_token_loss=per_token)


def _is_logits(output_tensor, labels) -> bool:
    """GPTModel's last stage returns [1, T, vocab / TP]; earlier pipeline stages hidden states."""
    return output_tensor.dim() == 3 and tuple(output_tensor.shape[:2]) == tuple(labels.shape)


def loss_func(micro_batch, stats, settings, output_tensor: torch.Tensor, model=None, *, checks=None,
              per_token_loss=None):
    """Megatron's loss-function protocol for one micro-batch: (loss, num_tokens int32, report).

    The model-output argument comes where Megatron-LM's stock `loss_func(loss_mask,
    output_tensor, model=None)` has it, after the micro-batch's data (here: the whole batch, the
    step's `GlobalBatchStats` and `LossSettings`). `checks`, a callable taking the loss, runs
    Megatron-LM's NaN / spike validation when the hooks enable it. `per_token_loss`: set by the
    fused path, whose output tensor is already w * l (`loss.weighted_loss_func`).
    """
    loss, num_tokens, report = weighted_loss_func(micro_batch, stats, settings, output_tensor,
                                                  per_token_loss=per_token_loss)
    if checks is not None:
        checks(loss)
    return loss, num_tokens, report


# ----------------------------------------------------------------------------- Megatron-LM hooks

# (Megatron-LM's args, the TokweightSteps and the loss checks built from them)
_HOOKS: Optional[Tuple[object, TokweightSteps, Callable[[torch.Tensor], None]]] = None


def steps_from_megatron_args(args) -> TokweightSteps:
    """A `TokweightSteps` from Megatron-LM's arguments and its initialised parallel state."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.megatron.arguments import (
        check_flag_combinations,
        long_context_config_from_args,
        weighting_config_from_args,
    )
    from megatron_tokweight.megatron.datasets_provider import report_names_from_args

    check_flag_combinations(args)  # done at parse time already (extra_args_provider); kept for own parsers
    long_context = long_context_config_from_args(args)
    task_names, dataset_names = report_names_from_args(args)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    return TokweightSteps(
        normalization=weighting_config_from_args(args).normalization,
        calculate_per_token_loss=bool(args.calculate_per_token_loss),
        num_microbatches=get_num_microbatches,
        tp_group=tp_group,
        cp_group=parallel_state.get_context_parallel_group(),
        dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        task_names=task_names,
        dataset_names=dataset_names,
        report=args.loss_report,
        fused_cross_entropy=getattr(args, "tokweight_fused_ce", "off"),
        long_context_scorer=step_scorer(long_context, tp_group, args.seq_length),
    )


def _megatron_checks(args) -> Optional[Callable[[torch.Tensor], None]]:
    """Megatron-LM's NaN / Inf / spiky-loss validation of the local loss, when enabled."""
    if not (args.check_for_nan_in_loss_and_grad or getattr(args, "check_for_spiky_loss", False)):
        return None
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    def check(loss: torch.Tensor) -> None:
        machine = get_rerun_state_machine()
        if args.check_for_nan_in_loss_and_grad:
            for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                        message=f"found {what} in local forward loss calculation")
        if getattr(args, "check_for_spiky_loss", False):
            machine.validate_result(
                result=loss,
                rejection_func=partial(machine.is_unexpectedly_large, threshold=10, context="loss"),
                message="Spiky loss", tolerance=0.0, fatal=False,
            )

    return check


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron-LM hook: `pretrain(..., forward_step_func=forward_step)`.

    Wraps the iterator Megatron-LM's `train_step` hands to the schedule in a
    `GlobalBatchPrefetcher` at its first use, so Z is computed before each step's first backward.
    """
    global _HOOKS
    from megatron.training import get_args

    args = get_args()
    # built once per set of Megatron-LM arguments: a second pretrain() in one process (tests,
    # Megatron's in-process restart) parses new arguments and must not reuse the old settings
    if _HOOKS is None or _HOOKS[0] is not args:
        _HOOKS = (args, steps_from_megatron_args(args), _megatron_checks(args))
    _, steps, checks = _HOOKS
    output_tensor, step_loss_func = steps.forward_step(data_iterator, model, return_schedule_plan)
    return output_tensor, partial(step_loss_func, checks=checks)
