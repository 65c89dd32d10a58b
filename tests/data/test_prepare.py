"""`tokweight prepare`: JSONL shapes -> IndexedDataset + sidecar, bad input, GSM8K as two tasks."""
import json
import os

import numpy as np
import pytest
from jsonl_files import write_jsonl
from test_tokenizer import build_hf_tokenizer

from megatron_tokweight import cli
from megatron_tokweight.data.indexed_validation import validate_against_indexed_dataset
from megatron_tokweight.data.jsonl_shapes import JsonlFields, JsonlReader, encode_record
from megatron_tokweight.data.prepare import prepare_jsonl, token_dtype_for
from megatron_tokweight.data.sources.gsm8k import (
    ANSWER_TASK,
    SOLUTION_TASK,
    write_gsm8k_two_task_jsonl,
)
from megatron_tokweight.data.tokenizer import ByteTokenizer, load_tokenizer
from megatron_tokweight.errors import ConfigError, DataFormatError

# the byte tokenizer's documented special ids
PAD, EOT, BOS, SYS, USER, ASSIST = 256, 257, 258, 259, 260, 261


def b(text):
    return list(text.encode("utf-8"))


def read_tokens(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


# Each case: a line, the tokens and the (start, end, kind) spans expected by hand (docs in jsonl.py).
SHAPE_CASES = [
    (  # system + user + assistant
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}]},
        [BOS, SYS, *b("S"), EOT, USER, *b("hi"), EOT, ASSIST, *b("yo"), EOT],
        [(9, 12, "answer")],
    ),
    (  # two assistant turns, consecutive user turns, a kind, a trailing user turn
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c", "kind": "critique"},
                      {"role": "assistant", "content": "dd"}, {"role": "user", "content": "e"}]},
        [BOS, USER, 97, EOT, USER, 98, EOT, ASSIST, 99, EOT, ASSIST, 100, 100, EOT, USER, 101, EOT],
        [(8, 10, "critique"), (11, 14, "answer")],
    ),
    (  # chat content as segments; message kind is the segments' default
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "kind": "rationale", "content": [{"text": "r"}, {"text": "A", "kind": "answer"}]}]},
        [BOS, USER, 113, EOT, ASSIST, 114, 65, EOT],
        [(5, 6, "rationale"), (6, 8, "answer")],
    ),
    (  # prompt/response
        {"prompt": "2+2?", "response": "4"},
        [BOS, USER, *b("2+2?"), EOT, ASSIST, *b("4"), EOT],
        [(8, 10, "answer")],
    ),
    (  # response segments: rationale then answer; the eot joins the last one
        {"prompt": "p", "response": [{"text": "x=4\n", "kind": "rationale"}, {"text": "#### 4", "kind": "answer"}]},
        [BOS, USER, 112, EOT, ASSIST, *b("x=4\n"), *b("#### 4"), EOT],
        [(5, 9, "rationale"), (9, 16, "answer")],
    ),
    (  # adjacent same-kind segments share a span; an empty segment adds nothing
        {"prompt": "p", "response": [{"text": "ab"}, {"text": ""}, {"text": "c"}]},
        [BOS, USER, 112, EOT, ASSIST, 97, 98, 99, EOT],
        [(5, 9, "answer")],
    ),
    (  # text: every token after bos, eot included
        {"text": "héllo"},
        [BOS, *b("héllo"), EOT],
        [(1, 8, "text")],
    ),
]
EMPTY_CASES = [  # empty answers: kept, no span, n = 0
    ({"prompt": "p", "response": ""}, [BOS, USER, 112, EOT, ASSIST, EOT]),
    ({"prompt": "p", "response": [{"text": ""}]}, [BOS, USER, 112, EOT, ASSIST, EOT]),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}, [BOS, USER, 117, EOT, ASSIST, EOT]),
    ({"text": ""}, [BOS, EOT]),
]


