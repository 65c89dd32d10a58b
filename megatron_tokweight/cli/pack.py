"""`tokweight pack`: pack a prepared dataset (or a plain Megatron .bin/.idx prefix, its
documents as text samples: nothing but the prefix is needed) and report what packing does to it.

Packs every sample of PREFIX (file order; the dataset shuffles per split with its seed, which
moves only ties for bfd/ffd) and reports rows, packing efficiency (real tokens / row capacity),
the lossy cases (truncated, split, dropped, empty = kept samples that train no target) and the
time taken. `--json` prints one JSON object; `--plot` writes a histogram of row fill.
"""
import json
from typing import Optional

from megatron_tokweight.data.pack_report import pack_prefix, plot_row_fill
from megatron_tokweight.data.packing import ALGORITHMS, OVERLONG_POLICIES


def add_arguments(parser) -> None:
    parser.add_argument("prefix", help="dataset prefix written by `tokweight prepare` (PREFIX.bin/.idx/.tokweight), "
                                       "or a plain Megatron .bin/.idx prefix (its documents as text samples)")
    add_packing_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--plot", metavar="PNG_PATH", help="write a histogram of row fill to this PNG")


def add_packing_arguments(parser) -> None:
    """--seq-length, --algorithm, --overlong, --context-parallel-size (also `tokweight inspect`'s)."""
    parser.add_argument("--seq-length", type=int, required=True, metavar="L", help="tokens per packed row")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="bfd", help="packing algorithm (default: bfd)")
    parser.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate",
                        help="samples longer than L: truncate, split or drop (default: truncate)")
    parser.add_argument("--context-parallel-size", type=int, default=1, metavar="CP",
                        help="pad every sample to a multiple of 2 x CP as the dataset does (default: 1)")


def run(args) -> int:
    report = pack_prefix(args.prefix, args.seq_length, args.algorithm, args.overlong, args.context_parallel_size)
    plot: Optional[str] = plot_row_fill(report, args.plot) if args.plot else None
    if args.json:
        print(json.dumps({**report.as_json(), "plot": plot}))
    else:
        print(report.format())
        if plot:
            print(f"  row fill histogram -> {plot}")
    return 0
