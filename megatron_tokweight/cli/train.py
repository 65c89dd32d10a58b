"""`tokweight train --config FILE.yaml`: token-weighted training of a small GPTModel on CPU
(`megatron_tokweight.trainer`)."""
import argparse
import json
import sys
from dataclasses import asdict

from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.loop import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="training config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, dotted for sections (e.g. optimizer.lr=1e-3); repeatable")
    parser.add_argument("--steps", type=int, default=None, help="override steps")
    parser.add_argument("--tp", type=int, default=None, help="override tensor_parallel_size")
    parser.add_argument("--dp", type=int, default=None, help="override data_parallel_size")
    parser.add_argument("--seed", type=int, default=None, help="override seed")
    parser.add_argument("--save-dir", default=None, help="override save_dir")
    parser.add_argument("--resume", action="store_true", help="continue from save_dir's latest checkpoint")
    parser.add_argument("--exit-interval", type=int, default=None, help="stop after this step (saving first)")
    parser.add_argument("--summary", default=None, metavar="FILE.json", help="write the run's losses here")


def config_from_args(args) -> TrainConfig:
    overrides = list(args.set)
    for flag, key in (("steps", "steps"), ("tp", "tensor_parallel_size"), ("dp", "data_parallel_size"),
                      ("seed", "seed"), ("save_dir", "save_dir"), ("exit_interval", "exit_interval")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        overrides.append("resume=true")
    return TrainConfig.from_file(args.config, overrides)


def run(args) -> int:
    config = config_from_args(args)
    result = run_training(config)
    if args.summary:
        summary = {
            "start_step": result.start_step,
            "tokens_per_s": result.tokens_per_s,
            "steps": [asdict(s) for s in result.steps],
            "evals": result.evals,
        }
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"trained steps {result.start_step + 1}-{result.start_step + len(result.steps)} "
          f"at {result.tokens_per_s:,.0f} tokens/s", file=sys.stderr)
    if result.steps_without_targets:
        print(f"{result.steps_without_targets} of {len(result.steps)} steps had no loss token in their rows "
              "and trained nothing", file=sys.stderr)
    return 0
