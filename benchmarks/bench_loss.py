"""Benchmark: the token-weighted loss vs Megatron's unweighted loss, side by side in one run.

Same shapes for both (default 8,192 tokens = 2 rows x 4,096, vocabulary 32,000, hidden 64), at
TP = 1 and TP = 2 (gloo ranks via `megatron_tokweight.trainer.spawn.spawn`, Megatron's parallel
state initialised with that TP size):

- `megatron`: Megatron's `tensor_parallel.vocab_parallel_cross_entropy` + a stock-style loss
  function (`stock_loss_func`: masked sum, int token count, `lm loss` report);
- `ours`: `global_batch_stats` (the step's one all-reduce, here over a DP x CP group of one) +
  `per_token_cross_entropy` (validation + the same Megatron function) + `make_loss_func`
  (weights, exact-L scaling, per-task and per-dataset reports for 2 + 2 groups: the default
  `report="full"`);
- `ours_objective`: the same with `report="objective"`: the report holds only the objective L
  as one fp32 [sum, count] pair, the size of Megatron's stock `lm loss` report. This is the
  like-for-like comparison with the stock loss function, which reports one pair; `ours` shows
  what the per-task / per-dataset reports add.

Both run through `megatron_tokweight.trainer.forward_backward.forward_backward` (M = 1, Megatron's
`forward_step_calc_loss`), forward and backward, in three scopes:

- `loss_func`: from a ready per-token loss [b, s] to its gradient: only the loss functions (and
  our `global_batch_stats`), i.e. the absolute overhead of ours;
- `loss`: from ready vocab-parallel logits (a fresh fp32 copy per run, made outside the timer)
  to their gradient: cross-entropy plus loss function;
- `output_layer+loss`: also the logits matmul [s, b, h] x [h, v/tp] and its backward.

Time: repetitions interleaved (the order alternates every repetition), each timed on every rank
after a barrier: wall time of the slowest rank, and CPU time (`time.process_time`, all threads)
summed over the ranks. Medians and their ratios ours / megatron (target <= 1.05). In the `loss`
scope the logits are a leaf, so autograd would copy their gradient (the size of the logits) into
a new `.grad`, page-faulting ~1 GB per run on this machine: the same work in every variant and
the noisiest part of the run. Timed runs therefore give the leaf a ready zero `.grad` to
accumulate into (what Megatron's DDP does with its `main_grad` buffers); profiled runs do not.
On a shared,
loaded machine the wall time of identical runs varies by 2-3x; the CPU time is the steadier
measure of the work done, and the load average is written to the results.

Memory: one extra run per variant under `torch.profiler` with `profile_memory=True`, which records
every CPU allocation and free with its size; the peak is the largest running sum of those sizes
in time order, i.e. the peak of live bytes allocated inside the run (tensors made before it, e.g.
the ready logits of the `loss` scope, are not counted; in `output_layer+loss` the logits are). Largest rank. Ratio ours /
megatron (target <= 1.0). Profiled runs are not timed. `report_bytes` gives the bytes of the
report each variant returns: it is made before the backward and kept through it (Megatron's
`forward_data_store`), so it is live at the backward's peak in all variants; Megatron's and
`ours_objective`'s are one fp32 pair, `ours`'s 2 + 4 x (tasks + datasets) float64 pairs.

`--quick` (3 repetitions, TP = 1) is for iterating; the full run is the measurement.

Results: printed and written to benchmarks/results/bench_loss.json.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loss.json"
TASKS, DATASETS = ("caption", "qa"), ("mix_a", "mix_b")
SCOPES = ("loss_func", "loss", "output_layer+loss")
OURS = {"ours": "full", "ours_objective": "objective"}  # variant -> LossSettings.report


def _row_batch(rows, seq, vocab, seed):
    """Packed-like rows [rows, seq]: samples of 64-512 tokens, a prompt (weight 0) then answer
    tokens weighted 2 / sqrt(n), tail padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, seq)
    weights = torch.zeros(rows, seq)
    task_ids = torch.full((rows, seq), -1, dtype=torch.int64)
    num_samples = []
    for row in range(rows):
        start, count = 0, 0
        while start < seq - 64:
            length = min(int(torch.randint(64, 513, (1,), generator=g)), seq - start)
            prompt = length // 3
            task = int(torch.randint(0, len(TASKS), (1,), generator=g))
            answer = slice(start + prompt, start + length - 1)
            mask[row, answer] = 1.0
            weights[row, answer] = 2.0 / math.sqrt(answer.stop - answer.start)
            task_ids[row, start : start + length] = task
            start, count = start + length, count + 1
        num_samples.append(count)
    return {
        "labels": torch.randint(0, vocab, (rows, seq), generator=g),
        "loss_mask": mask,
        "loss_weights": weights,
        "task_ids": task_ids,
        "dataset_id": torch.arange(rows) % len(DATASETS),
        "num_samples": torch.tensor(num_samples),
    }


