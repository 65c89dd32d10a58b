"""`tokweight train` and the main job: a CPU training loop over gloo that mirrors Megatron's.

  config            TrainConfig (+ DataConfig, OptimizerConfig): the run as its YAML describes it
  plan              plan_run: every check before spawning; RunPlan; build_datasets
  micro_batches     make_groups (TP x DP), RowReader: micro-batches in the run's fixed order
  forward_backward  Megatron's loss protocol, DDP-style reduction and finalize_model_grads on CPU
  evaluation        held-out per-task loss
  loop              train_on_rank (one rank's run), run_training (plan, spawn, train)
  demo              the main job: uniform vs molmo2 on a generated corpus
  spawn             spawn(fn, world_size, *args): gloo/NCCL ranks from a preloaded forkserver
"""
from megatron_tokweight.common.lazy_exports import lazy_exports

_EXPORTS = {
    "TrainConfig": "megatron_tokweight.trainer.config",
    "DataConfig": "megatron_tokweight.trainer.config",
    "OptimizerConfig": "megatron_tokweight.trainer.config",
    "RunPlan": "megatron_tokweight.trainer.plan",
    "plan_run": "megatron_tokweight.trainer.plan",
    "build_datasets": "megatron_tokweight.trainer.plan",
    "make_groups": "megatron_tokweight.trainer.micro_batches",
    "RowReader": "megatron_tokweight.trainer.micro_batches",
    "train_on_rank": "megatron_tokweight.trainer.loop",
    "run_training": "megatron_tokweight.trainer.loop",
    "spawn": "megatron_tokweight.trainer.spawn",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
