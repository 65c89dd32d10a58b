"""`tokweight pack`: JSON keys and values against per-sample counts, errors, --plot, a light start."""
import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_tokweight.cli import main
from megatron_tokweight.data.pack_report import pack_prefix
from megatron_tokweight.errors import ConfigError, DataFormatError

L = 48


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, prepared_prefix):
    rng = np.random.default_rng(3)
    records = [{"prompt": "p" * int(rng.integers(1, 40)), "response": "r" * int(rng.integers(0, 50)),
                "task": ["qa", "caption"][i % 2]} for i in range(120)]
    return prepared_prefix(tmp_path_factory.mktemp("pack_cli"), "data", records)


def run_cli(capsys, *argv):
    code = main(["pack", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def targets_by_hand(lengths, spans_of, seq_length, overlong):
    """Per sample: (kept tokens, trained targets), straight from the definitions."""
    kept, trained = [], []
    for i, length in enumerate(lengths):
        if length > seq_length and overlong == "drop":
            kept.append(0)
            trained.append(0)
            continue
        if length > seq_length and overlong == "split":
            cuts = list(range(0, length, seq_length))
            pieces = [(c, min(seq_length, length - c)) for c in cuts]
        else:
            pieces = [(0, min(length, seq_length))]
        kept.append(sum(n for _, n in pieces))
        trained.append(sum(1 for start, n in pieces for j in range(start + 1, start + n)
                           if any(a <= j < b for a, b in spans_of(i))))
    return np.array(kept), np.array(trained)


@pytest.mark.parametrize("overlong", ["truncate", "split", "drop"])
@pytest.mark.parametrize("algorithm", ["bfd", "ffd", "next-fit"])
def test_json_report(capsys, prefix, algorithm, overlong):
    from megatron_tokweight.data.packing import pack_lengths
    from megatron_tokweight.data.sidecar import read_sidecar

    code, out, _ = run_cli(capsys, prefix, "--seq-length", str(L), "--algorithm", algorithm, "--overlong", overlong,
                           "--json")
    assert code == 0
    report = json.loads(out)
    assert {"rows", "samples", "efficiency", "truncated", "split", "dropped", "empty", "seconds"} <= set(report)
    side = read_sidecar(prefix)
    lengths = side.lengths.astype(np.int64)
    kept, trained = targets_by_hand(lengths, lambda i: side.sample_spans(i)[0].tolist(), L, overlong)
    over = int((lengths > L).sum())
    assert over > 0
    assert report["samples"] == len(lengths)
    assert report["rows"] == pack_lengths(lengths, L, algorithm=algorithm, overlong=overlong).num_rows
    assert report["rows"] >= -(-kept.sum() // L)
    assert report["efficiency"] == pytest.approx(kept.sum() / (report["rows"] * L))
    assert (report["truncated"], report["split"], report["dropped"]) == tuple(
        over * (overlong == p) for p in ("truncate", "split", "drop"))
    dropped = (lengths > L) & (overlong == "drop")
    assert report["empty"] == int(((trained == 0) & ~dropped).sum())
    assert report["trained_targets"] == int(trained.sum())
    assert report["answer_targets"] == int(side.n_answer.sum())
    assert report["seconds"] >= 0 and report["plot"] is None


def test_text_report_and_plot(capsys, prefix, tmp_path):
    png = tmp_path / "plots" / "fill.png"
    code, out, _ = run_cli(capsys, prefix, "--seq-length", str(L), "--plot", str(png))
    assert code == 0 and "efficiency" in out and "truncated" in out and str(png) in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    code, out, _ = run_cli(capsys, prefix, "--seq-length", str(L), "--json", "--plot", str(tmp_path / "b.png"))
    assert json.loads(out)["plot"] == str(tmp_path / "b.png") and (tmp_path / "b.png").is_file()


def test_errors(capsys, prefix, tmp_path):
    for bad in ("0", "-5"):
        code, out, err = run_cli(capsys, prefix, "--seq-length", bad)
        assert code == 2 and out == "" and "--seq-length must be a positive integer" in err
    code, _, err = run_cli(capsys, str(tmp_path / "missing"), "--seq-length", "8")
    assert code == 2 and "missing.idx not found" in err
    with pytest.raises(ConfigError, match="--seq-length"):
        pack_prefix(prefix, 0)
    with pytest.raises(ConfigError, match="multiple of 2 x context_parallel_size"):
        pack_prefix(prefix, 6, context_parallel_size=2)
    with pytest.raises(DataFormatError, match="not found"):
        pack_prefix(tmp_path / "missing", 8)
    # a plain Megatron prefix whose .idx does not describe its .bin
    for suffix in (".bin", ".idx"):
        (tmp_path / f"bare{suffix}").write_bytes(open(prefix + suffix, "rb").read()[:-2 if suffix == ".bin" else None])
    code, out, err = run_cli(capsys, str(tmp_path / "bare"), "--seq-length", "8")
    assert code == 2 and out == "" and "bare.bin: truncated" in err


@pytest.mark.parametrize("overlong", ["truncate", "split"])
def test_plain_megatron_prefix_needs_nothing_but_the_prefix(capsys, tmp_path, overlong):
    # Written by Megatron-Core's builder, no sidecar: one text sample per document (its
    # sequences together), every token but the first a target.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(5)
    builder = IndexedDatasetBuilder(str(tmp_path / "web.bin"), dtype=np.uint16)
    lengths = []
    for _ in range(70):
        sequences = [int(n) for n in rng.integers(1, 40, size=int(rng.integers(1, 4)))]
        builder.add_document(rng.integers(0, 1000, size=sum(sequences)).astype(np.uint16), sequences)
        lengths.append(sum(sequences))
    builder.finalize(str(tmp_path / "web.idx"))
    code, out, _ = run_cli(capsys, str(tmp_path / "web"), "--seq-length", str(L), "--overlong", overlong, "--json")
    assert code == 0
    report = json.loads(out)
    kept, trained = targets_by_hand(lengths, lambda i: [(0, lengths[i])], L, overlong)
    assert report["samples"] == len(lengths) and report["real_tokens"] == int(kept.sum())
    assert report["answer_targets"] == sum(n - 1 for n in lengths)
    assert report["trained_targets"] == int(trained.sum())
    assert not (tmp_path / "web.tokweight").exists()


def test_cli_entry_stays_light(prefix):
    """The real entry point, in a fresh interpreter: works without importing Megatron."""
    code = (
        "import sys; from megatron_tokweight.cli import main; "
        f"rc = main(['pack', {prefix!r}, '--seq-length', '64', '--json']); "
        "print('megatron' in sys.modules); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report_line, megatron_loaded = done.stdout.strip().splitlines()
    assert json.loads(report_line)["seq_length"] == 64
    assert megatron_loaded == "False"