def _step(per_token_of, loss_func_of, data_iterator, model):
    micro_batch = next(data_iterator)
    return per_token_of(micro_batch), loss_func_of(micro_batch)


def _peak_bytes(fn):
    """Peak of live bytes allocated inside fn (CPU allocator memory events under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # prefix sum of the allocation (+) and free (-) sizes in time order: live bytes allocated in
    # the run ("Total Allocated" is not reset between profiler sessions, so it is not used)
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for event in memory:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def _rank(rank, world_size, cfg):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tokweight.loss import (
        LossSettings,
        cross_entropy_path,
        make_loss_func,
        per_token_cross_entropy,
        reduce_reports,
        stock_loss_func,
    )
    from megatron_tokweight.trainer.forward_backward import (
        ScheduleConfig,
        forward_backward,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size, create_gloo_process_groups=False)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rows, seq, vocab, hidden = cfg["rows"], cfg["seq"], cfg["vocab"], cfg["hidden"]
    shard = vocab // world_size
    g = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(seq, rows, hidden, generator=g)
    weight_full = torch.randn(vocab, hidden, generator=g) * (3.0 / math.sqrt(hidden))
    weight = torch.nn.Parameter(weight_full[rank * shard : (rank + 1) * shard].clone())
    batch = _row_batch(rows, seq, vocab, seed=1)
    batch["labels_sb"] = batch["labels"].t().contiguous()  # [s, b], as GPTModel hands them to the loss
    with torch.no_grad():
        ready_logits = torch.matmul(hidden_states, weight.t())
        ready_per_token = vocab_parallel_cross_entropy(ready_logits.clone(), batch["labels_sb"]).t().contiguous()
    settings = {variant: LossSettings("weight_sum", 1, 1, False, task_names=TASKS, dataset_names=DATASETS, report=level)
                for variant, level in OURS.items()}
    config = ScheduleConfig(calculate_per_token_loss=False)
    model = torch.nn.Module()

    def run(variant, scope, state):
        ours = variant in OURS
        cross_entropy = partial(per_token_cross_entropy, tp_group=tp_group) if ours else vocab_parallel_cross_entropy
        if scope == "loss_func":
            per_token_of = lambda mb: state["per_token"]  # noqa: E731
        elif scope == "loss":
            per_token_of = lambda mb: cross_entropy(state["logits"], mb["labels_sb"]).t()  # noqa: E731
        else:
            per_token_of = lambda mb: cross_entropy(torch.matmul(state["h"], weight.t()), mb["labels_sb"]).t()  # noqa: E731
        if ours:
            stats = settings[variant].global_batch_stats([batch], None)
            loss_func_of = lambda mb: make_loss_func(mb, stats, settings[variant])  # noqa: E731
        else:
            loss_func_of = lambda mb: partial(stock_loss_func, mb["loss_mask"])  # noqa: E731
        reports, _ = forward_backward(partial(_step, per_token_of, loss_func_of), iter([batch]), model, 1, config, None, finalize=False)
        return reports

    def fresh(scope, timed=False):
        weight.grad = None
        if scope == "loss_func":
            return {"per_token": ready_per_token.clone().requires_grad_()}
        if scope == "loss":
            logits = ready_logits.clone().requires_grad_()
            if timed:  # accumulate into a ready buffer, as Megatron's DDP does into main_grad (docstring)
                logits.grad = torch.zeros_like(logits)
            return {"logits": logits}
        return {"h": hidden_states.clone().requires_grad_()}

    # correctness of what is timed: ours reports L = sum w l / sum w from the same per-token losses
    l = ready_per_token.double()
    expected = float((l * batch["loss_weights"]).sum() / batch["loss_weights"].sum())
    check = max(abs(reduce_reports(run(v, "loss", fresh("loss")), None)["weighted loss"] - expected) / expected for v in OURS)

    variants = ("megatron", *OURS)
    times = {(v, s): [] for v in variants for s in cfg["scopes"]}
    cpu_times = {(v, s): [] for v in variants for s in cfg["scopes"]}
    for rep in range(cfg["warmup"] + cfg["reps"]):
        for scope in cfg["scopes"]:
            for variant in variants[rep % len(variants):] + variants[: rep % len(variants)]:  # rotate the order
                state = fresh(scope, timed=True)
                dist.barrier(group=tp_group)
                start, start_cpu = time.perf_counter(), time.process_time()
                run(variant, scope, state)
                wall = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                cpu = torch.tensor(time.process_time() - start_cpu, dtype=torch.float64)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=tp_group)  # the slowest rank
                dist.all_reduce(cpu, op=dist.ReduceOp.SUM, group=tp_group)  # all ranks' CPU work
                if rep >= cfg["warmup"]:
                    times[(variant, scope)].append(float(wall))
                    cpu_times[(variant, scope)].append(float(cpu))
                del state
    peaks = {}
    for scope in cfg["scopes"]:
        for variant in variants:
            state = fresh(scope)
            dist.barrier(group=tp_group)
            peak = torch.tensor(_peak_bytes(partial(run, variant, scope, state)), dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
            peaks[(variant, scope)] = float(peak)
            del state
    report_bytes = {}
    for variant in variants:
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for r in run(variant, "loss_func", fresh("loss_func")) for v in r.values()}
        report_bytes[variant] = sum(storages.values())
    return {
        "path": cross_entropy_path(tp_group),
        "report_bytes": report_bytes,
        "check_rel_err": check,
        "times": {f"{v}|{s}": t for (v, s), t in times.items()},
        "cpu_times": {f"{v}|{s}": t for (v, s), t in cpu_times.items()},
        "peaks": {f"{v}|{s}": p for (v, s), p in peaks.items()},
        "loss_tokens": int(batch["loss_mask"].sum()),
        "threads": torch.get_num_threads(),
    }


def _compare(rank0, tp, scope, ours):
    """One variant of ours against megatron in one scope: median times and their ratios, the
    median of the per-repetition (paired) ratios, peaks."""
    def series(kind, variant):
        return rank0[kind][f"{variant}|{scope}"]

    med = {kind: {v: statistics.median(series(kind, v)) for v in ("megatron", ours)} for kind in ("times", "cpu_times")}
    # each repetition runs the variants back to back: the median of the per-repetition ratios
    # cancels slow drifts of the machine's load
    paired = {kind: statistics.median(o / m for o, m in zip(series(kind, ours), series(kind, "megatron"))) for kind in med}
    p_meg, p_ours = (rank0["peaks"][f"{v}|{scope}"] for v in ("megatron", ours))
    return {
        "tp": tp, "scope": scope, "variant": ours, "report": OURS[ours],
        "cross_entropy_path": rank0["path"], "threads_per_rank": rank0["threads"],
        "median_wall_s": med["times"], "wall_ratio": med["times"][ours] / med["times"]["megatron"],
        "median_cpu_s": med["cpu_times"], "cpu_ratio": med["cpu_times"][ours] / med["cpu_times"]["megatron"],
        "paired_wall_ratio": paired["times"], "paired_cpu_ratio": paired["cpu_times"],
        "median_cpu_overhead_ms": (med["cpu_times"][ours] - med["cpu_times"]["megatron"]) * 1e3,
        "wall_s": {v: series("times", v) for v in ("megatron", ours)},
        "cpu_s": {v: series("cpu_times", v) for v in ("megatron", ours)},
        "peak_mib": {"megatron": p_meg / 2**20, ours: p_ours / 2**20}, "peak_ratio": p_ours / p_meg if p_meg else float("nan"),
        "peak_diff_bytes": p_ours - p_meg, "report_bytes": {v: rank0["report_bytes"][v] for v in ("megatron", ours)},
        "loss_check_rel_err": rank0["check_rel_err"], "loss_tokens": rank0["loss_tokens"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="3 repetitions at TP = 1 only, for iterating")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.tp = 3, [1]

    from megatron_tokweight.trainer.spawn import spawn

    cfg = {k: getattr(args, k) for k in ("rows", "seq", "vocab", "hidden", "reps", "warmup", "scopes")}
    results = {
        "config": dict(cfg, tokens=args.rows * args.seq, tp=args.tp),
        "targets": {"time_ratio": 1.05, "peak_ratio": 1.0},
        "load_average_at_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "runs": [],
    }
    for tp in args.tp:
        rank0 = spawn(_rank, tp, cfg)[0]
        for scope in args.scopes:
            for ours in OURS:
                run = _compare(rank0, tp, scope, ours)
                results["runs"].append(run)
                print(
                    f"TP={tp} {scope:17s} {ours:14s} wall ratio {run['wall_ratio']:.3f} (paired {run['paired_wall_ratio']:.3f}; "
                    f"{run['median_wall_s']['megatron'] * 1e3:.1f} vs {run['median_wall_s'][ours] * 1e3:.1f} ms) | "
                    f"cpu ratio {run['cpu_ratio']:.3f} (paired {run['paired_cpu_ratio']:.3f}) | "
                    f"peak ratio {run['peak_ratio']:.9f} ({run['peak_diff_bytes']:+.0f} B of {run['peak_mib']['megatron']:.1f} MiB; "
                    f"reports {rank0['report_bytes']['megatron']} vs {rank0['report_bytes'][ours]} B) "
                    f"| {rank0['path']} | L check {rank0['check_rel_err']:.0e}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
