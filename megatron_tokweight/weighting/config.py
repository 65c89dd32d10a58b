"""`WeightingConfig`: which weight every sample and token gets, and how the loss is normalized.

A config is built from a preset (see `presets.py`) plus explicit fields, which override the
preset's. It loads from a dict, a YAML/JSON file or Megatron-style command-line arguments, and
validates everything on construction: an error names the field and says what to write instead.

Rule text forms (used in files and on the command line):
  task rule   "none" (weight 1.0) | "constant:C" or just "C" (weight C) | "power:C[:P]" (C / n^P, P = 0.5)
  table entry "PATTERN=RULE", e.g. "*caption*=0.1"; PATTERN is an fnmatch glob (case-sensitive)
"""
import argparse
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from megatron_tokweight.errors import ConfigError, reject_unknown_keys

NORMALIZATIONS = ("weight_sum", "sample_count", "token_count")
RULE_KINDS = ("none", "constant", "power")
DEFAULT_POWER_EXPONENT = 0.5


def _number(value: Any, where: str, minimum: Optional[float] = 0.0) -> float:
    """A finite float (>= minimum), or a ConfigError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{where}: must be >= {minimum:g}, got {value!r}")
    return number


def _exact(number: float) -> str:
    """Short text for a float that reads back to exactly the same value."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


@dataclass(frozen=True)
class TaskRule:
    """Sample weight of a task as a function of its answer-token count n: c / n^p.

    kind "none" is 1.0, "constant" is `value` (p = 0), "power" is `value` / n^`exponent`.
    Any rule gives 0 when n = 0 (a sample without loss tokens).
    """

    kind: str
    value: float = 1.0
    exponent: Optional[float] = None

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise ConfigError(f"task rule kind {self.kind!r} is unknown; use one of {', '.join(RULE_KINDS)}")
        value = _number(self.value, f"{self.kind} rule value")
        if self.kind == "none" and value != 1.0:
            raise ConfigError(f"rule 'none' always weighs 1.0 (got value {self.value!r}); use 'constant:{self.value}'")
        if self.kind == "power":
            exponent = DEFAULT_POWER_EXPONENT if self.exponent is None else _number(self.exponent, "power rule exponent")
        else:
            if self.exponent not in (None, 0, 0.0):
                raise ConfigError(f"a {self.kind!r} rule takes no exponent (got {self.exponent!r}); use 'power:C:P'")
            exponent = 0.0
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "exponent", exponent)

    @classmethod
    def none(cls) -> "TaskRule":
        return cls("none")

    @classmethod
    def constant(cls, value: float) -> "TaskRule":
        return cls("constant", value)

    @classmethod
    def power(cls, value: float, exponent: float = DEFAULT_POWER_EXPONENT) -> "TaskRule":
        return cls("power", value, exponent)

    @classmethod
    def parse(cls, spec: Any, where: str = "rule") -> "TaskRule":
        """A rule from a number, a text form ("none", "0.1", "constant:0.1", "power:4:0.5") or a mapping."""
        if isinstance(spec, TaskRule):
            return spec
        if isinstance(spec, Mapping):
            reject_unknown_keys(spec, ("kind", "value", "exponent"), where)
            if "kind" not in spec:
                raise ConfigError(f"{where}: a rule mapping needs 'kind' ({', '.join(RULE_KINDS)})")
            return cls._build(where, spec["kind"], spec.get("value", 1.0), spec.get("exponent"))
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls._build(where, "constant", spec, None)
        if isinstance(spec, str):
            parts = [part.strip() for part in spec.strip().split(":")]
            kind, args = parts[0], parts[1:]
            if kind == "none" and not args:
                return cls.none()
            if kind == "constant" and len(args) == 1:
                return cls._build(where, "constant", args[0], None)
            if kind == "power" and len(args) in (1, 2):
                return cls._build(where, "power", args[0], args[1] if len(args) == 2 else None)
            if len(parts) == 1:
                try:
                    return cls._build(where, "constant", float(kind), None)
                except ValueError:
                    pass
        raise ConfigError(
            f"{where}: cannot read rule {spec!r}; write 'none', a number C, 'constant:C' or 'power:C[:P]' "
            "(C / n^P, P defaults to 0.5)"
        )

    @classmethod
    def _build(cls, where, kind, value, exponent) -> "TaskRule":
        try:
            return cls(kind, value, exponent)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def coefficients(self) -> Tuple[float, float]:
        """(c, p) with weight = c / n^p for n > 0."""
        return self.value, self.exponent

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "constant":
            return f"constant:{_exact(self.value)}"
        return f"power:{_exact(self.value)}:{_exact(self.exponent)}"


