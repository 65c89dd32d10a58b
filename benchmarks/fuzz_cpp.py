"""The long fuzz run of the C++ entry points, for use before a release (not part of the tests).

Runs the properties of tests/data/test_cpp_fuzz.py (every C++ entry point against its plain-Python
reference, extreme integers included) again and again with fresh Hypothesis seeds and
`TOKWEIGHT_FUZZ_SCALE` times the CI's examples per property, until the time budget is spent or a
run fails. Writes benchmarks/results/fuzz_cpp.json (runs, examples, seconds, failures).

    python benchmarks/fuzz_cpp.py [--minutes 10] [--scale 20]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fuzz_cpp.json"
TESTS = "tests/data/test_cpp_fuzz.py"
EXAMPLES_PER_PROPERTY = 500  # test_cpp_fuzz.FUZZ at scale 1
PROPERTIES = 4  # hypothesis properties in the module (the rest are fixed cases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--scale", type=int, default=20, help="examples per property = 500 x scale, per run")
    args = parser.parse_args()
    env = dict(os.environ, TOKWEIGHT_FUZZ_SCALE=str(args.scale))
    start, runs, failures = time.perf_counter(), [], []
    while time.perf_counter() - start < args.minutes * 60:
        seed = random.randrange(2**32)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS,
                               f"--hypothesis-seed={seed}"], cwd=ROOT, env=env, capture_output=True, text=True)
        runs.append({"seed": seed, "returncode": proc.returncode, "seconds": time.perf_counter() - t0})
        print(f"seed {seed}: exit {proc.returncode} in {runs[-1]['seconds']:.0f} s", flush=True)
        if proc.returncode != 0:  # a failing property, or a crash (negative: the signal)
            failures.append({"seed": seed, "returncode": proc.returncode, "output": proc.stdout[-6000:]})
            break
    summary = {
        "minutes": (time.perf_counter() - start) / 60,
        "runs": len(runs),
        "examples": len(runs) * PROPERTIES * EXAMPLES_PER_PROPERTY * args.scale,
        "scale": args.scale,
        "failures": failures,
        "per_run": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(f"{summary['runs']} runs, ~{summary['examples']:,} examples in {summary['minutes']:.1f} min, "
          f"{len(failures)} failing; wrote {RESULTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
