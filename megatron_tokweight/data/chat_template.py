"""Conversations rendered with a Hugging Face tokenizer's own chat template, and the trained spans.

`ChatTemplate.load(DIR)` reads the template of a tokenizer directory (`tokenizer_config.json`'s
`chat_template` or `chat_template.jinja`, through `transformers`), or `--chat-template FILE`.
A conversation renders exactly as `tokenizer.apply_chat_template(messages, tools=tools)` does
(the same `transformers` call renders it; the string is tokenized as that call tokenizes it, special
tokens parsed, none added). What is trained, per assistant message:

- Templates with `{% generation %}` ... `{% endgeneration %}` markers: the marked characters,
  as `transformers`' `return_assistant_tokens_mask` marks them (a token overlapping a marked
  character is trained).
- Other templates: the characters that depend on the message. The conversation is rendered once
  more with that message's payload (`content`, `tool_calls`, `reasoning_content`) replaced by a
  one-character sentinel; the trained part runs from the first to the last character where the two
  renderings differ, then on over whitespace through the end-of-turn token (the tokenizer's
  `eos_token` unless `end_of_turn` names another). Rendering growing prefixes (messages[:k] and
  messages[:k+1]) would misplace turns of templates that rewrite earlier turns once later ones
  follow (Qwen3 drops the `<think>` block of assistant turns before the last user message) and
  would train text the template inserts by itself; the sentinel rendering keeps the whole
  conversation as context, so the trained part is found where it really is.

So template text is never trained: role headers, and the empty `<think>\\n\\n</think>\\n\\n` that
Qwen3's template inserts into its last assistant turn (at inference that block is prompt, put
there by `enable_thinking=False`; training it would teach the model to skip its reasoning).
Reasoning that the data provides (`reasoning_content`, or `<think>...</think>` in the content) and
tool calls are assistant output and trained. An assistant message with no payload gets no span
(not even the end-of-turn token: an empty answer teaches nothing but to stop at once).
A message's span kind (`"kind"`, default "answer") covers its trained part; content given as
segments of several kinds splits it where each segment's text is found in the rendering.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_tokweight.errors import ConfigError, DataFormatError

BUILTIN = "builtin"  # --chat-template builtin: the plugin's own marker template (data.jsonl_shapes)
PAYLOAD_KEYS = ("content", "tool_calls", "reasoning_content")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # what transformers looks for


class NoChatTemplate(ConfigError):
    """A tokenizer directory without a chat template (and no --chat-template given)."""


@dataclass
class AssistantTurn:
    """What the template needs to place one assistant message: its index and span kinds."""

    index: int
    segments: List[Tuple[str, str]]  # (text, kind) in order; joined they are the message content
    has_payload: bool


def _stamp(path: str) -> tuple:
    """Names, sizes and mtimes of a tokenizer's files: a changed file is loaded again."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    out = []
    for name in names:
        st = os.stat(os.path.join(path, name) if name else path)
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str, stamp: tuple):
    """The `transformers` tokenizer of a directory (or a bare tokenizer.json); loading takes seconds,
    so one process loads each version of one directory once."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as err:
        raise ConfigError(f"{path}: rendering its chat template needs transformers (pip install transformers), "
                          f"or --chat-template {BUILTIN} for the plugin's own template: {err}") from err
    try:
        if os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        return PreTrainedTokenizerFast(tokenizer_file=path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: transformers cannot load this tokenizer: {err}") from err


def template_error_line(err: BaseException) -> Optional[int]:
    """The template line an exception was raised at (jinja2 puts template frames in the traceback)."""
    line = getattr(err, "lineno", None)
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == "<template>":
            line = frame.lineno
    return line


class ChatTemplate:
    """A tokenizer's chat template bound to its `transformers` tokenizer (see the module docstring)."""

    def __init__(self, hf_tokenizer, template: str, source: str, end_of_turn: Optional[str] = None):
        self.tokenizer = hf_tokenizer
        self.template = template
        self.source = source
        self.end_of_turn = end_of_turn or hf_tokenizer.eos_token
        if not self.end_of_turn:
            raise ConfigError(
                f"{source}: the tokenizer names no eos_token, so the end of an assistant turn is unknown; "
                "name the token that ends one with --end-of-turn TOKEN"
            )
        self.has_markers = bool(_GENERATION_TAG.search(template))
        self._compile()

    @classmethod
    def load(cls, tokenizer_path, template_file=None, end_of_turn: Optional[str] = None) -> "ChatTemplate":
        """The template of tokenizer directory `tokenizer_path`, or the Jinja file `template_file`."""
        path = os.path.abspath(os.fspath(tokenizer_path))
        hf = _hf_tokenizer(path, _stamp(path))
        if template_file is not None:
            template_file = os.path.abspath(os.fspath(template_file))
            try:
                with open(template_file, encoding="utf-8") as f:
                    return cls(hf, f.read(), template_file, end_of_turn)
            except OSError as err:
                raise ConfigError(f"--chat-template {template_file}: cannot read it: {err.strerror or err}") from err
        template = hf.chat_template
        if isinstance(template, dict):  # named templates: the default one renders conversations
            template = template.get("default")
        if not template:
            raise NoChatTemplate(
                f"{path}: this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json, "
                "no chat_template.jinja); give one with --chat-template FILE (a Jinja template), or "
                f"--chat-template {BUILTIN} for the plugin's own marker template"
            )
        return cls(hf, template, os.path.join(path, "tokenizer_config.json"), end_of_turn)

    def _compile(self) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(self.template)
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            line = template_error_line(err)
            at = f" (template line {line})" if line else ""
            raise ConfigError(f"chat template {self.source}: does not compile{at}: {err}") from err

    def spec(self) -> dict:
        """What the rendering depends on, recorded with the tokenizer in the sidecar."""
        return {
            "source": self.source,
            "sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest(),
            "end_of_turn": self.end_of_turn,
            "trained_by": "generation markers" if self.has_markers else "payload sentinel",
        }

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, messages, tools, where: str, markers: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, indices = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=self.template,
                return_assistant_tokens_mask=markers, **self.tokenizer.special_tokens_map,
            )
        except Exception as err:  # the template's own raise_exception, undefined fields, type errors
            line = template_error_line(err)
            at = f" at template line {line}" if line else ""
            raise DataFormatError(
                f"{where}: the chat template ({self.source}) failed{at}: {type(err).__name__}: {err}"
            ) from err
        return rendered[0], (indices[0] if markers else None)

    def encode(self, messages: List[dict], turns: Sequence[AssistantTurn], tools, where: str):
        """Token ids of the rendered conversation and its trained spans [(start, end, kind)]."""
        text, marked = self._render(messages, tools, where, markers=self.has_markers)
        enc = self.tokenizer(text, add_special_tokens=False)
        if self.has_markers:
            ranges = self._marked_ranges(marked, turns, where)
        else:
            ranges = [self._payload_range(text, messages, turn, tools, where) for turn in turns]
        spans: List[list] = []
        for turn, char_range in zip(turns, ranges):
            if char_range is not None:
                self._add_spans(spans, enc, text, char_range, turn, where)
        return list(enc["input_ids"]), [tuple(s) for s in spans]

    def _marked_ranges(self, marked, turns, where):
        blocks = [(s, e) for s, e in marked if e > s]
        with_payload = [t for t in turns if t.has_payload]
        if with_payload and not blocks:
            raise DataFormatError(
                f"{where}: the chat template ({self.source}) has generation markers but marks no part of "
                f"message {with_payload[0].index} (assistant): nothing would be trained"
            )
        if len(blocks) == len(turns):  # an empty answer's block (its end-of-turn token alone) is not trained
            return [b if t.has_payload else None for t, b in zip(turns, blocks)]
        if len(blocks) != len(with_payload):
            raise DataFormatError(
                f"{where}: the chat template ({self.source}) marks {len(blocks)} generation block(s) for "
                f"{len(with_payload)} assistant message(s) with content; each must be marked once"
            )
        it = iter(blocks)
        return [next(it) if t.has_payload else None for t in turns]

    def _payload_range(self, text, messages, turn: AssistantTurn, tools, where):
        if not turn.has_payload:
            return None
        msg = messages[turn.index]
        sentinel = "\x00" if "\x00" not in str(msg.get("content")) else "\x01"
        probe = [dict(m) for m in messages]
        probe[turn.index] = {k: v for k, v in msg.items() if k not in PAYLOAD_KEYS}
        probe[turn.index]["content"] = sentinel
        other, _ = self._render(probe, tools, where)
        n = min(len(text), len(other))
        a = 0
        while a < n and text[a] == other[a]:
            a += 1
        b = 0
        while b < n - a and text[-1 - b] == other[-1 - b]:
            b += 1
        end = len(text) - b
        if end <= a or sentinel not in other:
            raise DataFormatError(
                f"{where}: message {turn.index} (assistant): the chat template ({self.source}) renders no part of "
                "its content, so nothing marks what to train; use a template that renders assistant "
                "turns (--chat-template FILE), or mark them with {% generation %} ... {% endgeneration %}"
            )
        j = end
        while j < len(text) and text[j].isspace() and not text.startswith(self.end_of_turn, j):
            j += 1
        if not text.startswith(self.end_of_turn, j):
            found = text[end:end + 40]
            raise DataFormatError(
                f"{where}: message {turn.index} (assistant): the chat template ({self.source}) does not close the "
                f"turn with the end-of-turn token {self.end_of_turn!r} (found {found!r} after it); name the "
                "token that ends an assistant turn with --end-of-turn TOKEN"
            )
        return a, j + len(self.end_of_turn)

    def _add_spans(self, spans, enc, text, char_range, turn: AssistantTurn, where):
        start, end = char_range
        bounds = _kind_bounds(text, start, end, turn, where)
        first = _token_at(enc, start, end, forward=True)
        last = _token_at(enc, end - 1, start - 1, forward=False)
        if first is None or last is None or last < first:
            return
        for t in range(first, last + 1):
            tok_start = max(enc.token_to_chars(t).start, start)
            kind = next(k for edge, k in reversed(bounds) if tok_start >= edge)
            if spans and spans[-1][1] == t and spans[-1][2] == kind:
                spans[-1][1] = t + 1
            else:
                spans.append([t, t + 1, kind])


