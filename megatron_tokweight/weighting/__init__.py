"""Sample and token loss weights (docs/CONTRACTS.md section 2): policy, no data access.

  rules          the rule grammar: TaskRule (c / n^p), TaskRuleEntry, FrequencyRule
  presets        molmo2, molmo2-released, uniform
  config         WeightingConfig (preset + explicit fields; dict and YAML/JSON files)
  sample_rules   sample weights w_i from task, n and annotation count
  token_rules    token factors f_t (stop tokens, frequency, span kinds)
  token_weights  compose_token_weights: the one definition of w_t = w_i * f_t * g_t
  weighter       Weighter: a config bound to one dataset's tasks, span kinds and vocabulary
  token_counts   token-id counts over a .bin (C++), for frequency rules
  report         per-task weight shares
"""
from megatron_tokweight.weighting.config import NORMALIZATIONS, WeightingConfig
from megatron_tokweight.weighting.presets import PRESET_NAMES, PRESETS
from megatron_tokweight.weighting.report import (
    TaskWeightShare,
    format_weight_share,
    weight_share_by_task,
    weight_share_for_metadata,
)
from megatron_tokweight.weighting.rules import FrequencyRule, TaskRule, TaskRuleEntry
from megatron_tokweight.weighting.sample_rules import (
    ResolvedTaskRule,
    SampleWeightReport,
    group_sizes_from_ids,
    sample_weights,
)
from megatron_tokweight.weighting.token_rules import frequency_factors
from megatron_tokweight.weighting.token_weights import compose_token_weights
from megatron_tokweight.weighting.weighter import Weighter

__all__ = [
    "NORMALIZATIONS",
    "PRESETS",
    "PRESET_NAMES",
    "FrequencyRule",
    "ResolvedTaskRule",
    "SampleWeightReport",
    "TaskRule",
    "TaskRuleEntry",
    "TaskWeightShare",
    "Weighter",
    "WeightingConfig",
    "compose_token_weights",
    "format_weight_share",
    "frequency_factors",
    "group_sizes_from_ids",
    "sample_weights",
    "weight_share_by_task",
    "weight_share_for_metadata",
]
