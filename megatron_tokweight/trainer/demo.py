"""The main job (`tokweight demo`): uniform vs Molmo2-weighted training on an embedded multi-task corpus.

1. `demo_corpus` generates a deterministic corpus (captions of ~300 tokens, pointing answers of
   ~70, one-letter multiple choice, short answers of ~10) and a held-out set;
2. the real `prepare` code tokenizes both (byte tokenizer) into Megatron IndexedDatasets + sidecars;
3. the real training loop (`train.train_on_rank`: `PackedDataset` through Megatron's builder,
   THD packed attention, the weighted loss through `schedule`) trains a small GPTModel twice on
   CPU with tensor parallelism over gloo, in processes this command spawns: once with the
   `uniform` preset (every target 1.0, per-token mean) and once with `molmo2` (captions 0.1,
   pointing 0.2, others 4/sqrt(n), normalized by the weight sum); same seed, same rows in the
   same order;
4. it prints per-task held-out losses (unweighted mean per task) and weight shares, and under
   --out writes summary.json and loss_curves.png.

Under `molmo2` the one-letter multiple-choice task holds ~10% of the loss weight instead of
~1% of the tokens, and its held-out loss ends far lower; the long captions pay for it.
"""
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from megatron_tokweight.errors import ConfigError

RUNS = (("uniform", "uniform"), ("weighted", "molmo2"))  # (run name, weighting preset)
ONE_TOKEN_TASK = "multiple_choice"