def _token_at(enc, pos: int, stop: int, forward: bool) -> Optional[int]:
    """The token holding character `pos`, else the nearest one towards `stop` (a normalizer may map
    a character to no token)."""
    step = 1 if forward else -1
    while pos != stop:
        t = enc.char_to_token(pos)
        if t is not None:
            return t
        pos += step
    return None


def _kind_bounds(text: str, start: int, end: int, turn: AssistantTurn, where: str) -> List[Tuple[int, str]]:
    """[(first character, kind)] of the trained range: one entry per run of equal kind among the
    segments; each later run begins where its first segment's text is found in the rendering."""
    kinds = [k for t, k in turn.segments if t]
    bounds = [(start, kinds[0] if kinds else "answer")]
    pos = start
    for i, (seg_text, kind) in enumerate(turn.segments):
        needle = seg_text.strip()
        if not needle:
            continue
        found = text.find(needle, pos, end)
        if kind != bounds[-1][1]:
            if found < 0:
                raise DataFormatError(
                    f"{where}: message {turn.index}.content[{i}]: the chat template changed this segment's text, "
                    f"so where its span kind {kind!r} begins is unknown; give the message one kind"
                )
            bounds.append((found, kind))
        if found >= 0:
            pos = found + len(needle)
    return bounds


class MissingTemplate:
    """A tokenizer directory without a chat template: text lines need none, a conversation fails."""

    def __init__(self, error: ConfigError):
        self.error = error

    def encode(self, messages, turns, tools, where: str):
        raise DataFormatError(f"{where}: {self.error}")

    def spec(self) -> None:
        return None


