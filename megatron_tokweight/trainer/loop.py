"""The training loop of `tokweight train`: token-weighted training of a small GPTModel on CPU.

The loop, per step (every rank of a TP x DP world of gloo processes it spawns itself):

1. TP rank 0 of each data-parallel replica reads its micro-batches of packed rows (a
   `PackedDataset` built through Megatron's `BlendedMegatronDatasetBuilder`; `micro_batches.RowReader`);
   `megatron.batch.get_batch` flattens them to THD and broadcasts them over the TP group;
   with `long_context` (`longcontext.LongContextConfig`), the frozen scorer's weights come with
   the rows (`longcontext.score_sidecar.with_scores`), and the unfrozen scorer (or rho1) has
   the model score the step's micro-batches under no_grad (`longcontext.scorer_online`);
2. the global normalizer Z is computed before the forward (`loss.LossSettings.global_batch_stats`,
   one all-reduce over DP), from the final weights;
3. `forward_backward.forward_backward` runs Megatron's loss protocol (the weighted loss function of
   `megatron_tokweight.loss`) and reduces the gradients over DP;
4. gradient clipping by the global norm (TP-sharded and replicated parameters each counted
   once), AdamW with linear warm-up and cosine decay to `min_lr`;
5. logging of the loss and per-task reports (`loss.reduce_reports`), held-out evaluation
   (unweighted per-task mean loss), checkpoints (`megatron_tokweight.model.checkpoint`).

Rows are consumed in a fixed order (`micro_batches`), so a resumed run reads exactly the rows an
uninterrupted one would. Everything a user can get wrong is checked in the launching process
before any rank starts (`plan.plan_run`).
"""
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron_tokweight.common.process_groups import group_size
from megatron_tokweight.errors import ConfigError
from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.evaluation import evaluate
from megatron_tokweight.trainer.forward_backward import (
    make_forward_step,
    settings_schedule,
)
from megatron_tokweight.trainer.micro_batches import (
    Groups,
    RowReader,
    dataset_names,
    make_groups,
)
from megatron_tokweight.trainer.plan import RunPlan, build_datasets, plan_run