@dataclass(frozen=True)
class TaskRuleEntry:
    """One row of the task table: tasks whose name matches `pattern` (fnmatch glob) get `rule`."""

    pattern: str
    rule: TaskRule

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"task rule pattern must be a non-empty string, got {self.pattern!r}")
        object.__setattr__(self, "rule", TaskRule.parse(self.rule, f"task rule {self.pattern!r}"))

    @classmethod
    def parse(cls, spec: Any, where: str) -> "TaskRuleEntry":
        """From "PATTERN=RULE", a (pattern, rule) pair or {"pattern": ..., "rule": ...}."""
        if isinstance(spec, TaskRuleEntry):
            return spec
        if isinstance(spec, str):
            pattern, sep, rule = spec.rpartition("=")
            if not sep or not pattern:
                raise ConfigError(f"{where}: expected 'PATTERN=RULE' (e.g. '*caption*=0.1'), got {spec!r}")
            return cls(pattern, TaskRule.parse(rule, f"{where} ({pattern!r})"))
        if isinstance(spec, Mapping):
            reject_unknown_keys(spec, ("pattern", "rule"), where)
            if "pattern" not in spec or "rule" not in spec:
                raise ConfigError(f"{where}: a task rule needs both 'pattern' and 'rule', got {dict(spec)!r}")
            pattern = spec["pattern"]
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{where}.pattern: must be a non-empty string, got {pattern!r}")
            return cls(pattern, TaskRule.parse(spec["rule"], f"{where}.rule"))
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            pattern = spec[0]
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{where}: pattern must be a non-empty string, got {pattern!r}")
            return cls(pattern, TaskRule.parse(spec[1], f"{where} ({pattern!r})"))
        raise ConfigError(f"{where}: expected 'PATTERN=RULE' or {{pattern: ..., rule: ...}}, got {spec!r}")

    def __str__(self) -> str:
        return f"{self.pattern}={self.rule}"


@dataclass(frozen=True)
class FrequencyRule:
    """Corpus-frequency token factor w_t = clip((f_t / f_median)^-alpha, lo, hi).

    f_t is token t's count over every token of the corpus (prompts included, as the counting
    pass over the `.bin` sees them); f_median is the median count over the token ids that
    occur at least once (each id counted once, unseen ids excluded). Ids that never occur get `hi`.
    alpha > 0 up-weights rare tokens and down-weights frequent ones.
    """

    alpha: float
    lo: float = 0.5
    hi: float = 2.0

    def __post_init__(self):
        alpha = _number(self.alpha, "frequency.alpha")
        lo = _number(self.lo, "frequency.lo")
        hi = _number(self.hi, "frequency.hi")
        if lo > hi:
            raise ConfigError(f"frequency.lo ({lo:g}) must be <= frequency.hi ({hi:g})")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @classmethod
    def parse(cls, spec: Any) -> "FrequencyRule":
        if isinstance(spec, FrequencyRule):
            return spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"frequency: expected a mapping {{alpha, lo, hi}}, got {spec!r}")
        reject_unknown_keys(spec, ("alpha", "lo", "hi"), "frequency")
        if "alpha" not in spec:
            raise ConfigError("frequency: 'alpha' is required (e.g. {alpha: 0.5, lo: 0.5, hi: 2.0})")
        return cls(**spec)


def _parse_task_rules(value: Any) -> Tuple[TaskRuleEntry, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"task_rules: expected a list of 'PATTERN=RULE' entries, got {value!r}")
    return tuple(TaskRuleEntry.parse(entry, f"task_rules[{i}]") for i, entry in enumerate(value))


def _parse_stop_tokens(value: Any) -> Dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"stop_token_ids: expected a mapping {{token id: factor}}, got {value!r}")
    parsed = {}
    for key, factor in value.items():
        try:
            token_id = int(key)
            if isinstance(key, (bool, float)) or token_id < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"stop_token_ids: key {key!r} is not a token id (a non-negative integer)") from None
        parsed[token_id] = _number(factor, f"stop_token_ids[{token_id}]")
    return parsed


