"""Command-line arguments for Megatron-LM: `extra_args_provider(parser)` for `pretrain(...)`.

Adds the token-weighting flags (`megatron_tokweight.weighting.add_weighting_args`), the
long-context weighting flags (`megatron_tokweight.longcontext.config.add_long_context_args`:
`--long-context-config FILE` and `--long-context-method/-scorer/-lambda/...`) and the packing
flags and `--loss-report` below. Everything else the packed dataset needs comes from Megatron-LM's own
arguments (`--data-path`/`--split`, `--seq-length`, `--seed`, `--data-cache-path`,
`--context-parallel-size`, `--micro-batch-size`, `--calculate-per-token-loss`); see
`datasets_provider.packed_dataset_config_from_args`.
"""
import argparse

from megatron_tokweight.longcontext.config import add_long_context_args
from megatron_tokweight.loss.reporting import REPORT_LEVELS
from megatron_tokweight.packing import ALGORITHMS, OVERLONG_POLICIES
from megatron_tokweight.weighting import add_weighting_args


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
    return parser


def add_report_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --loss-report; returns the parser."""
    group = parser.add_argument_group("loss reports", "what the loss function reports (megatron-tokweight)")
    group.add_argument("--loss-report", choices=REPORT_LEVELS, default="full",
                       help="full: unweighted and weighted loss, per task and per blended dataset (the default); "
                            "objective: only the weighted loss L as one fp32 [sum, count] pair, as cheap as "
                            "Megatron's stock 'lm loss' report")
    return parser


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `pretrain(..., extra_args_provider=extra_args_provider)`: weighting, long-context,
    packing and report flags."""
    add_weighting_args(parser)
    add_long_context_args(parser)
    add_packing_args(parser)
    add_report_args(parser)
    return parser
