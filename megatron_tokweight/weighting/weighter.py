"""`Weighter`: a `WeightingConfig` bound to one dataset's tasks, span kinds and vocabulary.

Built once per dataset (rules resolved per task, token-rule lookup tables filled), then called
by the packed dataset with whole arrays:

    w = weighter.sample_weights(task_ids, n_trained, group_ids)      # float32 [N]
    f = weighter.token_factors(labels, span_kinds)                   # float32 [L] or None
    token weight = w[sample of the token] * f
"""
import logging
from typing import Optional, Sequence, Tuple

import numpy as np

from megatron_tokweight.errors import ConfigError, TokweightError
from megatron_tokweight.weighting.config import WeightingConfig
from megatron_tokweight.weighting.sample_rules import (
    ResolvedTaskRule,
    SampleWeightReport,
    compute_sample_weights,
    group_sizes_from_ids,
    resolve_task_rules,
)
from megatron_tokweight.weighting.token_rules import (
    lookup_token_factors,
    span_factor_table,
    vocab_factor_table,
)
from megatron_tokweight.weighting.token_weights import compose_token_weights

logger = logging.getLogger(__name__)


class Weighter:
    """Sample and token weights of one dataset under one `WeightingConfig`."""

    def __init__(
        self,
        config: WeightingConfig,
        task_names: Sequence[str],
        span_kinds: Sequence[str],
        vocab_size: Optional[int],
        vocab_table: Optional[np.ndarray] = None,
        span_table: Optional[np.ndarray] = None,
    ):
        self.config = config
        self.task_names = tuple(task_names)
        self.span_kinds = tuple(span_kinds)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.task_rules: Tuple[ResolvedTaskRule, ...] = resolve_task_rules(
            self.task_names, config.task_rules, config.default_rule
        )
        self._vocab_table = vocab_table
        self._span_table = span_table
        # the largest token factor is the product of the two largest table entries
        largest = np.float32(1.0)
        for table in (vocab_table, span_table):
            if table is not None and table.size:
                largest = largest * np.float32(table.max())
        if not np.isfinite(largest):
            raise ConfigError("token rules: the product of stop-token, frequency and span factors overflows float32")
        self.last_report: Optional[SampleWeightReport] = None

    @classmethod
    def from_config(
        cls,
        config: WeightingConfig,
        task_names: Sequence[str],
        span_kinds: Sequence[str],
        vocab_size: Optional[int],
        prefix: Optional[str] = None,
        token_counts=None,
    ) -> "Weighter":
        """Resolves rules for these tasks; a frequency rule counts tokens of `prefix`.bin unless
        `token_counts` (int [vocab_size]) is given. vocab_size None (a dataset whose tokenizer is
        unknown) serves every rule but the token-id ones."""
        if isinstance(config, str):
            config = WeightingConfig(preset=config)
        if not isinstance(config, WeightingConfig):
            raise TypeError(f"config must be a WeightingConfig or a preset name, got {type(config).__name__}")
        if vocab_size is None:
            if config.frequency is not None or config.stop_token_ids:
                raise ConfigError(
                    f"{prefix or 'the dataset'}: stop-token and frequency rules need the vocabulary size, and no "
                    "tokenizer is known for it (a Megatron prefix without a sidecar): name its tokenizer"
                )
            return cls(config, task_names, span_kinds, None, None, span_factor_table(span_kinds, config.span_weights))
        if int(vocab_size) < 1:
            raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
        if config.frequency is not None and token_counts is None:
            if prefix is None:
                raise ConfigError(
                    "frequency rule needs corpus token counts: pass the dataset prefix or token_counts"
                )
            from megatron_tokweight.weighting.token_counts import (
                count_token_ids_in_dataset,
            )

            token_counts = count_token_ids_in_dataset(prefix, int(vocab_size))
        vocab_table = vocab_factor_table(int(vocab_size), config.stop_token_ids, config.frequency, token_counts)
        span_table = span_factor_table(span_kinds, config.span_weights)
        return cls(config, task_names, span_kinds, vocab_size, vocab_table, span_table)

    @property
    def normalization(self) -> str:
        return self.config.normalization

    @property
    def has_token_rules(self) -> bool:
        return self._vocab_table is not None or self._span_table is not None

    # ---- sample weights -------------------------------------------------------------------

    def sample_weights_with_report(self, task_ids, n_trained, group_ids) -> Tuple[np.ndarray, SampleWeightReport]:
        """float32 [N] sample weights and how many samples got 0 because n = 0.

        K (annotations per input) is counted over `group_ids` as passed: pass all samples of the
        dataset, not a slice, or K is undercounted.
        """
        group_ids = np.asarray(group_ids)
        if group_ids.shape != np.shape(task_ids):
            raise TokweightError(f"group_ids {group_ids.shape} and task_ids {np.shape(task_ids)} differ in shape")
        sizes = group_sizes_from_ids(group_ids) if self.config.annotation_exponent else None
        weights, report = compute_sample_weights(
            self.task_rules, task_ids, n_trained, sizes, self.config.annotation_exponent
        )
        if report.zero_answer_samples:
            logger.warning("token weighting: %s", report)
        self.last_report = report
        return weights, report

    def sample_weights(self, task_ids, n_trained, group_ids) -> np.ndarray:
        """float32 [N]; the n = 0 count is in `self.last_report`."""
        return self.sample_weights_with_report(task_ids, n_trained, group_ids)[0]

    # ---- token weights --------------------------------------------------------------------

    def token_factors(self, labels, span_kinds) -> Optional[np.ndarray]:
        """float32 [L] product of the token rules for targets with these labels and span kinds
        (-1: not in a span); None when the config has no token rule."""
        return lookup_token_factors(self._vocab_table, self._span_table, labels, span_kinds)

    def token_weights(self, token_sample_weights, labels, span_kinds) -> np.ndarray:
        """float32 [L]: each position's sample weight times its token factor, checked finite."""
        weights = np.asarray(token_sample_weights, dtype=np.float32)
        factors = self.token_factors(labels, span_kinds)
        if factors is None:
            return weights
        labels, span_kinds = np.asarray(labels), np.asarray(span_kinds)
        return compose_token_weights(
            weights, factors, ("sample weight", "token factor"),
            lambda i: f"label {int(labels.reshape(-1)[i])}, span kind {int(span_kinds.reshape(-1)[i])}",
        )

    def describe(self) -> str:
        """Multi-line summary: normalization, each task's rule and the token rules."""
        cfg = self.config
        lines = [
            f"token weighting: preset {cfg.preset or '(none)'}, normalization {cfg.normalization}, "
            f"annotation exponent {cfg.annotation_exponent:g}"
        ]
        lines += [f"  task {r.task!r}: {r.describe()}" for r in self.task_rules]
        if cfg.stop_token_ids:
            lines.append(f"  stop tokens: {len(cfg.stop_token_ids)} ids")
        if cfg.frequency is not None:
            f = cfg.frequency
            lines.append(f"  frequency: alpha {f.alpha:g}, clipped to [{f.lo:g}, {f.hi:g}]")
        if cfg.span_weights:
            lines.append("  span weights: " + ", ".join(f"{k}={v:g}" for k, v in cfg.span_weights.items()))
        return "\n".join(lines)
