"""Command-line arguments for Megatron-LM: `extra_args_provider(parser)` for `pretrain(...)`.

Every Megatron-LM flag of the plugin is here: the token-weighting flags (`add_weighting_args`,
read back by `weighting_config_from_args`), the long-context weighting flags
(`add_long_context_args`: `--long-context-config FILE` and `--long-context-method/-scorer/-lambda/...`,
read back by `long_context_config_from_args`), the packing flags and `--loss-report`. Everything else the packed dataset needs comes from Megatron-LM's own
arguments (`--data-path`/`--split`, `--seq-length`, `--seed`, `--data-cache-path`,
`--context-parallel-size`, `--micro-batch-size`, `--calculate-per-token-loss`); see
`datasets_provider.packed_dataset_config_from_args`.
"""
import argparse
from dataclasses import fields
from typing import Any, Dict, Optional

from megatron_tokweight.common.files import read_config_file
from megatron_tokweight.data.packing import ALGORITHMS, OVERLONG_POLICIES
from megatron_tokweight.errors import ConfigError, reject_unknown_keys
from megatron_tokweight.longcontext.config import (
    FIELD_ALIASES,
    METHODS,
    SCORERS,
    LongContextConfig,
)
from megatron_tokweight.loss.fused_linear_cross_entropy import FUSED_CROSS_ENTROPY
from megatron_tokweight.loss.reporting import REPORT_LEVELS
from megatron_tokweight.weighting.config import NORMALIZATIONS, WeightingConfig
from megatron_tokweight.weighting.presets import PRESET_NAMES


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


def weighting_config_from_args(args: argparse.Namespace) -> WeightingConfig:
    """From arguments added by `add_weighting_args`; flags override `--token-weighting-config`.

    The file's fields stay explicit, so a `--token-weighting-preset` flag changes only the
    fields the file leaves to the preset.
    """
    data: Dict[str, Any] = {}
    config_file = getattr(args, "token_weighting_config", None)
    if config_file:
        data = dict(read_config_file(config_file, "weighting"))
        try:
            reject_unknown_keys(data, [f.name for f in fields(WeightingConfig)], "weighting config")
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
        return WeightingConfig.from_dict(data)
    except ConfigError as err:
        source = f"{config_file} and command-line flags" if config_file else "command-line flags"
        raise ConfigError(f"{source}: {err}") from None


# flag --long-context-X (argparse attribute long_context_X) -> field
_FLAG_FIELDS = {name: name for name in ("method", "scorer", "kappa", "gamma", "k", "short_context", "stride")}
_FLAG_FIELDS["lambda"] = "lam"


def add_long_context_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the long-context weighting flags (Megatron `extra_args_provider` style); returns the parser.

    Any of them (or the file) turns long-context weighting on; unset fields keep
    `LongContextConfig`'s defaults."""
    group = parser.add_argument_group("long-context weighting",
                                      "Helm et al. 2025 / LongCE / Rho-1 token weights (megatron-tokweight)")
    group.add_argument("--long-context-config", metavar="FILE", default=None,
                       help="YAML/JSON mapping of long_context fields (method, scorer, lambda, kappa, gamma, k, "
                            "short_context, stride); the flags below override it")
    group.add_argument("--long-context-method", choices=METHODS, default=None,
                       help="dense | sparse (Helm et al.), longce, rho1 (default dense)")
    group.add_argument("--long-context-scorer", choices=SCORERS, default=None,
                       help="frozen: scores from `tokweight score` next to each prefix; unfrozen: the trained "
                            "model scores each global batch under no_grad before the step (needs PP = CP = 1)")
    group.add_argument("--long-context-lambda", type=float, default=None, metavar="LAMBDA",
                       help="dense: uniform share of the weight (default 0.75)")
    group.add_argument("--long-context-kappa", type=float, default=None, help="sparse: kept fraction (default 0.25)")
    group.add_argument("--long-context-gamma", type=float, default=None, help="longce: weight cap (default 5)")
    group.add_argument("--long-context-k", type=float, default=None, help="rho1: kept fraction (default 0.6)")
    group.add_argument("--long-context-short-context", type=int, default=None, metavar="N",
                       help="tokens the short context keeps at most (default 8192)")
    group.add_argument("--long-context-stride", type=int, default=None, metavar="S",
                       help="short-context window advance, 1..N (default 6144)")
    return parser


