"""`tokweight inspect PREFIX --seq-length L`: packed rows as training sees them.

Opens PREFIX's `PackedDataset` as `tokweight train` does (same packing options, seed and
weighting) and shows rows of it (`data.row_view`): each sample's task, n (targets as trained)
and weight, its decoded tokens with the prompt in grey and every trained target on a heat-map
colour of its weight (`rich` in the terminal), the padding. `--html FILE` writes the same as one
self-contained page (`cli.inspect_html`); hovering a token there shows its position, id and
weight. Colours and titles: `cli.row_style`. Row i is the i-th row training reads (first epoch).
"""
import os
import sys

from megatron_tokweight.cli.pack import add_packing_arguments
from megatron_tokweight.cli.row_style import (
    TERMINAL_PROMPT_COLOR,
    heat_rgb,
    ink_rgb,
    padding_title,
    row_title,
    segment_title,
    shown,
    top_weight,
)
from megatron_tokweight.errors import ConfigError
from megatron_tokweight.trainer.config import TrainConfig


def add_arguments(parser) -> None:
    parser.add_argument("prefix", help="dataset prefix written by `tokweight prepare` (PREFIX.bin/.idx/.tokweight)")
    add_packing_arguments(parser)
    parser.add_argument("--rows", default="0", metavar="A:B",
                        help="rows to show, in training order: I, A:B (A..B-1), A: or :B (default: 0)")
    parser.add_argument("--weighting", default=None, metavar="PRESET|FILE",
                        help="as train's weighting section: a preset (molmo2, molmo2-released, uniform) or a "
                             "YAML/JSON WeightingConfig file (default: none, every target weighs 1.0)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed,
                        help=f"packing and row-order seed, train's `seed` (default: {TrainConfig.seed})")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="pack index cache, train's data.cache_dir (default: PREFIX's directory/cache)")
    parser.add_argument("--html", default=None, metavar="FILE", help="also write the rows as an HTML page here")
    parser.add_argument("--table", action="store_true",
                        help="one line per position instead of running text: position id, token, label, "
                             "loss_mask and loss_weights exactly as the row holds them")
    parser.add_argument("--width", type=int, default=None, help="terminal width (default: the terminal's)")


def weighting_option(value):
    """--weighting: None, a file (YAML/JSON) or a preset name -> what PackedDatasetConfig takes."""
    from megatron_tokweight.weighting.config import (
        WeightingConfig,
        as_weighting_config,
    )

    if value is None:
        return None
    if os.path.isfile(value) or value.endswith((".yaml", ".yml", ".json")):
        return WeightingConfig.from_file(value)
    return as_weighting_config(value)


def settings_line(args, dataset) -> str:
    weighting = args.weighting or "none (every target 1.0)"
    return (f"{args.prefix}: seq_length {args.seq_length}, {args.algorithm}, overlong {args.overlong}, "
            f"CP {args.context_parallel_size}, seed {args.seed}, weighting {weighting}; {len(dataset):,} rows")


def _rgb(c):
    from rich.color import Color

    return Color.from_rgb(*c)


def _position_table(view, segment, top: float, prompt):
    """Every position of `segment` (CP padding included) as the row's arrays hold it; the label's
    text on its weight's colour where it is trained."""
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    a, stop = view.arrays, segment.start + segment.real
    table = Table("pos", "pos id", "token", "text", "label", "label text", "loss_mask", "loss_weight",
                  box=None, pad_edge=False, header_style="bold")
    for p in range(segment.start, segment.end):
        label_text = shown(view.texts[p + 1], inline=True) if p + 1 < stop else ""
        style = prompt
        if a["loss_mask"][p] > 0:
            back = heat_rgb(float(a["loss_weights"][p]), top)
            style = Style(bgcolor=_rgb(back), color=_rgb(ink_rgb(back)))
        table.add_row(str(p), str(int(a["position_ids"][p])), str(int(a["tokens"][p])),
                      shown(view.texts[p], inline=True) if p < stop else "(CP pad)", str(int(a["labels"][p])),
                      Text(label_text, style=style), f"{a['loss_mask'][p]:g}", f"{a['loss_weights'][p]:.4g}")
    return table


def print_rows(console, views, settings: str, table: bool = False) -> None:
    """The rows on a rich Console: a legend, then per row its samples' headers and tokens (or,
    with `table`, one line per position)."""
    from rich.style import Style
    from rich.text import Text

    rgb = _rgb
    top = top_weight(views)
    prompt = Style(color=rgb(TERMINAL_PROMPT_COLOR))
    legend = Text(settings + "\n", style="bold")
    legend.append("prompt (not trained)", style=prompt)
    legend.append("   trained, by weight: ")
    for k in range(5):
        weight = top * k / 4
        legend.append(f" {weight:.3g} ", style=Style(bgcolor=rgb(heat_rgb(weight, top)),
                                                     color=rgb(ink_rgb(heat_rgb(weight, top)))))
    console.print(legend)
    for view in views:
        console.rule(row_title(view), style="cyan")
        for segment in view.segments:
            if segment.is_padding:
                console.print(Text(f"[{padding_title(segment)}]", style="dim italic"))
                continue
            console.print(Text(segment_title(segment), style="bold cyan"))
            if table:
                console.print(_position_table(view, segment, top, prompt))
                continue
            text = Text()
            for p in range(segment.start, segment.start + segment.real):
                if view.target[p]:
                    back = heat_rgb(float(view.target_weight[p]), top)
                    text.append(shown(view.texts[p]), style=Style(bgcolor=rgb(back), color=rgb(ink_rgb(back))))
                else:
                    text.append(shown(view.texts[p]), style=prompt)
            console.print(text)


def run(args) -> int:
    from rich.console import Console

    from megatron_tokweight.cli.inspect_html import write_html
    from megatron_tokweight.data.packing import check_pack_options
    from megatron_tokweight.data.row_view import (
        open_packed_prefix,
        parse_rows,
        row_views,
    )
    from megatron_tokweight.data.tokenizer import load_tokenizer

    if args.context_parallel_size < 1:
        raise ConfigError(f"--context-parallel-size must be an integer >= 1, got {args.context_parallel_size}")
    check_pack_options(args.seq_length, args.algorithm, args.overlong,
                       2 * args.context_parallel_size if args.context_parallel_size > 1 else 1)
    rows = parse_rows(args.rows)
    dataset = open_packed_prefix(args.prefix, args.seq_length, args.algorithm, args.overlong,
                                 args.context_parallel_size, weighting_option(args.weighting), args.seed,
                                 args.cache_dir)
    views = row_views(dataset, rows, load_tokenizer(dataset.sidecar.tokenizer))
    settings = settings_line(args, dataset)
    print_rows(Console(width=args.width, highlight=False), views, settings, table=args.table)
    if args.html:
        print(f"-> {write_html(args.html, views, settings)}", file=sys.stderr)
    return 0
