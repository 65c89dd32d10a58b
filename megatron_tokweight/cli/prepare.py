"""`tokweight prepare`: JSONL -> Megatron IndexedDataset + sidecar (`data.prepare`)."""
import sys

from megatron_tokweight.data.prepare import prepare_jsonl
from megatron_tokweight.data.tokenizer import parse_specials


def add_arguments(parser) -> None:
    parser.add_argument("input", help="JSONL file: chat {messages}, {prompt, response} or {text} per line")
    parser.add_argument("-o", "--output", required=True, metavar="PREFIX",
                        help="output prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.tokweight/")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (built in), a Hugging Face tokenizer directory (conversations rendered with its "
                             "chat template) or PATH/tokenizer.json (the built-in template) (default: byte)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="Jinja chat template rendering conversations instead of the tokenizer's own; "
                             "'builtin' for the plugin's marker template")
    parser.add_argument("--end-of-turn", metavar="TOKEN",
                        help="token closing an assistant turn, trained with it (default: the tokenizer's eos_token)")
    parser.add_argument("--drop-non-text-parts", action="store_true",
                        help="drop content parts that are not text (images, audio), counted, instead of refusing the line")
    parser.add_argument("--special", action="append", default=[], metavar="NAME=TOKEN",
                        help="tokenizer.json special token for NAME (pad, eod, bos, system, user, assistant); repeatable")
    parser.add_argument("--task-field", default="task", help="field naming a line's task (default: task)")
    parser.add_argument("--default-task", default="default", help="task of lines without the task field (default: default)")
    parser.add_argument("--group-field", default="group",
                        help="field whose equal values mark annotations of one input (default: group)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes encoding lines in parallel; the output is the same byte for byte (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    report = prepare_jsonl(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        task_field=args.task_field,
        default_task=args.default_task,
        group_field=args.group_field,
        specials=parse_specials(args.special),
        progress=not args.quiet and sys.stderr.isatty(),
        chat_template=args.chat_template,
        end_of_turn=args.end_of_turn,
        drop_non_text_parts=args.drop_non_text_parts,
        workers=args.workers,
    )
    print(report.format())
    return 0
