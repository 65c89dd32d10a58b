"""The rule grammar of sample and token weights: `TaskRule` (c / n^p), `TaskRuleEntry` (glob ->
rule), `FrequencyRule`, and the parsers of their text forms (files and command line):

  task rule   "none" (weight 1.0) | "constant:C" or just "C" (weight C) | "power:C[:P]" (C / n^P, P = 0.5)
  table entry "PATTERN=RULE", e.g. "*caption*=0.1"; PATTERN is an fnmatch glob (case-sensitive)
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from megatron_tokweight.errors import ConfigError, reject_unknown_keys

RULE_KINDS = ("none", "constant", "power")
DEFAULT_POWER_EXPONENT = 0.5


def parse_number(value: Any, where: str, minimum: Optional[float] = 0.0) -> float:
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
        value = parse_number(self.value, f"{self.kind} rule value")
        if self.kind == "none" and value != 1.0:
            raise ConfigError(f"rule 'none' always weighs 1.0 (got value {self.value!r}); use 'constant:{self.value}'")
        if self.kind == "power":
            exponent = DEFAULT_POWER_EXPONENT if self.exponent is None else parse_number(self.exponent, "power rule exponent")
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
                    number = float(kind)
                except ValueError:
                    number = None
                if number is not None:  # "-0.5", "inf": a number, so say what is wrong with it
                    return cls._build(where, "constant", number, None)
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
        alpha = parse_number(self.alpha, "frequency.alpha")
        lo = parse_number(self.lo, "frequency.lo")
        hi = parse_number(self.hi, "frequency.hi")
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


def parse_task_rules(value: Any) -> Tuple[TaskRuleEntry, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"task_rules: expected a list of 'PATTERN=RULE' entries, got {value!r}")
    return tuple(TaskRuleEntry.parse(entry, f"task_rules[{i}]") for i, entry in enumerate(value))


def parse_stop_tokens(value: Any) -> Dict[int, float]:
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
        parsed[token_id] = parse_number(factor, f"stop_token_ids[{token_id}]")
    return parsed


def parse_span_weights(value: Any) -> Dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"span_weights: expected a mapping {{span kind name: factor}}, got {value!r}")
    parsed = {}
    for kind, factor in value.items():
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"span_weights: key {kind!r} is not a span kind name")
        parsed[kind] = parse_number(factor, f"span_weights[{kind!r}]")
    return parsed