def test_encode_record_shapes_by_hand():
    tok = ByteTokenizer()
    for obj, tokens, spans in SHAPE_CASES:
        sample = encode_record(obj, tok)
        assert sample.tokens == tokens, obj
        assert sample.spans == spans, obj
        assert sample.n_answer == sum(e - s for s, e, _ in spans)  # every span starts after position 0
    for obj, tokens in EMPTY_CASES:
        sample = encode_record(obj, tok)
        assert (sample.tokens, sample.spans, sample.n_answer) == (tokens, [], 0)


def test_prepare_round_trip_spans_tasks_groups(tmp_path):
    lines = [dict(obj) for obj, _, _ in SHAPE_CASES] + [dict(obj) for obj, _ in EMPTY_CASES]
    # tasks: custom field, default name for lines without it; groups: str and int values differ
    lines[0].update(kind_of_task="qa", grp="g1")
    lines[3].update(kind_of_task="qa", grp="g1")
    lines[4].update(grp=1)
    lines[5].update(grp="1", kind_of_task="math")
    lines[7].update(task="ignored-field")  # "task" is not the task field here
    src = write_jsonl(tmp_path / "in.jsonl", lines[:5] + [""] + lines[5:])  # one blank line
    report = prepare_jsonl(src, tmp_path / "out" / "ds", task_field="kind_of_task", default_task="misc", group_field="grp")

    expected_tokens = [t for _, t, _ in SHAPE_CASES] + [t for _, t in EMPTY_CASES]
    assert read_tokens(tmp_path / "out" / "ds") == expected_tokens  # one sequence per non-blank line
    md = validate_against_indexed_dataset(tmp_path / "out" / "ds", check_token_ids=True)
    expected_spans = [s for _, _, s in SHAPE_CASES] + [[] for _ in EMPTY_CASES]
    for i, spans in enumerate(expected_spans):
        got, kinds = md.sample_spans(i)
        assert [(int(s), int(e), md.span_kinds[k]) for (s, e), k in zip(got, kinds)] == spans, i
    np.testing.assert_array_equal(md.n_answer, [sum(e - s for s, e, _ in sp) for sp in expected_spans])
    np.testing.assert_array_equal(md.lengths, [len(t) for t in expected_tokens])
    assert md.task_names == ["qa", "misc", "math"]
    assert [md.task_names[t] for t in md.task_id] == ["qa", "misc", "misc", "qa", "misc", "math"] + ["misc"] * 5
    # g1 shared by samples 0 and 3; 1 and "1" are different groups; the rest each their own
    g = md.group_id.tolist()
    assert g[0] == g[3] and g[4] != g[5] and len(set(g)) == len(g) - 1
    assert md.span_kinds[0] == "answer" and set(md.span_kinds) == {"answer", "critique", "rationale", "text"}
    assert md.tokenizer == ByteTokenizer().spec() and md.token_dtype == "uint16"

    assert report.num_samples == 11 and report.num_tokens == sum(map(len, expected_tokens))
    assert report.counts == {"empty_answer": 4, "blank_lines": 1, "dropped_non_text_parts": 0} == md.counts
    assert report.tasks["misc"].empty_answers == 4 and report.tasks["qa"].empty_answers == 0
    assert report.tasks["qa"].answer_tokens == 3 + 2
    assert sum(report.kind_tokens.values()) == int(md.n_answer.sum())
    text = report.format()
    assert "11 samples" in text and "empty_answer 4" in text and "misc" in text


