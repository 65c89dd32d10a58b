"""The token-weighted loss: cross-entropy, global normalizer, schedule-protocol loss function, reports.

- `cross_entropy`: `weighted_cross_entropy` / `per_token_cross_entropy` on Megatron's
  vocab-parallel cross-entropy (TP collectives only).
- `fused_linear_cross_entropy`: `fused_linear_weighted_cross_entropy` (the output layer and the
  weighted cross-entropy over token chunks: no logits held; torch or Triton kernels).
- `normalizer`: `Normalization`, `GlobalBatchStats`, `global_batch_stats` (one DP x CP all-reduce).
- `loss_func`: `LossSettings`, `make_loss_func` (exact L under Megatron's stock schedules in both
  `calculate_per_token_loss` settings), `stock_loss_func` (Megatron's unweighted mean, for comparison).
- `reporting`: per-micro-batch `[sum, count]` reports and `reduce_reports` (Megatron's training-loop
  reduction over DP x CP).
- `checks`: input validation with actionable errors.
"""
from megatron_tokweight.loss.cross_entropy import (
    PATH_EXPLICIT_GROUP,
    PATH_MEGATRON,
    PATH_MEGATRON_TP_GROUP,
    apply_token_weights,
    cross_entropy_path,
    per_token_cross_entropy,
    weighted_cross_entropy,
)
from megatron_tokweight.loss.fused_linear_cross_entropy import (
    fused_linear_weighted_cross_entropy,
    fused_target_logprobs,
)
from megatron_tokweight.loss.loss_func import (
    LossSettings,
    make_loss_func,
    stock_loss_func,
    weighted_loss_func,
)
from megatron_tokweight.loss.normalizer import (
    GlobalBatchStats,
    Normalization,
    count_loss_tokens,
    global_batch_stats,
)
from megatron_tokweight.loss.reporting import micro_batch_report, reduce_reports

__all__ = [
    "PATH_EXPLICIT_GROUP",
    "PATH_MEGATRON",
    "PATH_MEGATRON_TP_GROUP",
    "GlobalBatchStats",
    "LossSettings",
    "Normalization",
    "apply_token_weights",
    "count_loss_tokens",
    "cross_entropy_path",
    "fused_linear_weighted_cross_entropy",
    "fused_target_logprobs",
    "global_batch_stats",
    "make_loss_func",
    "micro_batch_report",
    "per_token_cross_entropy",
    "reduce_reports",
    "stock_loss_func",
    "weighted_cross_entropy",
    "weighted_loss_func",
]