def _parse_span_weights(value: Any) -> Dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"span_weights: expected a mapping {{span kind name: factor}}, got {value!r}")
    parsed = {}
    for kind, factor in value.items():
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"span_weights: key {kind!r} is not a span kind name")
        parsed[kind] = _number(factor, f"span_weights[{kind!r}]")
    return parsed


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
        from megatron_tokweight.weighting.presets import preset_fields

        base = preset_fields(self.preset)  # validates the preset name
        task_rules = base["task_rules"] if self.task_rules is None else _parse_task_rules(self.task_rules)
        default_rule = (
            base["default_rule"] if self.default_rule is None else TaskRule.parse(self.default_rule, "default_rule")
        )
        annotation_exponent = (
            base["annotation_exponent"]
            if self.annotation_exponent is None
            else _number(self.annotation_exponent, "annotation_exponent")
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
            stop_token_ids=_parse_stop_tokens(self.stop_token_ids),
            frequency=frequency,
            span_weights=_parse_span_weights(self.span_weights),
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
        data = _read_mapping(Path(path))
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WeightingConfig":
        """From arguments added by `add_weighting_args`; flags override `--token-weighting-config`.

        The file's fields stay explicit, so a `--token-weighting-preset` flag changes only the
        fields the file leaves to the preset.
        """
        data: Dict[str, Any] = {}
        config_file = getattr(args, "token_weighting_config", None)
        if config_file:
            data = dict(_read_mapping(Path(config_file)))
            try:
                reject_unknown_keys(data, [f.name for f in fields(cls)], "weighting config")
            except ConfigError as err:
                raise ConfigError(f"{config_file}: {err}") from None
        flag_fields = {
            "token_weighting_preset": "preset",
            "token_weighting_task_rule": "task_rules",
            "token_weighting_default_rule": "default_rule",
            "token_weighting_annotation_exponent": "annotation_exponent",
            "loss_normalization": "normalization",
        }
        for attr, name in flag_fields.items():
            value = getattr(args, attr, None)
            if value is not None:
                data[name] = value
        stop_tokens = getattr(args, "token_weighting_stop_token", None)
        if stop_tokens is not None:
            data["stop_token_ids"] = _parse_pairs(stop_tokens, "--token-weighting-stop-token", "ID=FACTOR")
        spans = getattr(args, "token_weighting_span_weight", None)
        if spans is not None:
            data["span_weights"] = _parse_pairs(spans, "--token-weighting-span-weight", "KIND=FACTOR")
        frequency = {
            key: getattr(args, f"token_weighting_frequency_{key}", None) for key in ("alpha", "lo", "hi")
        }
        frequency = {key: value for key, value in frequency.items() if value is not None}
        if frequency:
            if "alpha" not in frequency and "alpha" not in (data.get("frequency") or {}):
                raise ConfigError("--token-weighting-frequency-lo/-hi need --token-weighting-frequency-alpha")
            data["frequency"] = {**(data.get("frequency") or {}), **frequency}
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            source = f"{config_file} and command-line flags" if config_file else "command-line flags"
            raise ConfigError(f"{source}: {err}") from None

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


def _read_mapping(path: Path) -> Mapping:
    if not path.is_file():
        raise ConfigError(f"{path}: weighting config file not found")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .json")
    text = path.read_text()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of weighting fields, got {type(data).__name__}")
    return data


def _parse_pairs(items, flag: str, form: str) -> Dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: expected {form}, got {item!r}")
        pairs[key] = value
    return pairs


def add_weighting_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the token-weighting flags (Megatron `extra_args_provider` style); returns the parser."""
    from megatron_tokweight.weighting.presets import PRESET_NAMES

    group = parser.add_argument_group("token weighting", "sample and token loss weights (megatron-tokweight)")
    group.add_argument("--token-weighting-config", metavar="FILE", default=None,
                       help="YAML/JSON file with a weighting config; the flags below override its fields")
    group.add_argument("--token-weighting-preset", choices=PRESET_NAMES, default=None,
                       help="molmo2: caption 0.1, pointing 0.2, else 4/sqrt(n); molmo2-released: 2/sqrt(n) and "
                            "1/sqrt(K) per annotation; uniform: every token 1.0")
    group.add_argument("--token-weighting-task-rule", metavar="PATTERN=RULE", action="append", default=None,
                       help="task table row, repeatable, first match wins; RULE is none | C | constant:C | "
                            "power:C[:P] (C / n^P); replaces the preset's table")
    group.add_argument("--token-weighting-default-rule", metavar="RULE", default=None,
                       help="rule for tasks no pattern matches")
    group.add_argument("--token-weighting-annotation-exponent", metavar="Q", type=float, default=None,
                       help="multiply each of K annotations of one input by 1/K^Q")
    group.add_argument("--loss-normalization", choices=NORMALIZATIONS, default=None,
                       help="Z in L = sum(w*l)/Z: total weight, samples or loss tokens of the global batch")
    group.add_argument("--token-weighting-stop-token", metavar="ID=FACTOR", action="append", default=None,
                       help="multiply targets with this label token id by FACTOR (repeatable)")
    group.add_argument("--token-weighting-frequency-alpha", metavar="ALPHA", type=float, default=None,
                       help="enable w = clip((count/median count)^-ALPHA, LO, HI) from corpus token counts")
    group.add_argument("--token-weighting-frequency-lo", metavar="LO", type=float, default=None)
    group.add_argument("--token-weighting-frequency-hi", metavar="HI", type=float, default=None)
    group.add_argument("--token-weighting-span-weight", metavar="KIND=FACTOR", action="append", default=None,
                       help="multiply targets in spans of this kind by FACTOR (repeatable)")
    return parser