BAD_LINES = [
    ('{"text": "a"', ["malformed JSON"]),
    ("[1, 2]", ["expected a JSON object, got list"]),
    (b'{"text": "\xff"}', ["not valid UTF-8"]),
    ('{"text": "a\\ud800b"}', ["unpaired surrogate"]),
    ({"foo": 1}, ["unknown shape", "foo"]),
    ({"text": "a", "prompt": "b", "response": "c"}, ["ambiguous shape", "prompt/response and text"]),
    ({"prompt": "a"}, ["field 'response'", "missing"]),
    ({"response": "a"}, ["field 'prompt'", "missing"]),
    ({"prompt": 1, "response": "a"}, ["field 'prompt'", "expected a string, got int"]),
    ({"prompt": "a", "response": {"text": "x"}}, ["field 'response'", "got object"]),
    ({"prompt": "a", "response": ["x"]}, ["field 'response[0]'", "got string"]),
    ({"prompt": "a", "response": [{"kind": "answer"}]}, ["field 'response[0].text'", "missing"]),
    ({"prompt": "a", "response": [{"text": "x", "kind": ""}]}, ["field 'response[0].kind'", "must not be empty"]),
    ({"messages": "hi"}, ["field 'messages'", "expected a list"]),
    ({"messages": [{"role": "user", "content": "x"}]}, ["field 'messages'", "no assistant turn"]),
    ({"messages": []}, ["field 'messages'", "no assistant turn"]),
    ({"messages": [{"role": "bot", "content": "x"}]}, ["field 'messages[0].role'", "'bot'"]),
    ({"messages": [{"content": "x"}]}, ["field 'messages[0].role'", "missing"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, ["field 'messages[1].content'", "missing"]),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
     ["field 'messages[0].content'", "got null"]),
    ({"messages": [{"role": "user", "content": "x", "kind": "k"}, {"role": "assistant", "content": "y"}]},
     ["field 'messages[0].kind'", "only assistant turns"]),
    ({"messages": ["x"]}, ["field 'messages[0]'", "got string"]),
    ({"text": "a", "task": 3}, ["field 'task'", "non-empty string"]),
    ({"text": "a", "task": ""}, ["field 'task'", "non-empty string"]),
    ({"text": "a", "group": 1.5}, ["field 'group'", "got float"]),
    ({"text": "a", "group": True}, ["field 'group'", "got boolean"]),
]


@pytest.mark.parametrize("bad,fragments", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_bad_input_names_file_line_field(tmp_path, bad, fragments):
    src = tmp_path / "bad.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"text": "fine"}\n')
        f.write(bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode())
        f.write(b"\n")
    with pytest.raises(DataFormatError) as err:
        prepare_jsonl(src, tmp_path / "out" / "ds")
    message = str(err.value)
    assert f"{src}:2:" in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert os.listdir(tmp_path / "out") == []  # nothing half-written, no temporaries left


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        JsonlFields(task_field="x", group_field="x")
    with pytest.raises(ConfigError, match="shape field"):
        JsonlFields(task_field="text")
    with pytest.raises(DataFormatError, match="input file not found"):
        prepare_jsonl(tmp_path / "missing.jsonl", tmp_path / "ds")
    assert token_dtype_for(262) is np.uint16 and token_dtype_for(200_000) is np.int32


def test_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r", "t": "A"}, {"text": "x"}])
    rc = cli.main(["prepare", str(src), "-o", str(tmp_path / "ds"), "--quiet", "--task-field", "t", "--default-task", "B"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 samples" in out and "A" in out and "B" in out
    assert read_tokens(tmp_path / "ds") == [[BOS, USER, 112, EOT, ASSIST, 114, EOT], [BOS, 120, EOT]]
    # prepared again into the same prefix: replaced, still consistent
    write_jsonl(src, [{"text": "yz"}])
    assert cli.main(["prepare", str(src), "-o", str(tmp_path / "ds"), "--quiet"]) == 0
    assert validate_against_indexed_dataset(tmp_path / "ds").num_samples == 1
    assert read_tokens(tmp_path / "ds") == [[BOS, 121, 122, EOT]]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.tokweight", "in.jsonl"]
    capsys.readouterr()
    prepare_jsonl(src, tmp_path / "ds", progress=True)
    assert "prepare" in capsys.readouterr().err  # the tqdm bar, on stderr
    write_jsonl(src, [{"messages": [{"role": "user", "content": "x"}]}])
    assert cli.main(["prepare", str(src), "-o", str(tmp_path / "ds2")]) == 2
    assert f"{src}:1: field 'messages'" in capsys.readouterr().err


def test_hf_tokenizer_prepare(tmp_path):
    tok_path = build_hf_tokenizer(tmp_path / "tokenizer.json")
    lines = [{"prompt": "the cat", "response": "sat on the mat"}, {"text": "hello world"},
             {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
                 {"text": "Natalia sold 48/2", "kind": "rationale"}, {"text": "#### 72"}]}]}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    report = prepare_jsonl(src, tmp_path / "ds", tokenizer=str(tok_path))
    tok = load_tokenizer(str(tok_path))
    eod, user, assist = tok.eod_id, tok.marker("user"), tok.marker("assistant")
    # no bos in this tokenizer: samples start at the first marker, a text sample at its text
    c, s, h = tok.encode("the cat"), tok.encode("sat on the mat"), tok.encode("hello world")
    r, a = tok.encode("Natalia sold 48/2"), tok.encode("#### 72")
    x = tok.encode("x")
    expected = [
        [user, *c, eod, assist, *s, eod],
        [*h, eod],
        [user, *x, eod, assist, *r, *a, eod],
    ]
    assert read_tokens(tmp_path / "ds") == expected
    md = validate_against_indexed_dataset(tmp_path / "ds", check_token_ids=True)
    assert md.tokenizer == tok.spec() and md.tokenizer["kind"] == "hf"
    p0 = len(c) + 3
    p2 = len(x) + 3
    assert md.spans.tolist() == [[p0, p0 + len(s) + 1], [0, len(h) + 1], [p2, p2 + len(r)], [p2 + len(r), p2 + len(r) + len(a) + 1]]
    # position 0 of the text sample predicts nothing: n = its tokens minus one
    assert md.n_answer.tolist() == [len(s) + 1, len(h), len(r) + len(a) + 1]
    assert report.kind_tokens["rationale"] == len(r)

    # a system turn needs a marker this tokenizer lacks: a clear configuration error
    no_system = build_hf_tokenizer(tmp_path / "t2.json", special_tokens=("<|endoftext|>", "<|user|>", "<|assistant|>"))
    write_jsonl(src, [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ConfigError, match="'system' turn"):
        prepare_jsonl(src, tmp_path / "ds2", tokenizer=str(no_system))


def test_large_vocab_writes_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "w5 w69999 w65535 w65536"}])
    report = prepare_jsonl(src, tmp_path / "ds", tokenizer=str(tmp_path / "tokenizer.json"))
    assert report.token_dtype == "int32"
    assert read_tokens(tmp_path / "ds") == [[5, 69999, 65535, 65536, 70000]]
    validate_against_indexed_dataset(tmp_path / "ds", check_token_ids=True)


