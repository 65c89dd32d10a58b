"""JSONL lines -> token ids + loss spans (docs/ARCHITECTURE.md, "Sidecar").

Three shapes, one per line (extra top-level fields are ignored, except the task and group fields):

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`; loss on the
  assistant turns. Any number of turns, system turns and consecutive same-role turns are allowed;
  at least one assistant turn is required. An assistant message may carry `"kind"` (its span
  kind, default "answer") and its content may be a list of segments (below).
- prompt/response: `{"prompt": str, "response": str | [segments]}`, the chat
  `[user: prompt, assistant: response]`.
- text: `{"text": str}`; loss on every token.

A segment list `[{"text": str, "kind": str}, ...]` splits one answer into spans of different
kinds (e.g. a "rationale" then an "answer"); a segment without "kind" takes the message's kind.
OpenAI-style content parts are segments: `{"type": "text", "text": ...}` parts are joined (in any
turn); a part of another type (an image, audio) is an error naming the line and the part, unless
`drop_non_text_parts` drops it (counted in `EncodedSample.dropped_parts`).

A tokenizer's own chat template (`data.chat_template.ChatTemplate`, `tokweight prepare
--tokenizer DIR`) renders chat and prompt/response lines instead of the built-in template below;
there any role the template knows is allowed ("tool" ...), message fields such as `tool_calls`
and `reasoning_content` and a line's `"tools"` list reach the template, and the trained spans
are found as that module describes. Text lines are encoded as below either way.

Built-in chat template (the byte tokenizer, a bare tokenizer.json or `--chat-template builtin`;
markers are single special tokens, see `tokenizer`):

    <|bos|> (<|role|> content <|eot|>)*          chat and prompt/response
    <|bos|> text <|eot|>                          text

The loss span of an assistant turn covers its content *and* its closing <|eot|>, so the model
learns to stop; the role marker opening the turn is prompt (it is the position that predicts
the first answer token). Text samples get one span of kind "text" over text and <|eot|>.
Segments are encoded separately (span edges fall on token edges; a BPE tokenizer may tokenize
the joint text differently) and adjacent segments of one kind share a span. A turn or text
whose content encodes to no tokens gets no span (not even its <|eot|>: an empty answer teaches
nothing but to stop at once); a sample left with n = 0 is kept and counted by `prepare`.
A tokenizer without a bos token starts the sample at the first marker (or the text).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Tuple

from megatron_tokweight.data.sidecar import ANSWER_KIND, count_targets
from megatron_tokweight.data.tokenizer import ROLES
from megatron_tokweight.errors import ConfigError, DataFormatError, unknown_keys

TEXT_KIND = "text"
SHAPE_FIELDS = {"chat": ("messages",), "prompt/response": ("prompt", "response"), "text": ("text",)}
_RESERVED = {"messages", "prompt", "response", "text"}
# keys of one segment of a content list; "type" admits OpenAI-style {"type": "text", "text": ...}
SEGMENT_KEYS = ("text", "kind", "type")


@dataclass(frozen=True)
class JsonlFields:
    """Where a line names its task and group, and the task of lines that name none."""

    task_field: str = "task"
    default_task: str = "default"
    group_field: str = "group"

    def __post_init__(self):
        for name in ("task_field", "default_task", "group_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.task_field == self.group_field:
            raise ConfigError(f"task_field and group_field are both {self.task_field!r}; they must differ")
        for name in ("task_field", "group_field"):
            if getattr(self, name) in _RESERVED:
                raise ConfigError(f"{name} {getattr(self, name)!r} is a shape field ({sorted(_RESERVED)}); pick another")


@dataclass
class EncodedSample:
    """One line: token ids, loss spans [start, end) with their kind, task, group key, line number."""

    tokens: List[int]
    spans: List[Tuple[int, int, str]]
    task: str
    group: Optional[Hashable]
    line: int
    dropped_parts: int = 0  # content parts of another type than text, dropped on request

    @property
    def n_answer(self) -> int:
        return count_targets([(s, e) for s, e, _ in self.spans])


class JsonlReader:
    """Streams (line number, object) from a JSONL file; counts blank lines and bytes read.
    `raw_lines()` streams the undecoded lines instead (for `parse_line` in another process)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.blank_lines = 0
        self.bytes_read = 0

    def raw_lines(self) -> Iterator[Tuple[int, bytes]]:
        if not os.path.isfile(self.path):
            raise DataFormatError(f"{self.path}: input file not found")
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                if not raw.strip():
                    self.blank_lines += 1
                    continue
                yield line_no, raw

    def __iter__(self) -> Iterator[Tuple[int, dict]]:
        for line_no, raw in self.raw_lines():
            yield line_no, parse_line(self.path, line_no, raw)


