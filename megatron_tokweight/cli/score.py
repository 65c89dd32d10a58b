"""`tokweight score PREFIX --scorer CHECKPOINT --short-context n --stride s [-o OUT]`.

Runs a `tokweight train` checkpoint (frozen) over a prepared dataset and writes per-token
log-probabilities with short (at most n tokens) and full context next to the `.bin` (see
`score_sidecar`). Every token beyond the first n of its training sequence is scored with
between n - stride + 1 and n tokens of context. The checkpoint runs at its own tensor-parallel
size (one process per TP rank); everything checkable is checked before any process starts.
"""
import os
import sys

from megatron_tokweight.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("prefix", help="prepared dataset prefix (PREFIX.bin/.idx + PREFIX.tokweight/)")
    parser.add_argument("--scorer", required=True, metavar="CHECKPOINT",
                        help="`tokweight train` save_dir (its latest step) or one step_* directory")
    parser.add_argument("--short-context", type=int, required=True, metavar="N",
                        help="tokens of context the short-context scorer sees at most")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="window advance, 1..N (default: 3N/4, as Helm et al.'s 8192/6144)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="training sequence length (default: the checkpoint's); samples are scored in "
                             "chunks of this length, as training packs them")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="output directory (default: PREFIX.tokweight/longcontext)")
    parser.add_argument("--tokens-per-batch", type=int, default=None,
                        help="tokens per scoring forward (default: 4 x seq length)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_stride(n: int) -> int:
    return max(1, (3 * n) // 4)


def _score_rank(rank, world_size, prefix, ckpt, vocab_size, options):
    import torch.distributed as dist

    from megatron_tokweight.longcontext.scorer_offline import load_scorer, score_dataset

    tp_group = dist.new_group(list(range(world_size)))
    model = load_scorer(ckpt, vocab_size, tp_group, rank)
    return score_dataset(
        prefix, model, model_vocab_size=vocab_size, model_seq_length=ckpt.seq_length,
        checkpoint=os.path.abspath(ckpt.path), tp_group=tp_group, write=rank == 0, **options,
    )


def run(args) -> int:
    from megatron_tokweight.data.indexed_validation import (
        validate_against_indexed_dataset,
    )
    from megatron_tokweight.longcontext.scorer_offline import (
        check_score_options,
        check_scorer_matches_data,
        open_checkpoint,
    )
    from megatron_tokweight.trainer.spawn import spawn

    prefix = os.fspath(args.prefix)
    stride = default_stride(args.short_context) if args.stride is None else args.stride
    ckpt = open_checkpoint(args.scorer)
    seq_length = ckpt.seq_length if args.seq_length is None else args.seq_length
    check_score_options(args.short_context, stride, seq_length, ckpt.seq_length)
    if args.tokens_per_batch is not None and args.tokens_per_batch < 1:
        raise ConfigError(f"--tokens-per-batch must be >= 1, got {args.tokens_per_batch}")
    side = validate_against_indexed_dataset(prefix)
    check_scorer_matches_data(ckpt, prefix, side.tokenizer)
    options = dict(short_context=args.short_context, stride=stride, seq_length=seq_length,
                   out_dir=args.output, tokens_per_batch=args.tokens_per_batch,
                   progress=not args.no_progress)
    report = spawn(_score_rank, ckpt.tp_size, prefix, ckpt, int(side.tokenizer["vocab_size"]), options)[0]
    print(
        f"scored {report.num_tokens:,} tokens of {report.num_samples:,} samples in {report.seconds:.2f} s "
        f"({report.tokens_per_second:,.0f} tokens/s; {report.forward_tokens:,} tokens through the model) "
        f"-> {report.out_dir}",
        file=sys.stderr,
    )
    if report.counts.get("clamped_to_float16"):
        print(f"  {report.counts['clamped_to_float16']} log-probabilities below the float16 range were clamped",
              file=sys.stderr)
    return 0
