"""Token rules as lookup tables: a factor per vocabulary id and a factor per span kind.

Stop-token factors and frequency factors both depend only on the label id, so they are folded
into one float32 [vocab_size] table; span-kind factors form a float32 [1 + num_kinds] table whose
first slot (kind -1: the position is not in any span) is 1.0. A row's factors are then two
gathers and a product, with no Python loop over tokens.
"""
from typing import Mapping, Optional, Sequence

import numpy as np

from megatron_tokweight.errors import ConfigError, TokweightError
from megatron_tokweight.weighting.rules import FrequencyRule


def frequency_factors(token_counts, rule: FrequencyRule) -> np.ndarray:
    """float32 [V]: clip((count_t / median)^-alpha, lo, hi); ids with count 0 get hi.

    median = np.median of the counts of the ids that occur (count > 0), each id once.
    """
    counts = np.asarray(token_counts)
    if counts.ndim != 1 or (counts.size and counts.dtype.kind not in "iuf"):
        raise TokweightError(f"token counts must be a 1-D numeric array, got {counts.dtype} {counts.shape}")
    counts = counts.astype(np.float64)
    if counts.size and (not np.isfinite(counts).all() or counts.min() < 0):
        raise TokweightError("token counts must be finite and >= 0")
    seen = counts > 0
    if not seen.any():
        raise ConfigError("frequency rule: the corpus token counts are all zero; no median frequency to compare with")
    median = float(np.median(counts[seen]))
    ratio = np.where(seen, counts, median) / median
    factors = np.clip(ratio ** (-rule.alpha), rule.lo, rule.hi)
    factors[~seen] = rule.hi
    return factors.astype(np.float32)


def vocab_factor_table(
    vocab_size: int,
    stop_token_ids: Mapping[int, float],
    frequency: Optional[FrequencyRule] = None,
    token_counts=None,
) -> Optional[np.ndarray]:
    """float32 [vocab_size] product of stop-token and frequency factors; None when neither is set."""
    if not stop_token_ids and frequency is None:
        return None
    table = np.ones(vocab_size, dtype=np.float32)
    if frequency is not None:
        if token_counts is None:
            raise ConfigError("frequency rule needs corpus token counts: pass token_counts or a dataset prefix")
        counts = np.asarray(token_counts)
        if counts.shape != (vocab_size,):
            raise ConfigError(
                f"frequency rule: token counts cover {counts.shape} ids but the vocabulary has {vocab_size}"
            )
        table *= frequency_factors(counts, frequency)
    for token_id, factor in stop_token_ids.items():
        if not 0 <= token_id < vocab_size:
            raise ConfigError(f"stop_token_ids: token id {token_id} is outside the vocabulary [0, {vocab_size})")
        table[token_id] *= np.float32(factor)
    if not np.isfinite(table).all():
        bad = int(np.flatnonzero(~np.isfinite(table))[0])
        raise ConfigError(f"token id {bad}: stop-token x frequency factor overflows float32")
    return table


def span_factor_table(span_kinds: Sequence[str], span_weights: Mapping[str, float]) -> Optional[np.ndarray]:
    """float32 [1 + len(span_kinds)]: slot 0 for kind -1 (no span) is 1.0; None when no span rule."""
    if not span_weights:
        return None
    kinds = list(span_kinds)
    unknown = [name for name in span_weights if name not in kinds]
    if unknown:
        raise ConfigError(
            f"span_weights: span kind(s) {', '.join(map(repr, unknown))} not in this dataset's span kinds "
            f"{kinds}"
        )
    table = np.ones(1 + len(kinds), dtype=np.float32)
    for name, factor in span_weights.items():
        table[1 + kinds.index(name)] = np.float32(factor)
    if not np.isfinite(table).all():
        raise ConfigError("span_weights: a factor overflows float32")
    return table


def lookup_token_factors(
    vocab_table: Optional[np.ndarray], span_table: Optional[np.ndarray], labels, span_kinds
) -> Optional[np.ndarray]:
    """float32 [L] factors for targets with these label ids and span kinds (-1: no span)."""
    if vocab_table is None and span_table is None:
        return None
    labels = np.asarray(labels)
    span_kinds = np.asarray(span_kinds)
    if labels.ndim != 1 or span_kinds.shape != labels.shape:
        raise TokweightError(f"labels {labels.shape} and span_kinds {span_kinds.shape} must be 1-D of equal length")
    if labels.size and (labels.dtype.kind not in "iu" or span_kinds.dtype.kind not in "iu"):
        raise TokweightError(f"labels ({labels.dtype}) and span_kinds ({span_kinds.dtype}) must be integer arrays")
    factors = np.ones(labels.shape, dtype=np.float32)
    if labels.size == 0:
        return factors
    if vocab_table is not None:
        if labels.min() < 0 or labels.max() >= vocab_table.size:
            bad = int(np.flatnonzero((labels < 0) | (labels >= vocab_table.size))[0])
            raise TokweightError(f"position {bad}: label {labels[bad]} is outside the vocabulary [0, {vocab_table.size})")
        factors *= vocab_table[labels]
    if span_table is not None:
        if span_kinds.min() < -1 or span_kinds.max() >= span_table.size - 1:
            bad = int(np.flatnonzero((span_kinds < -1) | (span_kinds >= span_table.size - 1))[0])
            raise TokweightError(
                f"position {bad}: span kind {span_kinds[bad]} is outside [-1, {span_table.size - 1}) "
                "(-1 = not in a span)"
            )
        factors *= span_table[span_kinds.astype(np.int64) + 1]
    return factors
