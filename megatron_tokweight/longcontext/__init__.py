"""Long-context token weighting (docs/CONTRACTS.md section 2; Helm, Daheim, Gurevych 2025).

  config          `LongContextConfig` (method dense|sparse|longce|rho1, scorer frozen|unfrozen)
  scores          the formulas: pure torch functions of per-token log-probabilities
  logprobs        log p(label) from vocab-parallel logits, reduced over the TP group
  windows         strided short-context windows as a packed (THD) batch
  forward         scoring forwards of a GPT model (no_grad, eval mode)
  scorer_online   `OnlineScorer`: the trained model scores itself each step (unfrozen);
                  `step_scorer(config, ...)`: the one a training step runs (unfrozen, rho1) or None
  scorer_offline  `score_dataset`: a checkpoint scores a prepared dataset (frozen)
  score_sidecar   the per-token log-probability files `tokweight score` writes, and row gathering
                  (`ScoredRows`; `attach_scores` for a dataset or a blend, `with_scores` for
                  a builder's list); `tokweight score` is `cli.score`
"""
from megatron_tokweight.longcontext.config import METHODS, SCORERS, LongContextConfig
from megatron_tokweight.longcontext.scores import (
    apply_weights,
    dense_weights,
    helm_scores,
    long_context_weights,
    longce_weights,
    rho1_weights,
    segment_ids_from_cu_seqlens,
    segment_ids_from_sample_ids,
    sparse_weights,
)

__all__ = [
    "METHODS",
    "SCORERS",
    "LongContextConfig",
    "apply_weights",
    "dense_weights",
    "helm_scores",
    "long_context_weights",
    "longce_weights",
    "rho1_weights",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_sample_ids",
    "sparse_weights",
]
