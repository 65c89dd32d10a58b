"""The fused linear weighted cross-entropy against Megatron's path, side by side, forward + backward.

Megatron's path: `ColumnParallelLinear` (gather_output=False, the GPT output layer) then
`weighted_cross_entropy` (Megatron's `vocab_parallel_cross_entropy` steps) times w_t, summed,
backward. "megatron fused-ce": the same layer then Megatron's `fused_vocab_parallel_cross_entropy`
(`cross_entropy_loss_fusion`, torch.compile'd) times w_t, Megatron's fastest path without Transformer
Engine; it hands the logits' gradient back in bf16 whatever the model's dtype (its code casts it),
so in fp32 its gradients differ from the others by ~2e-3 relative (checked at V 4,096, TP 1 and
2). Fused: `fused_linear_weighted_cross_entropy` on the same hidden states and weight shard (on
CUDA also `implementation="triton"` where Triton imports).
Optionally (`--cce`) Apple's `cut-cross-entropy` (`linear_cross_entropy(reduction="none")` times
w_t; on CPU only its `torch_compile` implementation runs: its Triton kernel needs a GPU).

Memory on CUDA: the caching allocator's counters (peak allocated minus allocated before / after).
Memory on CPU, per rank, from the kernel's resident-set counters (no allocator statistics). So
that RSS follows the live tensors, every allocation of 64 KiB or more is its own mapping, returned
at free (glibc `mallopt(M_MMAP_THRESHOLD)`, set in each rank before any tensor), the heap is
trimmed before each run and VmHWM reset (`/proc/self/clear_refs`); then
- "loss scope": peak RSS during forward + backward minus RSS before (includes the weight and
  hidden gradients every path must return);
- "transient": peak minus RSS after the backward with those gradients alive (what the loss
  computation holds beyond its results: the logits, their gradient, chunk buffers).
Time: `--reps` rounds, each running every path (order alternating); the best time per path, and
the median over rounds of each run's time / Megatron's in the same round (the machine's speed
drifts). Ratios are fused / Megatron.

    python benchmarks/bench_fused_ce.py                 # V 152,064, s 4,096, h 1,024, TP 1 and 2, fp32
    python benchmarks/bench_fused_ce.py --sweep-tokens 1024   # plus the V sweep 32k..256k
    python benchmarks/bench_fused_ce.py --device cuda --dtype bf16 --tokens 8192 --hidden 4096 --tp 1
                                                        # the GPU target (one GPU: TP 1; NCCL for more)
Writes benchmarks/results/bench_fused_ce.json and .md (`--device cuda`: bench_fused_ce_cuda).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def track_allocations_in_rss() -> None:
    _libc().mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors leave the RSS


def measure(run, reset, device):
    """(seconds, loss-scope bytes, transient bytes) of one forward + backward."""
    import gc

    reset()  # the previous run's gradients go: each run allocates its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _libc().malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS counter (VmHWM)
        before = _status("VmRSS")
    start = time.perf_counter()
    keep = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak, after = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    else:
        seconds = time.perf_counter() - start
        peak, after = _status("VmHWM"), _status("VmRSS")
    del keep
    return seconds, peak - before, peak - after


def _paths(tokens, hidden_size, vocab, tp_group, with_cce, device, dtype, megatron_fused):
    """{name: run()} sharing one set of inputs; each run returns the gradients it produced."""
    from megatron.core import ModelParallelConfig
    from megatron.core.fusions.fused_cross_entropy import (
        fused_vocab_parallel_cross_entropy,
    )
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_tokweight.loss import (
        fused_linear_weighted_cross_entropy,
        weighted_cross_entropy,
    )

    tp, rank = tp_group.size(), tp_group.rank()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 1, hidden_size, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens, 1), generator=g).to(device)
    weights = torch.rand(tokens, 1, generator=g).to(device)
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False,
                                 params_dtype=dtype)
    layer = ColumnParallelLinear(hidden_size, vocab, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False, tp_group=tp_group).to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, hidden_size, generator=g)[rank * vocab // tp:(rank + 1) * vocab // tp] * 0.02)

    def reset():
        hidden.grad, layer.weight.grad = None, None

    def megatron():
        reset()
        logits, _ = layer(hidden)
        weighted_cross_entropy(logits, labels, weights, tp_group).sum().backward()
        return hidden.grad, layer.weight.grad

    def megatron_fused_ce():
        reset()
        logits, _ = layer(hidden)
        (fused_vocab_parallel_cross_entropy(logits, labels, tp_group) * weights).sum().backward()
        return hidden.grad, layer.weight.grad

    def fused(implementation):
        def run():
            reset()
            fused_linear_weighted_cross_entropy(hidden, layer.weight, labels, weights, tp_group,
                                                implementation=implementation).sum().backward()
            return hidden.grad, layer.weight.grad
        return run

    paths = {"megatron": megatron, "fused": fused("torch"), "reset": reset}
    if megatron_fused:
        paths["megatron fused-ce"] = megatron_fused_ce
    if device.type == "cuda" and _have_triton():
        paths["fused (triton)"] = fused("triton")
    if with_cce and tp == 1:
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            reset()
            loss = linear_cross_entropy(hidden[:, 0], layer.weight, labels[:, 0], reduction="none", impl="torch_compile")
            (loss * weights[:, 0]).sum().backward()
            return hidden.grad, layer.weight.grad

        paths["cut-cross-entropy (torch_compile)"] = cce
    return paths


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(tokens, hidden_size, vocab, tp_group, reps, options, device, dtype):
    paths = _paths(tokens, hidden_size, vocab, tp_group, options["cce"], device, dtype, options["megatron_fused_ce"])
    reset = paths.pop("reset")
    for run in paths.values():  # warm-up (torch.compile, first-touch page faults), not measured
        run()
    runs = {name: [] for name in paths}
    for rep in range(reps):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for name in order:
            runs[name].append(measure(paths[name], reset, device))
    out = {}
    for name, results in runs.items():
        seconds = [r[0] for r in results]
        # the machine's speed drifts between runs: each run against Megatron's of the same round
        paired = sorted(s / m[0] for s, m in zip(seconds, runs["megatron"]))
        out[name] = {"seconds": min(seconds), "all_seconds": seconds, "paired_ratio_median": paired[len(paired) // 2],
                     "loss_scope_bytes": max(r[1] for r in results), "transient_bytes": max(r[2] for r in results)}
    return out


def _rank(rank, world_size, cases, reps, options, device_type, dtype_name):
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        track_allocations_in_rss()
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
        device = torch.device("cpu")
    dtype = DTYPES[dtype_name]
    group = dist.new_group(list(range(world_size)))
    return [dict(case, tp=world_size, device=device_type, dtype=dtype_name,
                 results=run_case(case["tokens"], case["hidden"], case["vocab"], group, reps, options, device, dtype))
            for case in cases]


def run_tp(world_size, cases, reps, options, device_type, dtype_name):
    from megatron_tokweight.trainer.spawn import spawn

    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise SystemExit(f"--tp {world_size} needs {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    backend = "nccl" if device_type == "cuda" else "gloo"
    per_rank = spawn(_rank, world_size, cases, reps, options, device_type, dtype_name, backend=backend)
    out = []
    for i, case in enumerate(per_rank[0]):  # the worst rank per path
        merged = dict(case)
        merged["results"] = {name: {key: max((r[i]["results"][name][key] for r in per_rank), key=_worst)
                                    for key in values} for name, values in case["results"].items()}
        out.append(merged)
    return out


def _worst(value):
    return max(value) if isinstance(value, list) else value


def _processor(device_type: str) -> str:
    """The chip the times belong to (the ratios differ between CPU models: see the README)."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")