@dataclass
class DemoOptions:
    out: Optional[str] = None
    steps: int = 300
    tp: int = 2
    seq_length: int = 512
    seed: int = 1234
    num_train: int = 2400
    num_eval: int = 240
    micro_batch_size: int = 1
    num_micro_batches: int = 4
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    lr: float = 3e-3
    eval_points: int = 6  # held-out evaluations per run (plus step 0), for the curves
    quiet: bool = False

    def __post_init__(self):
        for name in ("steps", "tp", "num_train", "num_eval", "micro_batch_size", "num_micro_batches",
                     "hidden_size", "num_layers", "num_attention_heads", "eval_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.seq_length < 64:
            raise ConfigError(f"--seq-length must be >= 64 (a caption sample is ~400 tokens), got {self.seq_length}")


def train_config(options: DemoOptions, data_dir: str, preset: str):
    from megatron_tokweight.trainer.config import TrainConfig

    return TrainConfig.from_dict({
        "data": {
            "prefixes": [os.path.join(data_dir, "train")],
            "eval_prefixes": [os.path.join(data_dir, "eval")],
            "seq_length": options.seq_length,
            # the corpus's captions fit the default rows; shorter rows keep their first tokens
            "overlong": "truncate",
        },
        "model": {
            "num_layers": options.num_layers,
            "hidden_size": options.hidden_size,
            "num_attention_heads": options.num_attention_heads,
        },
        "weighting": preset,
        "optimizer": {"lr": options.lr, "min_lr": options.lr / 10,
                      "warmup_steps": min(20, max(1, options.steps // 10))},
        "steps": options.steps,
        "micro_batch_size": options.micro_batch_size,
        "num_micro_batches": options.num_micro_batches,
        "tensor_parallel_size": options.tp,
        "seed": options.seed,
        "log_interval": max(1, options.steps // 10),
        "eval_interval": max(1, options.steps // options.eval_points),
    }, where=f"demo ({preset})")


def prepare_data(options: DemoOptions, work_dir: str) -> Dict[str, Any]:
    """Generate the corpus and prepare it; returns the corpus description."""
    from megatron_tokweight.data.prepare import prepare_jsonl
    from megatron_tokweight.data.sources.demo_corpus import (
        CorpusConfig,
        describe,
        iter_records,
        write_corpus,
    )

    corpus = CorpusConfig(num_train=options.num_train, num_eval=options.num_eval, seed=options.seed)
    paths = write_corpus(os.path.join(work_dir, "corpus"), corpus)
    reports = {split: prepare_jsonl(path, os.path.join(work_dir, "data", split)) for split, path in paths.items()}
    train = reports["train"]
    return {
        "num_train": options.num_train,
        "num_eval": options.num_eval,
        "tasks": describe(list(iter_records(options.num_train, options.seed))),
        "answer_tokens": {name: stats.answer_tokens for name, stats in train.tasks.items()},
        "train_tokens": train.num_tokens,
    }


def weight_shares(config) -> Dict[str, Dict[str, float]]:
    """Per task of the training split: its share of loss tokens and of the total weight."""
    import numpy as np

    from megatron_tokweight.trainer.plan import build_datasets
    from megatron_tokweight.weighting import weight_share_by_task

    dataset = build_datasets(config)[0]  # cached indices: cheap
    side = dataset.sidecar
    samples = np.asarray(dataset.indices)
    weights = dataset.sample_weights
    weights = np.ones(len(samples)) if weights is None else np.asarray(weights)[samples]
    rows = weight_share_by_task(side.task_names, np.asarray(side.task_id)[samples],
                                np.asarray(dataset.n_trained)[samples], weights)
    return {r.task: {"token_share": r.token_share, "weight_share": r.weight_share,
                     "sample_weight_mean": r.total_weight / r.loss_tokens if r.loss_tokens else 0.0}
            for r in rows}


def _demo_rank(rank, world_size, plans, quiet):
    from megatron_tokweight.trainer.loop import train_on_rank
    from megatron_tokweight.trainer.micro_batches import make_groups

    groups = make_groups(rank, world_size, 1)
    results = {}
    for name, plan in plans:
        config = plan.config
        t0 = time.perf_counter()

        def on_step(record, name=name, config=config, t0=t0):
            if rank == 0 and not quiet and (record.step % config.log_interval == 0 or record.step == config.steps):
                elapsed = time.perf_counter() - t0
                eta = elapsed / record.step * (config.steps - record.step)
                r = record.reports
                print(f"[{name:8s}] step {record.step:4d}/{config.steps} | train loss {r['lm loss']:.3f} "
                      f"(weighted {r['weighted loss']:.3f}) | {record.real_tokens / record.seconds:,.0f} tok/s "
                      f"| {elapsed:5.0f} s, ~{eta:.0f} s left", flush=True)

        def on_eval(step, prefix, losses, name=name):
            if rank == 0 and not quiet:
                body = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "lm loss")
                print(f"[{name:8s}] held-out @ {step}: {body}", flush=True)

        results[name] = train_on_rank(plan, rank, groups, on_step, on_eval)
    return results if rank == 0 else None


def summarize(results, shares, corpus, options, seconds) -> Dict[str, Any]:
    runs = {}
    for name, preset in RUNS:
        result = results[name]
        final = result.evals[-1]["losses"]
        runs[name] = {
            "preset": preset,
            "final_loss": {k: v for k, v in final.items() if k != "lm loss"},
            "final_loss_all_tasks": final["lm loss"],
            "weight_share": {task: s["weight_share"] for task, s in shares[name].items()},
            "token_share": {task: s["token_share"] for task, s in shares[name].items()},
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": result.train_seconds,
            "steps": len(result.steps),
            "eval_curve": [{"step": e["step"], "losses": e["losses"]} for e in result.evals],
            "train_curve": [
                {"step": s.step, "lm_loss": s.reports["lm loss"], "weighted_loss": s.reports["weighted loss"]}
                for s in result.steps
            ],
        }
    one_token = {name: runs[name]["final_loss"].get(ONE_TOKEN_TASK) for name, _ in RUNS}
    return {
        "runs": runs,
        "corpus": corpus,
        "options": {k: v for k, v in vars(options).items() if k not in ("out", "quiet")},
        "one_token_task": ONE_TOKEN_TASK,
        "one_token_lower_with_weighting": (
            None if None in one_token.values() else one_token["weighted"] < one_token["uniform"]
        ),
        "wall_seconds": seconds,
    }


def _tasks(run) -> list:
    from megatron_tokweight.data.sources.demo_corpus import TASKS

    names = list(run["final_loss"])
    return [t for t in TASKS if t in names] + [t for t in names if t not in TASKS]


def format_summary(summary) -> str:
    uniform, weighted = summary["runs"]["uniform"], summary["runs"]["weighted"]
    tasks = _tasks(uniform)
    header = f"{'task':17s} {'token share':>11s} {'weight share':>12s} {'held-out loss':>24s}"
    sub = f"{'':17s} {'':>11s} {'(molmo2)':>12s} {'uniform':>11s} {'weighted':>12s}"
    lines = [header, sub, "-" * len(header)]
    for task in tasks:
        lines.append(
            f"{task:17s} {100 * uniform['token_share'][task]:10.1f}% {100 * weighted['weight_share'][task]:11.1f}% "
            f"{uniform['final_loss'][task]:11.4f} {weighted['final_loss'][task]:12.4f}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'all targets':17s} {'':>11s} {'':>12s} {uniform['final_loss_all_tasks']:11.4f} "
                 f"{weighted['final_loss_all_tasks']:12.4f}")
    lines.append(f"throughput: uniform {uniform['tokens_per_s']:,.0f} tok/s, weighted {weighted['tokens_per_s']:,.0f} "
                 f"tok/s; wall time {summary['wall_seconds']:.0f} s")
    verdict = summary["one_token_lower_with_weighting"]
    task = summary["one_token_task"]
    if verdict is not None:
        ratio = uniform["final_loss"][task] / max(weighted["final_loss"][task], 1e-12)
        lines.append(f"{task} (one answer token): held-out loss {'LOWER' if verdict else 'NOT lower'} with "
                     f"weighting ({weighted['final_loss'][task]:.4f} vs {uniform['final_loss'][task]:.4f}, {ratio:.1f}x)")
    return "\n".join(lines)


def plot_curves(summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    tasks = _tasks(runs["uniform"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, style in (("uniform", "--"), ("weighted", "-")):
            curve = [(e["step"], e["losses"][task]) for e in runs[name]["eval_curve"] if task in e["losses"]]
            ax.plot([s for s, _ in curve], [v for _, v in curve], style, marker="o", markersize=3,
                    label=name if name == runs[name]["preset"] else f"{name} ({runs[name]['preset']})")
        ax.set_title(f"{task}\nweight share {100 * runs['weighted']['weight_share'][task]:.0f}% "
                     f"(tokens {100 * runs['uniform']['token_share'][task]:.0f}%)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (per-task mean)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(options: DemoOptions) -> Dict[str, Any]:
    from megatron_tokweight.data.tokenizer import ByteTokenizer
    from megatron_tokweight.trainer.plan import plan_run
    from megatron_tokweight.trainer.spawn import spawn

    t0 = time.perf_counter()
    say = (lambda *a: None) if options.quiet else (lambda *a: print(*a, flush=True))
    # the model shape against the TP size, before any data is generated
    train_config(options, "unused", "uniform").model_config(ByteTokenizer().vocab_size)
    with tempfile.TemporaryDirectory(prefix="tokweight-demo-") as tmp:
        work = options.out if options.out else tmp
        os.makedirs(work, exist_ok=True)
        say(f"generating and preparing the demo corpus under {work} ...")
        corpus = prepare_data(options, work)
        for task, stats in sorted(corpus["tasks"].items()):
            say(f"  {task:17s} {stats['samples']:5d} samples, answers of ~{stats['mean_answer_chars']:.0f} tokens")
        plans, shares = [], {}
        for name, preset in RUNS:
            config = train_config(options, os.path.join(work, "data"), preset)
            plans.append((name, plan_run(config)))
            shares[name] = weight_shares(config)
        say(f"training twice ({options.steps} steps each, TP={options.tp} over gloo, "
            f"{options.num_micro_batches * options.micro_batch_size} rows of {options.seq_length} tokens per step)")
        results = spawn(_demo_rank, options.tp, plans, options.quiet)[0]
        summary = summarize(results, shares, corpus, options, time.perf_counter() - t0)
        if options.out:
            with open(os.path.join(options.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_curves(summary, os.path.join(options.out, "loss_curves.png"))
    say("")
    say(format_summary(summary))
    if options.out:
        say(f"wrote {os.path.join(options.out, 'summary.json')} and {os.path.join(options.out, 'loss_curves.png')}")
    return summary