def clip_grad_norm(params, max_norm: float, tp_group) -> float:
    """Global L2 gradient norm over the TP group (replicated parameters counted once); clips
    in place when max_norm > 0 and returns the norm before clipping."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import (
        param_is_not_tensor_parallel_duplicate,
    )

    squares = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, tp_group):
            squares += p.grad.double().pow(2).sum()
    if group_size(tp_group) > 1:
        dist.all_reduce(squares, group=tp_group)
    norm = float(squares.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


@dataclass
class StepRecord:
    step: int  # 1-based: steps done
    lr: float
    grad_norm: float
    seconds: float  # wall time of the step (data, scoring, forward, backward, optimizer)
    real_tokens: int  # non-padding tokens of the global batch
    reports: Dict[str, float]  # reduce_reports of the step
    scoring_seconds: float = 0.0  # of `seconds`: the long-context scorer (unfrozen / rho1)


@dataclass
class RunResult:
    steps: List[StepRecord] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)  # {"step", "prefix", "losses"}
    start_step: int = 0
    train_seconds: float = 0.0
    real_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def steps_without_targets(self) -> int:
        """Steps whose rows held no loss token (counted, never logged as a NaN loss)."""
        return sum(math.isnan(s.reports["lm loss"]) for s in self.steps)


def train_on_rank(plan: RunPlan, rank: int, groups: Groups,
                  on_step: Optional[Callable[[StepRecord], None]] = None,
                  on_eval: Optional[Callable[[int, str, Dict[str, float]], None]] = None) -> RunResult:
    """Run (or resume) the plan's training on this rank; returns what it measured."""
    import numpy as np
    import torch

    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.loss import LossSettings, reduce_reports
    from megatron_tokweight.model import checkpoint
    from megatron_tokweight.model.gpt import build_gpt_model
    from megatron_tokweight.trainer.forward_backward import forward_backward

    config = plan.config
    torch.manual_seed(config.seed)  # the same full weights on every rank; each TP rank keeps its shard
    model_config = config.model_config(plan.vocab_size)
    model = build_gpt_model(model_config, tp_group=groups.tp)
    fused = config.fused_cross_entropy != "off"
    if fused:  # the output layer returns w_t * l_t: no logits in training, evaluation or scoring
        from megatron_tokweight.model.fused_output import enable_fused_output

        enable_fused_output(model, config.fused_cross_entropy)
    model_info = checkpoint.model_info(plan.vocab_size, plan.tokenizer, model_config)
    # unfrozen / rho1: the model scores each step's micro-batches (every TP rank: collective)
    scorer = step_scorer(config.long_context, groups.tp, config.data.seq_length)
    # TP ranks of one replica share dropout masks on replicated activations, as in Megatron
    torch.manual_seed(config.seed + 1 + groups.dp_rank)
    np.random.seed(config.seed + 1 + groups.dp_rank)
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                  weight_decay=opt.weight_decay)

    # every rank holds the (cached, memory-mapped) indices; only TP rank 0 reads rows
    train_ds, eval_sets = build_datasets(config)
    result = RunResult()
    start = 0
    if config.resume:
        meta = checkpoint.find_latest(config.save_dir)
        if meta is not None:
            checkpoint.check_compatible(meta, config.identity(), config.world_size, plan.datasets)
            checkpoint.load(meta, model, optimizer, rank)
            if meta.consumed_rows != meta.step * config.rows_per_step:
                raise ConfigError(f"{meta.path}: consumed_rows={meta.consumed_rows} does not match step {meta.step}")
            start = meta.step
    result.start_step = start
    reader = RowReader(train_ds, groups, config.micro_batch_size, config.data_parallel_size, plan.task_tables)
    settings = LossSettings(
        config.weighting.normalization if config.weighting is not None else "weight_sum",
        config.num_micro_batches, config.data_parallel_size, config.calculate_per_token_loss,
        task_names=tuple(plan.task_names),
        dataset_names=dataset_names(config.data.prefixes) if len(config.data.prefixes) > 1 else (),
    )
    schedule_config = settings_schedule(config)
    model.train()

    def run_evals(step):
        for prefix, ds, names in zip(config.data.eval_prefixes, eval_sets, plan.eval_task_names):
            losses = evaluate(model, ds, names, groups, config, config.eval_max_rows)
            result.evals.append({"step": step, "prefix": prefix, "losses": losses})
            if on_eval is not None:
                on_eval(step, prefix, losses)

    if config.eval_interval and start == 0 and eval_sets:
        run_evals(0)
    last = config.steps if config.exit_interval is None else min(config.steps, config.exit_interval)
    for step in range(start, last):
        t0 = time.perf_counter()
        lr = opt.learning_rate(step, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = reader.step_micro_batches(step, config.num_micro_batches)
        scoring_seconds = 0.0
        if scorer is not None:  # before Z: the scored weights enter the normalizer and the loss
            t_score = time.perf_counter()
            scored = scorer.reweight(model, [b for b, _ in micro_batches])
            micro_batches = [(b, params) for b, (_, params) in zip(scored, micro_batches)]
            scoring_seconds = time.perf_counter() - t_score
        stats = settings.global_batch_stats([b for b, _ in micro_batches], groups.dp)
        optimizer.zero_grad(set_to_none=True)
        reports, _ = forward_backward(
            make_forward_step(stats, settings, fused), iter(micro_batches), model,
            config.num_micro_batches, schedule_config, groups.dp,
        )
        # real tokens ride along the report reduction: [tokens, 1/(M*D)] sums to [total, 1]
        share = 1.0 / (config.num_micro_batches * config.data_parallel_size)
        for report, (batch, _) in zip(reports, micro_batches):
            report["real tokens"] = torch.tensor([float(batch["real_tokens"].sum()), share], dtype=torch.float64)
        grad_norm = clip_grad_norm(params, opt.clip_grad, groups.tp)
        optimizer.step()
        reduced = reduce_reports(reports, groups.dp)
        seconds = time.perf_counter() - t0
        tokens = int(round(reduced.pop("real tokens")))
        record = StepRecord(step + 1, lr, grad_norm, seconds, tokens, reduced, scoring_seconds)
        result.steps.append(record)
        result.train_seconds += seconds
        result.real_tokens += tokens
        if on_step is not None:
            on_step(record)
        done = step + 1
        if config.save_dir and (
            (config.save_interval and done % config.save_interval == 0) or done == last
        ):
            checkpoint.save(config.save_dir, done, done * config.rows_per_step, config.identity(), model,
                            optimizer, rank, config.world_size, model_info=model_info,
                            datasets=plan.datasets)
        if eval_sets and ((config.eval_interval and done % config.eval_interval == 0) or done == config.steps):
            run_evals(done)
    return result


def format_step(record: StepRecord, task_names: Sequence[str]) -> str:
    r = record.reports
    if math.isnan(r["lm loss"]):  # 0 / 0: the step's rows hold no target (it updated nothing)
        return (f"step {record.step:5d} | no loss tokens in this step's rows: nothing trained "
                f"| lr {record.lr:.2e} | {record.real_tokens / record.seconds:,.0f} tok/s")
    line = (f"step {record.step:5d} | lm loss {r['lm loss']:.4f} | weighted loss {r['weighted loss']:.4f} "
            f"| lr {record.lr:.2e} | grad norm {record.grad_norm:.3f} "
            f"| {record.real_tokens / record.seconds:,.0f} tok/s")
    if record.scoring_seconds:
        line += f" | scoring {100 * record.scoring_seconds / record.seconds:.0f}%"
    tasks = []
    for name in task_names:
        if f"task/{name}/lm loss" in r:
            share = r.get(f"task/{name}/weight share", 0.0)
            tasks.append(f"{name} {r[f'task/{name}/lm loss']:.3f} ({100 * share:.0f}% w)")
    return line + ("\n    " + " | ".join(tasks) if tasks else "")


def _train_rank(rank, world_size, plan: RunPlan):
    groups = make_groups(rank, plan.config.tensor_parallel_size, plan.config.data_parallel_size)
    interval = plan.config.log_interval

    def on_step(record):
        if rank == 0 and (record.step % interval == 0 or record.step == plan.config.steps):
            print(format_step(record, plan.task_names), flush=True)

    def on_eval(step, prefix, losses):
        if rank == 0:
            body = " | ".join(f"{k} {v:.4f}" for k, v in losses.items())
            print(f"eval step {step} {os.path.basename(prefix)}: {body}", flush=True)

    result = train_on_rank(plan, rank, groups, on_step, on_eval)
    return result if rank == 0 else None


def run_training(config: TrainConfig) -> RunResult:
    """Plan (all checks), spawn the TP x DP ranks, train; returns rank 0's result."""
    from megatron_tokweight.model.checkpoint import save_dir_lock
    from megatron_tokweight.trainer.spawn import spawn

    # held from before the resume point is read until every rank has ended
    with save_dir_lock(config.save_dir):
        plan = plan_run(config)
        if plan.resume_step:
            print(f"resuming from step {plan.resume_step} in {config.save_dir}", flush=True)
        return spawn(_train_rank, config.world_size, plan)[0]