def _table(rows):
    """Ratios against Megatron's unfused path, and time against the fastest Megatron path measured."""
    lines = [("| V | tokens | h | TP | path | time s (best) | loss scope MiB | transient MiB | time ratio (best) | "
              "time ratio (median of rounds) | time ratio per round | time vs fastest Megatron path | scope ratio | "
              "transient ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = row["results"]["megatron"]
        fastest = min(r["seconds"] for name, r in row["results"].items() if name.startswith("megatron"))
        for name, r in row["results"].items():
            per_round = " / ".join(f"{t / m:.2f}" for t, m in zip(r["all_seconds"], base["all_seconds"]))
            lines.append(
                f"| {row['vocab']:,} | {row['tokens']:,} | {row['hidden']:,} | {row['tp']} | {name} | {r['seconds']:.2f} | "
                f"{r['loss_scope_bytes'] / 2**20:,.0f} | {r['transient_bytes'] / 2**20:,.0f} | "
                f"{r['seconds'] / base['seconds']:.3f} | {r['paired_ratio_median']:.3f} | {per_round} | {r['seconds'] / fastest:.3f} | "
                f"{r['loss_scope_bytes'] / max(base['loss_scope_bytes'], 1):.3f} | "
                f"{r['transient_bytes'] / max(base['transient_bytes'], 1):.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sweep-tokens", type=int, default=0,
                        help="also sweep V over 32k, 64k, 128k, 256k at this many tokens (0: no sweep)")
    parser.add_argument("--cce", action="store_true", help="include cut-cross-entropy (TP 1 only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="hidden states and weight")
    parser.add_argument("--megatron-fused-ce", action=argparse.BooleanOptionalAction, default=None,
                        help="also Megatron's fused_vocab_parallel_cross_entropy (default: on CUDA only; "
                             "on CPU it is a torch.compile of the same steps)")
    parser.add_argument("--out", default=None, help="results path without suffix (default: "
                        "benchmarks/results/bench_fused_ce, with --device cuda bench_fused_ce_cuda)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / ("bench_fused_ce" if args.device == "cpu" else "bench_fused_ce_cuda"))

    cases = [{"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden}]
    if args.sweep_tokens:
        cases += [{"vocab": v, "tokens": args.sweep_tokens, "hidden": args.hidden} for v in (32_768, 65_536, 131_072, 262_144)]
    fused_ce = args.device == "cuda" if args.megatron_fused_ce is None else args.megatron_fused_ce
    options = {"cce": args.cce, "megatron_fused_ce": fused_ce}
    rows = []
    started = time.time()
    for tp in args.tp:
        tp_cases = cases if tp == 1 else cases[:1]  # the sweep at TP 1
        rows += run_tp(tp, tp_cases, args.reps, options, args.device, args.dtype)
        print(_table(rows), flush=True)
    table = _table(rows)
    meta = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "processor": _processor(args.device), "device": args.device, "dtype": args.dtype,
            "seconds": time.time() - started, "argv": sys.argv[1:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(f"{table}\n\n{json.dumps(meta)}\n")
    print(f"\n{table}\n\nwrote {args.out}.json and .md ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
