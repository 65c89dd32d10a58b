"""Shared pieces of the effect benchmarks (bench_effect_mixture.py, bench_effect_longcontext.py).

Every training run is an independent one-rank `tokweight train` job (TP = DP = 1) run by
`train_on_rank` inside a pool of worker processes, each holding its own one-rank gloo world and
one torch thread: on a small CPU model two single-threaded runs side by side use two cores far
better than one run with two threads.
"""
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker_init(threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    store_dir = tempfile.mkdtemp(prefix="tokweight-bench-gloo-")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(os.path.join(store_dir, "store"), 1))


def run_jobs(fn: Callable[[Any], Dict[str, Any]], jobs: Sequence[Any], workers: int, label=str) -> List[Dict[str, Any]]:
    """fn(job) for every job in `workers` processes (jobs started in the given order); results
    in job order. Prints one line per finished job."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    results: List[Any] = [None] * len(jobs)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(1,), maxtasksperchild=None) as pool:
        for done, (i, out) in enumerate(pool.imap_unordered(_indexed, [(fn, i, job) for i, job in enumerate(jobs)]), 1):
            results[i] = out
            print(f"  [{done:3d}/{len(jobs)}] {label(jobs[i])}: {out.get('summary', '')} "
                  f"({out.get('seconds', 0):.0f} s; {time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    return results


def _indexed(item):
    fn, i, job = item
    return i, fn(job)


def one_rank_groups():
    """The TP and DP groups of the worker's one-rank world."""
    from megatron_tokweight.trainer.micro_batches import make_groups

    return make_groups(0, 1, 1)


def trained_model(save_dir: str, vocab_size: int):
    """The model of `save_dir`'s latest checkpoint (eval mode), then the checkpoint is removed."""
    import torch.distributed as dist

    from megatron_tokweight.longcontext.scorer_offline import load_scorer, open_checkpoint

    model = load_scorer(open_checkpoint(save_dir), vocab_size, dist.new_group([0]), 0)
    shutil.rmtree(save_dir, ignore_errors=True)
    return model


def spread(values: Sequence[float]) -> Dict[str, float]:
    """mean, sample std (0 for one value), min, max and n of finite values."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: Dict[str, float], digits: int = 3, percent: bool = False) -> str:
    """"mean ± std [min, max]" of a `spread`."""
    if not s["n"]:
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    sign = "+" if percent else ""
    return (f"{s['mean'] * scale:{sign}.{digits}f}{unit} ± {s['std'] * scale:.{digits}f} "
            f"[{s['min'] * scale:{sign}.{digits}f}, {s['max'] * scale:{sign}.{digits}f}]")


def inside_spread(a: Dict[str, float], b: Dict[str, float]) -> bool:
    """Whether two seed spreads overlap (min/max ranges): then no difference is claimed."""
    return a["n"] > 0 and b["n"] > 0 and not (a["max"] < b["min"] or b["max"] < a["min"])


def write_results(out_dir: str, results: Dict[str, Any], table: str, wall: float, workers: int) -> None:
    """results.json and table.md (the table plus the run's wall time) under `out_dir`; prints the table."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + f"\n\nTotal wall time {wall:.0f} s ({workers} workers side by side).\n")
    print()
    print(table)
    print(f"\nwall time {wall:.0f} s; wrote {out_dir}/results.json, table.md")


def base_parser(doc: str, results_dir: str, seeds):
    """The options both effect benchmarks share."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (tiny sizes, one seed)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (one torch thread each)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--out", default=None, help=f"results directory (default {results_dir}; --quick: a temp dir)")
    parser.add_argument("--replot", metavar="DIR", help="rewrite table.md and the plot from DIR/results.json")
    budget = parser.add_argument_group("budget (every arm the same; default: the sizes in the script)")
    budget.add_argument("--steps", type=int, default=None)
    budget.add_argument("--rows-per-step", type=int, default=None)
    budget.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--arms", nargs="+", default=None, metavar="TEXT",
                        help="only the arms whose name contains one of these (uniform always runs)")
    return parser


def with_budget(sizes, args):
    """`sizes` (a Sizes dataclass) with --steps / --rows-per-step / --hidden-size applied."""
    import dataclasses

    changes = {name: getattr(args, name) for name in ("steps", "rows_per_step", "hidden_size")
               if getattr(args, name) is not None}
    for name, value in changes.items():
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return dataclasses.replace(sizes, **changes)


def select_arms(arm_list: List[Dict[str, Any]], patterns, always: str) -> List[Dict[str, Any]]:
    """The arms named by --arms (substrings), plus `always` (the baseline every table compares to)."""
    if not patterns:
        return arm_list
    unknown = [p for p in patterns if not any(p in arm["name"] for arm in arm_list)]
    if unknown:
        raise SystemExit(f"--arms {unknown} match no arm; the arms are: {[arm['name'] for arm in arm_list]}")
    return [arm for arm in arm_list if arm["name"] == always or any(p in arm["name"] for p in patterns)]


def replot(directory: str, write_outputs) -> None:
    """write_outputs(directory, meta, runs) from directory/results.json: a new table and plot
    without training again."""
    import json

    with open(os.path.join(directory, "results.json")) as f:
        saved = json.load(f)
    write_outputs(directory, saved["meta"], saved["runs"])


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_path() -> None:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def cpu_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{os.cpu_count()} CPUs, load average {load:.2f} at the start"
