"""Named sample-weighting presets (docs/CONTRACTS.md section 2).

- `molmo2` (the Molmo2 write-up): captioning tasks 0.1, pointing tasks 0.2, every other task
  4 / sqrt(n) for n answer tokens; `weight_sum` normalization.
- `molmo2-released` (Molmo2's released training code): the same table with 2 / sqrt(n), and each
  of the K annotations of one input multiplied by 1 / sqrt(K); `weight_sum`.
- `uniform`: every loss token 1.0, normalized by the loss-token count (Megatron's per-token mean).

Presets set only the sample-level fields; token rules are always explicit.
"""
from typing import Any, Dict, Optional

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.weighting.rules import TaskRule, TaskRuleEntry

# task-name globs shared by both Molmo2 presets; first match wins
_MOLMO2_TABLE = (
    TaskRuleEntry("*caption*", TaskRule.constant(0.1)),
    TaskRuleEntry("*point*", TaskRule.constant(0.2)),
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "molmo2": dict(
        task_rules=_MOLMO2_TABLE,
        default_rule=TaskRule.power(4.0, 0.5),
        annotation_exponent=0.0,
        normalization="weight_sum",
    ),
    "molmo2-released": dict(
        task_rules=_MOLMO2_TABLE,
        default_rule=TaskRule.power(2.0, 0.5),
        annotation_exponent=0.5,
        normalization="weight_sum",
    ),
    "uniform": dict(
        task_rules=(),
        default_rule=TaskRule.none(),
        annotation_exponent=0.0,
        normalization="token_count",
    ),
}
PRESET_NAMES = tuple(PRESETS)

# no preset: all weights 1.0; weight_sum then equals token_count and stays self-normalizing
# once the user adds rules
_BASE = dict(task_rules=(), default_rule=TaskRule.none(), annotation_exponent=0.0, normalization="weight_sum")


def preset_fields(name: Optional[str]) -> Dict[str, Any]:
    """The sample-level fields of preset `name` (the base defaults for None)."""
    if name is None:
        return dict(_BASE)
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown; use one of {', '.join(PRESET_NAMES)} (or none)")
    return dict(PRESETS[name])
