"""`tokweight` command line: one subcommand per module of this package, imported only when it runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`.
"""
import argparse
import sys
from importlib import import_module

from megatron_tokweight.common.expected_warnings import (
    silence_expected_megatron_warnings,
)
from megatron_tokweight.errors import TokweightError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "prepare": ("megatron_tokweight.cli.prepare", "tokenize JSONL into a Megatron IndexedDataset + sidecar"),
    "pack": ("megatron_tokweight.cli.pack", "pack a prepared dataset and report efficiency"),
    "demo": ("megatron_tokweight.cli.demo", "the main job: uniform vs molmo2-weighted training on an embedded corpus"),
    "train": ("megatron_tokweight.cli.train", "train on prepared data from a YAML config"),
    "score": ("megatron_tokweight.cli.score", "offline short-context scoring for long-context weights"),
    "inspect": ("megatron_tokweight.cli.inspect", "show packed rows as training sees them: tokens, targets, weights"),
}


def build_parser(command=None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="tokweight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if command in (None, name):
            import_module(module).add_arguments(sub_parser)
    return parser


def main(argv=None) -> int:
    silence_expected_megatron_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    args = build_parser(command).parse_args(argv)
    try:
        return import_module(args._module).run(args) or 0
    except TokweightError as err:
        print(f"tokweight {args.command}: error: {err}", file=sys.stderr)
        return 2

