"""pack_lengths on every integer dtype of the same lengths, side by side with int32.

Issue 12: int64 lengths (numpy's default dtype, and what `build_pack_index` hands over) packed
about 6x slower than the same lengths as int32, through an int64 C++ variant whose arrays doubled
the memory traffic. Every dtype now takes the one int32 packer. For each dtype and algorithm this
times `pack_lengths` on 10M lengths (bench_packing's mixture, L = 4096; for int8 / uint8 clipped
to the dtype's maximum, and compared with int32 on those clipped lengths), checks that the result
equals int32's, and prints the ratio to int32 (the two alternate, best of `--repeat` each, so
load from neighbours on a shared machine hits both alike). Writes benchmarks/results/bench_pack_dtypes.json.

    python benchmarks/bench_pack_dtypes.py [--n 10000000] [--repeat 5] [--out PATH]
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads would add to process time
import numpy as np  # noqa: E402
from bench_packing import sample_lengths, timed  # noqa: E402  (sibling script)

from megatron_tokweight.data.packing import ALGORITHMS, pack_lengths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_pack_dtypes.json"
DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
ARRAYS = ("row", "offset", "piece_sample", "piece_start", "piece_length", "piece_row", "piece_offset",
          "row_fill", "row_piece_offsets")
# target: the median dtype within this of int32 (the int32-against-int32 rows show the timer's
# noise on a shared machine, often +-25% for one run)
MAX_MEDIAN_RATIO = 1.15


def same_packing(a, b) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ARRAYS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    L = args.seq_length
    base = sample_lengths(args.n, L)  # int32
    print(f"{args.n:,} lengths, L={L}, mean {base.mean():.1f}; best of {args.repeat} (process CPU seconds, "
          f"user + system; cpus={os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
    results = {"n": args.n, "seq_length": L, "timing": f"process CPU seconds (user + system), best of {args.repeat}",
               "load_average": os.getloadavg()[0], "runs": {}}
    print(f"{'dtype':8s} {'algorithm':9s} {'seconds':>8s} {'int32 s':>8s} {'ratio':>6s} {'cast s':>7s}  "
          "result dtype  same as int32")
    for dtype in DTYPES:
        clip = min(L, int(np.iinfo(dtype).max))
        lengths = np.minimum(base, clip)
        converted = lengths.astype(dtype)
        # what a non-int32 dtype costs by construction: the exact cast to the int32 packer's input
        cast_seconds = timed(np.ascontiguousarray, converted, np.int32, repeat=args.repeat)[0]
        for algorithm in ALGORITHMS:
            # int32 and this dtype alternate, best of each: load from neighbours hits both alike
            ref_seconds = seconds = float("inf")
            for _ in range(args.repeat):
                t, ref = timed(pack_lengths, lengths, L, algorithm)
                ref_seconds = min(ref_seconds, t)
                t, result = timed(pack_lengths, converted, L, algorithm)
                seconds = min(seconds, t)
            same = same_packing(result, ref)
            ratio = seconds / ref_seconds
            results["runs"][f"{dtype}/{algorithm}"] = {
                "dtype": dtype, "algorithm": algorithm, "max_length": clip, "seconds": seconds,
                "int32_seconds": ref_seconds, "ratio_to_int32": ratio, "cast_seconds": cast_seconds,
                "result_dtype": str(result.row.dtype),
                "same_result_as_int32": same, "rows": result.num_rows,
            }
            print(f"{dtype:8s} {algorithm:9s} {seconds:8.3f} {ref_seconds:8.3f} {ratio:6.2f} {cast_seconds:7.3f}  "
                  f"{str(result.row.dtype):12s}  {same}")
    runs = list(results["runs"].values())
    others = [r["ratio_to_int32"] for r in runs if r["dtype"] != "int32"]
    control = [r["ratio_to_int32"] for r in runs if r["dtype"] == "int32"]  # int32 against itself: the noise
    worst = max(runs, key=lambda r: r["ratio_to_int32"])
    results["median_ratio_to_int32"] = float(np.median(others))
    results["int32_against_itself"] = [min(control), max(control)]
    results["worst"] = {"run": f"{worst['dtype']}/{worst['algorithm']}", "ratio_to_int32": worst["ratio_to_int32"]}
    results["targets"] = {
        f"median_ratio_within_{MAX_MEDIAN_RATIO}": results["median_ratio_to_int32"] <= MAX_MEDIAN_RATIO,
        "every_dtype_same_result_as_int32": all(r["same_result_as_int32"] for r in runs),
    }
    print(f"median ratio to int32 {results['median_ratio_to_int32']:.2f} (int32 against itself: "
          f"{min(control):.2f}-{max(control):.2f}); worst {results['worst']['run']} at "
          f"{worst['ratio_to_int32']:.2f}; targets: {results['targets']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