def long_context_config_from_args(args: argparse.Namespace) -> Optional[LongContextConfig]:
    """From `add_long_context_args`' flags, which override `--long-context-config`'s fields;
    None when neither the file nor any flag is given (long-context weighting off)."""
    data = {}
    path = getattr(args, "long_context_config", None)
    if path:
        data = dict(read_config_file(path, "long_context"))
    flags = {name: getattr(args, f"long_context_{flag}", None) for flag, name in _FLAG_FIELDS.items()}
    flags = {name: value for name, value in flags.items() if value is not None}
    # a flag replaces the file's field, whichever spelling the file used
    data = {key: value for key, value in data.items() if FIELD_ALIASES.get(key, key) not in flags}
    data.update(flags)
    if not path and not data:
        return None
    try:
        return LongContextConfig.from_dict(data)
    except ConfigError as err:
        source = f"{path} and --long-context-* flags" if path else "--long-context-* flags"
        raise ConfigError(f"{source}: {err}") from None


def add_packing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the sequence-packing flags; returns the parser. Unset flags keep
    `PackedDatasetConfig`'s defaults (bfd, truncate)."""
    group = parser.add_argument_group("sequence packing", "packing samples into rows (megatron-tokweight)")
    group.add_argument("--pack-algorithm", choices=ALGORITHMS, default=None,
                       help="bfd: best-fit-decreasing (fewest rows, the default); ffd: first-fit-decreasing; "
                            "next-fit: keeps the sample order")
    group.add_argument("--pack-overlong", choices=OVERLONG_POLICIES, default=None,
                       help="a sample longer than --seq-length is truncated to its first --seq-length tokens "
                            "(the default), split into full rows plus a remainder (its fragments share the "
                            "sample's weight), or dropped; every case is counted in the pack report")
    group.add_argument("--pack-pad-id", type=int, default=None, metavar="ID",
                       help="token id that pads packed rows; needed when no --data-path prefix has a sidecar "
                            "(plain Megatron .bin/.idx prefixes, read as text samples), else the prepared "
                            "prefixes' pad id")
    return parser


def add_report_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --loss-report and --tokweight-fused-ce; returns the parser."""
    group = parser.add_argument_group("loss reports", "what the loss function reports (megatron-tokweight)")
    group.add_argument("--loss-report", choices=REPORT_LEVELS, default="full",
                       help="full: unweighted and weighted loss, per task and per blended dataset (the default); "
                            "objective: only the weighted loss L as one fp32 [sum, count] pair, as cheap as "
                            "Megatron's stock 'lm loss' report")
    group.add_argument("--tokweight-fused-ce", choices=FUSED_CROSS_ENTROPY, default="off",
                       help="off: Megatron's output layer and vocab-parallel cross-entropy (the default); torch or "
                            "triton: the fused linear cross-entropy, same loss and gradients without holding the "
                            "[s, b, vocab / TP] logits (no Multi-Token Prediction)")
    return parser


def check_flag_combinations(args: argparse.Namespace) -> None:
    """ConfigError for Megatron-LM flags the plugin cannot serve together (read with the plugin's)."""
    if getattr(args, "use_legacy_models", False):
        raise ConfigError("megatron-tokweight needs Megatron-Core models; drop --use-legacy-models")
    pipeline = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if pipeline > 1 and (getattr(args, "micro_batch_size", 1) or 1) > 1:
        raise ConfigError(
            "with pipeline parallelism use --micro-batch-size 1: a micro-batch of packed rows travels as one THD "
            f"stream of micro_batch_size x seq_length tokens, and the pipeline's send/recv shapes assume "
            f"[seq_length, micro_batch_size] (got micro batch size {args.micro_batch_size})"
        )
    if getattr(args, "tokweight_fused_ce", "off") != "off" and getattr(args, "mtp_num_layers", None):
        raise ConfigError("--tokweight-fused-ce does not support Multi-Token Prediction: drop --mtp-num-layers "
                          "or use --tokweight-fused-ce off")
    long_context = long_context_config_from_args(args)
    if long_context is not None and long_context.scores_each_step and pipeline > 1:
        raise ConfigError(
            f"--long-context-scorer unfrozen (and rho1) scores with the whole model before each step: use "
            f"--pipeline-model-parallel-size 1 (got {pipeline}), or the frozen scorer"
        )


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `pretrain(..., extra_args_provider=extra_args_provider)`: weighting, long-context,
    packing and report flags. The returned parser also refuses, as it parses, flag combinations the
    plugin cannot serve (`check_flag_combinations`): before any rank builds a model."""
    add_weighting_args(parser)
    add_long_context_args(parser)
    add_packing_args(parser)
    add_report_args(parser)
    parse_known_args = parser.parse_known_args  # Megatron-LM calls parse_args, which calls this

    def parse_and_check(*args, **kwargs):
        namespace, rest = parse_known_args(*args, **kwargs)
        try:
            check_flag_combinations(namespace)
        except ConfigError as err:
            parser.error(str(err))  # argparse's refusal: usage, the message, exit status 2
        return namespace, rest

    parser.parse_known_args = parse_and_check  # this parser only: nothing global is changed
    return parser
