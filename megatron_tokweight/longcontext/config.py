"""`LongContextConfig`: which long-context token weighting runs, with which scorer and context.

Methods (docs/CONTRACTS.md section 2; Helm, Daheim, Gurevych 2025 and its family):
  dense   w_t = lam + (1 - lam) * N * s_t / sum_seq s,  s_t = |log p_short(t) - log p_long(t)|
  sparse  the top `kappa` fraction of s_t in a training sequence gets 1/kappa, the rest 0
  longce  w_t = min(exp(l_short - l_long), gamma)
  rho1    the top `k` fraction of tokens by excess loss l_model - l_reference gets 1, the rest 0

Scorers: "frozen" reads per-token log-probabilities that `tokweight score` precomputed with a fixed
checkpoint; "unfrozen" lets the model being trained score itself under no_grad every step.
The short context keeps at most `short_context` (n) tokens, computed with windows that advance by
`stride` (every token beyond the first window sees between n - stride + 1 and n tokens).

The weights multiply the sample/token weights already in a row's `loss_weights`; the loss
normalization mode (weight_sum, sample_count, token_count) is applied afterwards, unchanged.

Where the log-probabilities come from in training:
  frozen   dense/sparse/longce: both from the score sidecar, weights computed with the rows
           (`score_sidecar.ScoredRows`); nothing runs at step time
  unfrozen dense/sparse/longce: both from the trained model before each step (`OnlineScorer`)
  rho1     (frozen only) the reference's from the sidecar (its full-context `long_logprobs`),
           the trained model's full-context ones before each step
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from megatron_tokweight.errors import ConfigError

METHODS = ("dense", "sparse", "longce", "rho1")
SCORERS = ("frozen", "unfrozen")

# YAML spellings that are not Python identifiers
FIELD_ALIASES = {"lambda": "lam", "n": "short_context"}


@dataclass(frozen=True)
class LongContextConfig:
    """Long-context weighting. Defaults follow the released Helm et al. configuration
    (lambda 0.75, n 8192, stride 6144) and LongCE's gamma 5."""

    method: str = "dense"
    scorer: str = "frozen"
    lam: float = 0.75
    kappa: float = 0.25
    gamma: float = 5.0
    k: float = 0.6
    short_context: int = 8192
    stride: int = 6144

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(
                f"long_context.method {self.method!r} is unknown; use one of {', '.join(METHODS)}"
            )
        if self.scorer not in SCORERS:
            raise ConfigError(
                f"long_context.scorer {self.scorer!r} is unknown; use 'frozen' (scores precomputed "
                "by `tokweight score`) or 'unfrozen' (the trained model scores itself each step)"
            )
        lam = _real(self.lam, "long_context.lambda")
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"long_context.lambda must lie in [0, 1], got {self.lam!r}")
        kappa = _real(self.kappa, "long_context.kappa")
        if not 0.0 < kappa <= 1.0:
            raise ConfigError(
                f"long_context.kappa is the kept fraction and must lie in (0, 1], got {self.kappa!r}"
            )
        gamma = _real(self.gamma, "long_context.gamma")
        if not gamma > 0.0:
            raise ConfigError(f"long_context.gamma (LongCE cap) must be > 0, got {self.gamma!r}")
        k = _real(self.k, "long_context.k")
        if not 0.0 < k <= 1.0:
            hint = f" (a fraction: write {k / 100:g} for {k:g}%)" if 1.0 < k <= 100.0 else ""
            raise ConfigError(f"long_context.k must lie in (0, 1], got {self.k!r}{hint}")
        n = _integer(self.short_context, "long_context.short_context")
        stride = _integer(self.stride, "long_context.stride")
        if n < 1:
            raise ConfigError(f"long_context.short_context must be >= 1 token, got {n}")
        if not 1 <= stride <= n:
            raise ConfigError(
                f"long_context.stride must lie in [1, short_context={n}], got {stride}: "
                "each window scores its last `stride` tokens, so a larger stride leaves gaps"
            )
        for name, value in (("lam", lam), ("kappa", kappa), ("gamma", gamma), ("k", k),
                            ("short_context", n), ("stride", stride)):
            object.__setattr__(self, name, value)
        if self.method == "rho1" and self.scorer == "unfrozen":
            raise ConfigError(
                "long_context.method 'rho1' compares the trained model with a fixed reference model: use "
                "scorer 'frozen' (the reference's log-probabilities from `tokweight score`; the trained "
                "model's are computed each step)"
            )

    @property
    def reads_scores(self) -> bool:
        """Whether training reads the score sidecar `tokweight score` wrote (frozen scorer, rho1)."""
        return self.scorer == "frozen"

    @property
    def scores_each_step(self) -> bool:
        """Whether the trained model scores each step's micro-batches (unfrozen scorer, rho1)."""
        return self.scorer == "unfrozen" or self.method == "rho1"

    def check_sequence_length(self, seq_length: int) -> None:
        """Raise unless the short context is shorter than the training sequence length."""
        if self.short_context >= seq_length:
            raise ConfigError(
                f"long_context.short_context={self.short_context} must be smaller than the training "
                f"sequence length {seq_length}: with n >= the sequence length short and long "
                "contexts coincide and every score is 0"
            )

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "LongContextConfig":
        """From a YAML/JSON mapping; accepts `lambda` for `lam` and `n` for `short_context`."""
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"long_context: expected a mapping, got {type(mapping).__name__}")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in mapping.items():
            name = FIELD_ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(
                    f"long_context: unknown key {key!r}; known keys: "
                    f"{', '.join(sorted(known | set(FIELD_ALIASES)))}"
                )
            if name in values:
                raise ConfigError(f"long_context: {key!r} given twice (as {name!r} and an alias)")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def _real(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number of tokens, got {value!r}")
    return int(value)
