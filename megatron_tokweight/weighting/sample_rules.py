"""Sample weights: w_i = c_k / n_i^p_k * K_i^-q (docs/CONTRACTS.md section 2), vectorised over samples.

Every task rule is reduced once to coefficients (c, p) (constant: p = 0, none: c = 1, p = 0), so
one numpy expression covers all samples. n_i = 0 gives 0 for every rule (never inf or NaN).
"""
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from megatron_tokweight.errors import TokweightError
from megatron_tokweight.weighting.rules import TaskRule, TaskRuleEntry


@dataclass(frozen=True)
class ResolvedTaskRule:
    """The rule a task got and the table pattern that gave it (None: the default rule)."""

    task: str
    rule: TaskRule
    pattern: Optional[str]

    def describe(self) -> str:
        source = f"pattern {self.pattern!r}" if self.pattern is not None else "default rule"
        return f"{self.rule} ({source})"


@dataclass(frozen=True)
class SampleWeightReport:
    """What one sample-weight computation did; `zero_answer_samples` got weight 0 because n = 0."""

    num_samples: int
    zero_answer_samples: int
    zero_answer_by_task: Dict[str, int]

    def __str__(self) -> str:
        if not self.zero_answer_samples:
            return f"{self.num_samples} samples weighted, none without answer tokens"
        per_task = ", ".join(f"{task}: {count}" for task, count in self.zero_answer_by_task.items())
        return (
            f"{self.num_samples} samples weighted; {self.zero_answer_samples} have no answer tokens "
            f"(n = 0) and got weight 0 ({per_task})"
        )


def resolve_task_rules(
    task_names: Sequence[str], task_rules: Sequence[TaskRuleEntry], default_rule: TaskRule
) -> Tuple[ResolvedTaskRule, ...]:
    """The rule of each task: the first table pattern matching its name, else the default."""
    resolved = []
    for task in task_names:
        match = next((entry for entry in task_rules if fnmatchcase(task, entry.pattern)), None)
        if match is None:
            resolved.append(ResolvedTaskRule(task, default_rule, None))
        else:
            resolved.append(ResolvedTaskRule(task, match.rule, match.pattern))
    return tuple(resolved)


def group_sizes_from_ids(group_ids) -> np.ndarray:
    """K per sample: how many samples of `group_ids` share its group id (int64 [N])."""
    group_ids = np.asarray(group_ids)
    if group_ids.ndim != 1 or group_ids.dtype.kind not in "iu":
        raise TokweightError(f"group_ids must be a 1-D integer array, got {group_ids.dtype} {group_ids.shape}")
    if group_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.int64)


def _int_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise TokweightError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise TokweightError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def compute_sample_weights(
    rules: Sequence[ResolvedTaskRule],
    task_ids,
    answer_token_counts,
    group_sizes=None,
    annotation_exponent: float = 0.0,
) -> Tuple[np.ndarray, SampleWeightReport]:
    """float32 [N] weights for samples of tasks `rules[task_ids]` and a report of the n = 0 ones."""
    task_ids = _int_array(task_ids, "task_ids")
    counts = _int_array(answer_token_counts, "answer_token_counts")
    num = task_ids.size
    if counts.size != num:
        raise TokweightError(f"answer_token_counts has {counts.size} entries for {num} samples")
    if num and (task_ids.min() < 0 or task_ids.max() >= len(rules)):
        bad = int(np.flatnonzero((task_ids < 0) | (task_ids >= len(rules)))[0])
        raise TokweightError(f"sample {bad}: task id {task_ids[bad]} is outside [0, {len(rules)}) known tasks")
    if num and counts.min() < 0:
        bad = int(np.flatnonzero(counts < 0)[0])
        raise TokweightError(f"sample {bad}: answer token count {counts[bad]} is negative")

    coef = np.array([r.rule.value for r in rules], dtype=np.float64)
    expo = np.array([r.rule.exponent for r in rules], dtype=np.float64)
    has_answer = counts > 0
    # n^-p only where n > 0; n = 0 samples stay exactly 0
    safe_n = np.where(has_answer, counts, 1).astype(np.float64)
    weights = np.where(has_answer, coef[task_ids] * safe_n ** (-expo[task_ids]), 0.0)
    if annotation_exponent and group_sizes is not None:
        sizes = _int_array(group_sizes, "group_sizes")
        if sizes.size != num:
            raise TokweightError(f"group_sizes has {sizes.size} entries for {num} samples")
        if num and sizes.min() < 1:
            bad = int(np.flatnonzero(sizes < 1)[0])
            raise TokweightError(f"sample {bad}: group size K = {sizes[bad]} must be >= 1")
        weights = weights * sizes.astype(np.float64) ** (-annotation_exponent)

    with np.errstate(over="ignore"):  # overflow is reported below, naming the task
        weights32 = weights.astype(np.float32)
    finite = np.isfinite(weights32)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        rule = rules[task_ids[bad]]
        raise TokweightError(
            f"sample {bad} of task {rule.task!r}: weight {weights[bad]!r} (n = {counts[bad]}) does not fit "
            f"float32; rule {rule.describe()} is too large"
        )

    zero = ~has_answer
    zero_by_task = np.bincount(task_ids[zero], minlength=len(rules)) if num else np.zeros(len(rules), np.int64)
    report = SampleWeightReport(
        num_samples=num,
        zero_answer_samples=int(zero.sum()),
        zero_answer_by_task={rules[k].task: int(c) for k, c in enumerate(zero_by_task) if c},
    )
    return weights32, report


def sample_weights(
    task_names: Sequence[str],
    answer_token_counts,
    scheme="molmo2",
    group_sizes=None,
    return_report: bool = False,
):
    """float32 [N] weight of each sample from its task name and answer-token count n.

    `scheme` is a preset name ("molmo2", "molmo2-released", "uniform") or a `WeightingConfig`;
    `group_sizes` gives K (annotations of the same input) per sample for the annotation factor
    (K = 1 when None). n = 0 gives 0. With `return_report` also returns a `SampleWeightReport`.
    """
    from megatron_tokweight.weighting.config import WeightingConfig

    config = WeightingConfig(preset=scheme) if isinstance(scheme, str) else scheme
    if not isinstance(config, WeightingConfig):
        raise TypeError(f"scheme must be a preset name or a WeightingConfig, got {type(scheme).__name__}")
    names = np.asarray(task_names, dtype=str) if len(task_names) else np.zeros(0, dtype=str)
    if names.ndim != 1:
        raise TokweightError(f"task_names must be a flat sequence of strings, got shape {names.shape}")
    unique, task_ids = np.unique(names, return_inverse=True)
    rules = resolve_task_rules([str(t) for t in unique], config.task_rules, config.default_rule)
    weights, report = compute_sample_weights(
        rules, task_ids.reshape(-1), answer_token_counts, group_sizes, config.annotation_exponent
    )
    return (weights, report) if return_report else weights