def resolve_chat_template(tokenizer_arg, tokenizer, template_arg=None, end_of_turn: Optional[str] = None):
    """What renders conversations for `tokweight prepare`: a ChatTemplate, a MissingTemplate, or
    None for the built-in marker template (the byte tokenizer, a bare tokenizer.json, "builtin")."""
    if template_arg == BUILTIN:
        return None
    if tokenizer.kind == "byte":
        if template_arg is not None or end_of_turn is not None:
            raise ConfigError("the byte tokenizer uses the built-in chat template; --chat-template and "
                              "--end-of-turn need a Hugging Face tokenizer directory")
        return None
    path = os.fspath(tokenizer_arg) if isinstance(tokenizer_arg, (str, os.PathLike)) else tokenizer.path
    if not os.path.isdir(path) and template_arg is None:
        return None  # a bare tokenizer.json has no template of its own
    try:
        template = ChatTemplate.load(path, template_arg, end_of_turn)
    except NoChatTemplate as err:
        return MissingTemplate(err)
    if len(template.tokenizer) > tokenizer.vocab_size:
        raise ConfigError(f"{path}: transformers loads {len(template.tokenizer):,} tokens but tokenizer.json "
                          f"holds {tokenizer.vocab_size:,}; the directory's files disagree")
    return template


def chat_spec_fields(template) -> Dict[str, dict]:
    """The tokenizer spec's extra field for data rendered with `template` (none for the built-in one)."""
    spec = None if template is None else template.spec()
    return {} if spec is None else {"chat_template": spec}