def test_gsm8k_marker_missing(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "s\n#### 1"}, {"question": "q", "answer": "no final"}])
    with pytest.raises(DataFormatError, match=r"g.jsonl:2: field 'answer': no '####'"):
        write_gsm8k_two_task_jsonl(src, tmp_path / "out.jsonl")
    assert not os.path.exists(tmp_path / "out.jsonl")
    write_jsonl(src, [{"question": "q"}])
    with pytest.raises(DataFormatError, match=r"g.jsonl:1: field 'answer': missing"):
        write_gsm8k_two_task_jsonl(src, tmp_path / "out.jsonl")


def test_gsm8k_two_tasks(tmp_path, gsm8k_dir):
    src = gsm8k_dir / "train.jsonl"
    questions = [json.loads(line) for line in open(src, encoding="utf-8")]
    assert write_gsm8k_two_task_jsonl(src, tmp_path / "two.jsonl") == len(questions) == 7473
    report = prepare_jsonl(tmp_path / "two.jsonl", tmp_path / "gsm8k")
    assert report.seconds < 30, report.format()  # a few seconds on one core; generous for a shared machine
    md = validate_against_indexed_dataset(tmp_path / "gsm8k", check_token_ids=True)
    assert md.num_samples == 2 * 7473 and md.task_names == [SOLUTION_TASK, ANSWER_TASK]
    sol, ans = md.task_id == 0, md.task_id == 1
    assert sol.sum() == ans.sum() == 7473
    assert np.median(md.n_answer[ans]) <= 8 and md.n_answer[ans].max() <= 16  # "72" + eot
    assert 100 <= np.median(md.n_answer[sol]) <= 1000
    assert report.counts["empty_answer"] == 0
    # each question: one group holding one sample of each task
    groups, counts = np.unique(md.group_id, return_counts=True)
    assert len(groups) == 7473 and (counts == 2).all()
    assert (md.group_id[sol] == md.group_id[ans]).all()  # written in pairs

    # spot check decoded spans against the source
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds, tok = IndexedDataset(str(tmp_path / "gsm8k")), ByteTokenizer()
    for q in (0, 1234, 7472):
        final = questions[q]["answer"].split("####")[-1].strip()
        spans, kinds = md.sample_spans(2 * q)
        assert [md.span_kinds[k] for k in kinds] == ["rationale", "answer"]
        tokens = ds[2 * q]
        assert tok.decode(tokens[spans[1][0]:spans[1][1]]) == f"#### {final}<|eot|>"
        assert tok.decode(tokens[spans[0][0]:spans[0][1]]) + f"#### {final}" == questions[q]["answer"].rstrip()
        (s, e), = md.sample_spans(2 * q + 1)[0]
        assert tok.decode(ds[2 * q + 1][s:e]) == f"{final}<|eot|>"
        assert questions[q]["question"].strip() in tok.decode(ds[2 * q + 1][:s])