def parse_line(path, line_no: int, raw: bytes) -> dict:
    """One JSONL line -> its object; errors name `path:line_no`."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}:{line_no}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{line_no}: malformed JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return obj


class _Builder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.tokens: List[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.spans: List[list] = []

    def prompt_turn(self, role: str, text: str) -> None:
        self.tokens.append(self.tok.marker(role))
        self.tokens.extend(self.tok.encode(text))
        self.tokens.append(self.tok.eod_id)

    def answer_turn(self, segments: List[Tuple[str, str]], role: Optional[str] = "assistant"):
        if role is not None:
            self.tokens.append(self.tok.marker(role))
        first_span = len(self.spans)
        for text, kind in segments:
            ids = self.tok.encode(text)
            if not ids:
                continue
            start = len(self.tokens)
            self.tokens.extend(ids)
            last = self.spans[-1] if len(self.spans) > first_span else None
            if last is not None and last[1] == start and last[2] == kind:
                last[1] = len(self.tokens)
            else:
                self.spans.append([start, len(self.tokens), kind])
        self.tokens.append(self.tok.eod_id)
        if len(self.spans) > first_span:
            self.spans[-1][1] += 1  # the closing <|eot|> is trained with the answer's last span


class _Line:
    """Error messages for one line: `path:line: field 'x': problem`."""

    def __init__(self, path, line, drop_non_text: bool = False):
        self.path, self.line = path, line
        self.drop_non_text = drop_non_text
        self.dropped_parts = 0

    def error(self, field: Optional[str], problem: str) -> DataFormatError:
        where = f"{self.path}:{self.line}"
        return DataFormatError(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")

    def string(self, obj: dict, key: str, field: str, allow_empty=True) -> str:
        if key not in obj:
            raise self.error(field, "missing")
        value = obj[key]
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_typename(value)}")
        if not allow_empty and not value:
            raise self.error(field, "must not be empty")
        return value

    def kind(self, obj: dict, field: str, default: str) -> str:
        return self.string(obj, "kind", field, allow_empty=False) if "kind" in obj else default

    def segments(self, value, field: str, default_kind: Optional[str]) -> List[Tuple[str, str]]:
        """A content string or list of parts -> [(text, kind)]; `default_kind` None: no kinds allowed
        (a prompt turn). Parts of another type than text are an error, or dropped and counted."""
        if isinstance(value, str):
            return [(value, default_kind)]
        if not isinstance(value, list):
            raise self.error(field, f"expected a string or a list of {{\"text\", \"kind\"}} segments, got {_typename(value)}")
        out = []
        for i, seg in enumerate(value):
            f = f"{field}[{i}]"
            if not isinstance(seg, dict):
                raise self.error(f, f"expected a {{\"text\", \"kind\"}} object, got {_typename(seg)}")
            if seg.get("type", "text") != "text":
                if self.drop_non_text:
                    self.dropped_parts += 1
                    continue
                raise self.error(
                    f"{f}.type", f"{seg['type']!r} content is not text; only text can be trained "
                    "(--drop-non-text-parts drops such parts, counted in the report)"
                )
            # a misspelt key would otherwise train the segment as the default kind
            problem = unknown_keys(seg, SEGMENT_KEYS)
            if problem:
                raise self.error(f, problem)
            if default_kind is None and "kind" in seg:
                raise self.error(f"{f}.kind", "only assistant turns have a span kind")
            out.append((self.string(seg, "text", f"{f}.text"), self.kind(seg, f"{f}.kind", default_kind)))
        return out


def _typename(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def detect_shape(obj: dict, line: _Line) -> str:
    found = [shape for shape, keys in SHAPE_FIELDS.items() if any(k in obj for k in keys)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise line.error(
            None, f"unknown shape: expected {{\"messages\"}}, {{\"prompt\", \"response\"}} or {{\"text\"}}, found fields {sorted(obj)}"
        )
    raise line.error(None, f"ambiguous shape: has the fields of {' and '.join(found)} (found {sorted(obj)})")


def _parse_messages(messages, line: _Line, builtin: bool) -> List[Tuple[dict, List[Tuple[str, str]]]]:
    """[(message, its content as (text, kind) segments)]; roles other than system/user/assistant
    only for a tokenizer's own template (which decides what they mean, e.g. "tool")."""
    if not isinstance(messages, list):
        raise line.error("messages", f"expected a list of messages, got {_typename(messages)}")
    out = []
    for i, msg in enumerate(messages):
        f = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise line.error(f, f"expected a {{\"role\", \"content\"}} object, got {_typename(msg)}")
        role = line.string(msg, "role", f"{f}.role", allow_empty=False)
        if builtin and role not in ROLES:
            raise line.error(f"{f}.role", f"expected one of {list(ROLES)}, got {role!r}")
        if "content" not in msg:
            raise line.error(f"{f}.content", "missing")
        if role == "assistant":
            kind = line.kind(msg, f"{f}.kind", ANSWER_KIND)
        elif "kind" in msg:
            raise line.error(f"{f}.kind", f"only assistant turns have a span kind; this is a {role} turn")
        else:
            kind = None
        out.append((msg, line.segments(msg["content"], f"{f}.content", kind)))
    if not any(msg["role"] == "assistant" for msg, _ in out):
        raise line.error("messages", f"no assistant turn among {len(messages)} messages: nothing to train on")
    return out


