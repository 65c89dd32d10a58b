"""`tokweight demo`: the main job, uniform vs molmo2-weighted training on an embedded corpus
(`trainer.demo`)."""
from megatron_tokweight.trainer.demo import DemoOptions, format_summary, run_demo


def add_arguments(parser) -> None:
    defaults = DemoOptions()
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="keep the corpus, prepared data, summary.json and loss_curves.png here")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per run")
    parser.add_argument("--tp", type=int, default=defaults.tp, help="tensor-parallel size (gloo processes)")
    parser.add_argument("--seq-length", type=int, default=defaults.seq_length, help="packed row length")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="corpus, init and data-order seed")
    for name in ("num_train", "num_eval", "num_micro_batches", "hidden_size", "num_layers"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=argparse_help(name))
    parser.add_argument("--quiet", action="store_true", help="print the final table only")


def argparse_help(name: str) -> str:
    return {
        "num_train": "training samples in the generated corpus",
        "num_eval": "held-out samples",
        "num_micro_batches": "micro-batches (of one packed row) per step",
        "hidden_size": "model width",
        "num_layers": "transformer layers",
    }[name]


def run(args) -> int:
    options = DemoOptions(
        out=args.out, steps=args.steps, tp=args.tp, seq_length=args.seq_length, seed=args.seed,
        num_train=args.num_train, num_eval=args.num_eval, num_micro_batches=args.num_micro_batches,
        hidden_size=args.hidden_size, num_layers=args.num_layers, quiet=args.quiet,
    )
    summary = run_demo(options)
    if args.quiet:
        print(format_summary(summary))
    return 0
