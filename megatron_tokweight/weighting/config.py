"""`WeightingConfig`: which weight every sample and token gets, and how the loss is normalized.

A config is built from a preset (see `presets.py`) plus explicit fields, which override the
preset's. It loads from a dict or a YAML/JSON file (Megatron-LM flags: `megatron.arguments`) and
validates everything on construction: an error names the field and says what to write instead.
The rule text forms are in `rules.py`.
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from megatron_tokweight.common.files import read_config_file
from megatron_tokweight.errors import ConfigError, reject_unknown_keys
from megatron_tokweight.weighting.presets import preset_fields
from megatron_tokweight.weighting.rules import (
    FrequencyRule,
    TaskRule,
    TaskRuleEntry,
    parse_number,
    parse_span_weights,
    parse_stop_tokens,
    parse_task_rules,
)

# loss normalization modes (docs/CONTRACTS.md section 1): Z of L = sum(w * l) / Z
NORMALIZATIONS = ("weight_sum", "sample_count", "token_count")


@dataclass(frozen=True)
class WeightingConfig:
    """Sample rules (task table, annotation exponent), token rules and the loss normalization.

    Fields left as None take the preset's value (or the base default when `preset` is None:
    no task rules, every task 1.0, no annotation factor, `weight_sum`). After construction every
    field holds its resolved value.

    - `task_rules`: ordered (glob -> rule); the first pattern matching a task name wins, tasks
      matching none get `default_rule`. An explicit table replaces the preset's whole table.
    - `annotation_exponent` q: each of the K samples sharing a group id is multiplied by 1/K^q.
    - token rules multiply the sample weight: `stop_token_ids` {id: factor} and `frequency`
      (see `FrequencyRule`) act on the label token id, `span_weights` {span kind name: factor}
      on the kind of the span the target lies in.
    """

    preset: Optional[str] = None
    task_rules: Optional[Tuple[TaskRuleEntry, ...]] = None
    default_rule: Optional[TaskRule] = None
    annotation_exponent: Optional[float] = None
    normalization: Optional[str] = None
    stop_token_ids: Dict[int, float] = field(default_factory=dict)
    frequency: Optional[FrequencyRule] = None
    span_weights: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        base = preset_fields(self.preset)  # validates the preset name
        task_rules = base["task_rules"] if self.task_rules is None else parse_task_rules(self.task_rules)
        default_rule = (
            base["default_rule"] if self.default_rule is None else TaskRule.parse(self.default_rule, "default_rule")
        )
        annotation_exponent = (
            base["annotation_exponent"]
            if self.annotation_exponent is None
            else parse_number(self.annotation_exponent, "annotation_exponent")
        )
        normalization = base["normalization"] if self.normalization is None else self.normalization
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization {normalization!r} is unknown; use one of {', '.join(NORMALIZATIONS)}")
        frequency = None if self.frequency is None else FrequencyRule.parse(self.frequency)
        resolved = dict(
            task_rules=task_rules,
            default_rule=default_rule,
            annotation_exponent=annotation_exponent,
            normalization=normalization,
            stop_token_ids=parse_stop_tokens(self.stop_token_ids),
            frequency=frequency,
            span_weights=parse_span_weights(self.span_weights),
        )
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def has_token_rules(self) -> bool:
        return bool(self.stop_token_ids) or self.frequency is not None or bool(self.span_weights)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, mapping: Mapping) -> "WeightingConfig":
        """From a plain mapping (e.g. a YAML section); unknown keys are rejected by name."""
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"weighting config: expected a mapping, got {type(mapping).__name__}")
        known = [f.name for f in fields(cls)]
        reject_unknown_keys(mapping, known, "weighting config")
        return cls(**dict(mapping))

    @classmethod
    def from_file(cls, path) -> "WeightingConfig":
        """From a YAML (.yaml/.yml) or JSON (.json) file holding one mapping."""
        data = read_config_file(path, "weighting")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> Dict[str, Any]:
        """A plain mapping (YAML/JSON-safe) that `from_dict` turns back into an equal config."""
        return {
            "preset": self.preset,
            "task_rules": [str(entry) for entry in self.task_rules],
            "default_rule": str(self.default_rule),
            "annotation_exponent": self.annotation_exponent,
            "normalization": self.normalization,
            "stop_token_ids": dict(self.stop_token_ids),
            "frequency": None
            if self.frequency is None
            else {"alpha": self.frequency.alpha, "lo": self.frequency.lo, "hi": self.frequency.hi},
            "span_weights": dict(self.span_weights),
        }


def as_weighting_config(value) -> Optional[WeightingConfig]:
    """A config section as a `WeightingConfig`: None (no weighting: every target 1.0), a
    `WeightingConfig`, a preset name or a mapping of its fields."""
    if value is None or isinstance(value, WeightingConfig):
        return value
    if isinstance(value, str):
        return WeightingConfig(preset=value)
    if isinstance(value, Mapping):
        return WeightingConfig.from_dict(value)
    raise ConfigError(
        f"weighting must be null, a WeightingConfig, a preset name or a mapping of weighting fields, got {value!r}"
    )