def _joined(segments) -> str:
    return "".join(text for text, _ in segments)


def _encode_with_template(parsed, obj: dict, template, line: _Line):
    """Token ids and spans of a conversation rendered with a tokenizer's own chat template."""
    from megatron_tokweight.data.chat_template import AssistantTurn

    messages, turns = [], []
    for i, (msg, segments) in enumerate(parsed):
        messages.append({**{k: v for k, v in msg.items() if k != "kind"}, "content": _joined(segments)})
        if msg["role"] == "assistant":
            payload = bool(_joined(segments)) or any(msg.get(k) for k in ("tool_calls", "reasoning_content"))
            turns.append(AssistantTurn(i, segments, payload))
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise line.error("tools", f"expected a list of tool schemas, got {_typename(tools)}")
    return template.encode(messages, turns, tools, f"{line.path}:{line.line}")


def _encode_shape(obj: dict, tokenizer, line: _Line, template=None) -> Tuple[List[int], List[tuple]]:
    shape = detect_shape(obj, line)
    if shape == "chat":
        parsed = _parse_messages(obj["messages"], line, builtin=template is None)
    elif shape == "prompt/response":
        prompt = line.string(obj, "prompt", "prompt")
        if "response" not in obj:
            raise line.error("response", "missing")
        parsed = [({"role": "user", "content": prompt}, [(prompt, None)]),
                  ({"role": "assistant", "content": obj["response"]}, line.segments(obj["response"], "response", ANSWER_KIND))]
    if shape != "text" and template is not None:
        return _encode_with_template(parsed, obj, template, line)
    b = _Builder(tokenizer)
    if shape == "text":
        b.answer_turn([(line.string(obj, "text", "text"), TEXT_KIND)], role=None)
    else:
        for msg, segments in parsed:
            if msg["role"] == "assistant":
                b.answer_turn(segments)
            else:
                b.prompt_turn(msg["role"], _joined(segments))
    return b.tokens, [tuple(s) for s in b.spans]


def _task_and_group(obj: dict, fields: JsonlFields, line: _Line):
    task = obj.get(fields.task_field)
    if task is None:
        task = fields.default_task
    elif not isinstance(task, str) or not task:
        raise line.error(fields.task_field, f"task name must be a non-empty string, got {task!r}")
    group = obj.get(fields.group_field)
    if group is not None:
        if isinstance(group, str):
            group = ("s", group)
        elif isinstance(group, int) and not isinstance(group, bool):
            group = ("i", group)  # 1 and "1" are different groups
        else:
            raise line.error(fields.group_field, f"group must be a string or an integer, got {_typename(group)}")
    return task, group


def encode_record(obj: dict, tokenizer, fields: JsonlFields = JsonlFields(), path="<input>", line_no: int = 0,
                  template=None, drop_non_text_parts: bool = False) -> EncodedSample:
    """One parsed JSONL object -> EncodedSample; errors name `path:line_no`, the field and the problem.

    `template`: a `data.chat_template.ChatTemplate` rendering chat and prompt/response lines (None:
    the built-in template); `drop_non_text_parts`: drop content parts that are not text (counted in
    `EncodedSample.dropped_parts`) instead of refusing them."""
    line = _Line(path, line_no, drop_non_text_parts)
    task, group = _task_and_group(obj, fields, line)
    try:
        tokens, spans = _encode_shape(obj, tokenizer, line, template)
    except UnicodeEncodeError as err:
        bad = err.object[err.start:err.end]
        raise line.error(None, f"a string holds {bad!r}, an unpaired surrogate: not valid Unicode text") from err
    return EncodedSample(tokens=tokens, spans=spans, task=task, group=group, line=line_no,
                         dropped_parts=line.dropped_parts)
