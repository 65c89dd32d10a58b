"""`tokweight prepare --workers N`: the same files byte for byte as one worker; bad lines and dead
workers are clear errors that leave nothing written."""
import os

import pytest
from jsonl_files import write_jsonl

from megatron_tokweight import cli
from megatron_tokweight.data import encode_workers, jsonl_shapes
from megatron_tokweight.data.prepare import prepare_jsonl
from megatron_tokweight.errors import ConfigError, DataFormatError, TokweightError


def corpus(n):
    """Every shape, tasks, groups, kinds, blank lines and non-ASCII text, in a fixed order."""
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append({"messages": [{"role": "system", "content": f"sys {i}"}, {"role": "user", "content": "q" * (i % 7)},
                                       {"role": "assistant", "content": f"answer {i} ✓"}], "task": "chat"})
        elif kind == 1:
            lines.append({"prompt": f"{i}+1?", "response": [{"text": "because ", "kind": "rationale"}, {"text": str(i + 1)}],
                          "task": "math", "group": i // 8})
        elif kind == 2:
            lines.append({"text": "日本語 " * (i % 5) + str(i)})
        else:
            lines.append("")
    return lines


def files_of(prefix):
    out = {}
    for path in [prefix + ".bin", prefix + ".idx"] + [
            os.path.join(prefix + ".tokweight", n) for n in sorted(os.listdir(prefix + ".tokweight"))]:
        if not path.endswith("verified.json"):
            with open(path, "rb") as f:
                out[path[len(prefix):]] = f.read()
    return out


def test_workers_write_the_same_bytes_as_one(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(400))
    one = prepare_jsonl(src, tmp_path / "one", chunk_bytes=1000)
    two = prepare_jsonl(src, tmp_path / "two", workers=2, chunk_bytes=1000)  # ~15 chunks, 4 in flight
    whole = prepare_jsonl(src, tmp_path / "whole", workers=2)  # one chunk
    assert one.num_samples == 300 and one.counts["blank_lines"] == 100
    assert files_of(str(tmp_path / "one")) == files_of(str(tmp_path / "two")) == files_of(str(tmp_path / "whole"))
    assert (one.num_tokens, one.tasks, one.kind_tokens, one.counts) == (two.num_tokens, two.tasks, two.kind_tokens, two.counts)
    assert cli.main(["prepare", str(src), "-o", str(tmp_path / "cli"), "--workers", "2", "--quiet"]) == 0
    assert files_of(str(tmp_path / "cli")) == files_of(str(tmp_path / "one"))
    with pytest.raises(ConfigError, match="workers must be a positive integer, got 0"):
        prepare_jsonl(src, tmp_path / "zero", workers=0)


def test_a_bad_line_in_a_worker_is_the_same_error(tmp_path):
    lines = corpus(200)
    lines[150] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    errors = []
    for workers in (1, 2):
        with pytest.raises(DataFormatError) as info:
            prepare_jsonl(src, tmp_path / "ds", workers=workers, chunk_bytes=500)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "in.jsonl:151: field 'messages[1].content'" in errors[0]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]


def test_a_worker_that_dies_leaves_nothing(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(200))
    real = jsonl_shapes.parse_line

    def dies_on_line_121(path, line_no, raw):
        if line_no == 121 and os.getpid() != parent:
            os._exit(9)  # a worker killed mid-chunk (the OOM killer, a segfault)
        return real(path, line_no, raw)

    parent = os.getpid()
    monkeypatch.setattr(encode_workers, "parse_line", dies_on_line_121)  # forked workers inherit it
    with pytest.raises(TokweightError, match=r"in.jsonl: a prepare worker process died .* while encoding lines "
                                             r"\d+-\d+; nothing was written"):
        prepare_jsonl(src, tmp_path / "ds", workers=2, chunk_bytes=500)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]
