"""Sample and token loss weights (DESIGN.md section 2): config, presets, `Weighter`, reporting."""
from megatron_tokweight.weighting.config import (
    NORMALIZATIONS,
    FrequencyRule,
    TaskRule,
    TaskRuleEntry,
    WeightingConfig,
    add_weighting_args,
)
from megatron_tokweight.weighting.presets import PRESET_NAMES, PRESETS
from megatron_tokweight.weighting.report import (
    TaskWeightShare,
    format_weight_share,
    weight_share_by_task,
    weight_share_for_dataset,
)
from megatron_tokweight.weighting.sample_rules import (
    ResolvedTaskRule,
    SampleWeightReport,
    group_sizes_from_ids,
    sample_weights,
)
from megatron_tokweight.weighting.token_rules import frequency_factors
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
    "add_weighting_args",
    "format_weight_share",
    "frequency_factors",
    "group_sizes_from_ids",
    "sample_weights",
    "weight_share_by_task",
    "weight_share_for_dataset",
]