def test_reader_counts_blank_lines(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"text": "a"}', "", "   ", '{"text": "b"}'])
    reader = JsonlReader(src)
    assert [line for line, _ in reader] == [1, 4]
    assert reader.blank_lines == 2 and reader.bytes_read == os.path.getsize(src)


# ---- inputs and outputs a hostile user gives (each used to end in a traceback or silence) --------


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_an_input_without_samples_is_an_error(tmp_path, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(DataFormatError, match=rf"{src}: no samples: the file is empty or all of its \d+ lines are blank"):
        prepare_jsonl(src, tmp_path / "ds")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing written
    assert cli.main(["prepare", str(src), "-o", str(tmp_path / "ds"), "--quiet"]) == 2
    assert "no samples" in capsys.readouterr().err


def test_unwritable_outputs_are_named(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}])
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataFormatError, match=r"-o .*afile/sub/ds: cannot create the output directory"):
        prepare_jsonl(src, tmp_path / "afile" / "sub" / "ds")
    # a read-only directory (simulated: root writes anywhere) fails at the first write, named
    import megatron_tokweight.data.prepare as prepare

    def read_only(path, directory=False):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(prepare, "atomic_path", read_only)
    with pytest.raises(DataFormatError, match=r"cannot write the dataset: Permission denied \(.*ro/ds.bin\)"):
        prepare_jsonl(src, tmp_path / "ro" / "ds")


def test_an_output_path_of_the_wrong_kind_is_never_replaced(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}])
    (tmp_path / "ds.bin").mkdir()
    (tmp_path / "ds.bin" / "keep.txt").write_text("somebody's data")
    with pytest.raises(DataFormatError, match=r"ds.bin exists and is a directory; remove it or choose another"):
        prepare_jsonl(src, tmp_path / "ds")
    assert (tmp_path / "ds.bin" / "keep.txt").read_text() == "somebody's data"
    (tmp_path / "other.tokweight").write_text("")
    with pytest.raises(DataFormatError, match=r"other.tokweight exists and is a file"):
        prepare_jsonl(src, tmp_path / "other")


def test_a_misspelt_or_non_text_segment_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "q", "response": [{"text": "because", "kind": "rationale"}, {"text": "7", "knd": "answer"}]}])
    with pytest.raises(DataFormatError, match=r"in.jsonl:1: field 'response\[1\]': unknown key\(s\) 'knd' "
                                              r"\(did you mean 'kind'\?\)"):
        prepare_jsonl(src, tmp_path / "ds")
    write_jsonl(src, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "a "}, {"type": "image", "text": "<img>"}]}]}])
    with pytest.raises(DataFormatError, match=r"in.jsonl:1: field 'messages\[1\].content\[1\].type': 'image' content "
                                              "is not text"):
        prepare_jsonl(src, tmp_path / "ds")
