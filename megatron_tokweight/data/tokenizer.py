"""Tokenizers: a built-in byte-level one (nothing to download) and a Hugging Face `tokenizers` wrapper.

Both expose the same small interface, which is all `jsonl` and `prepare` need:
`vocab_size`, `pad_id`, `eod_id`, `bos_id` (None when the tokenizer has none), `marker(role)`
(the token id opening a chat turn of `role`), `encode(text) -> list[int]` (no specials added),
`decode(ids) -> str` and `spec()`, a JSON-able dict stored in the sidecar's `meta.json` from which
`load_tokenizer` rebuilds the same tokenizer.

Special tokens (names -> role in the chat template of `megatron_tokweight.data.jsonl_shapes`):
`pad` (padding of packed rows), `eod` (ends every turn and every text sample), `bos` (starts
every sample), `system`, `user`, `assistant` (open a turn).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from megatron_tokweight.errors import ConfigError

ROLES = ("system", "user", "assistant")
SPECIAL_NAMES = ("pad", "eod", "bos") + ROLES

# Byte tokenizer: ids 0..255 are the UTF-8 bytes, the specials follow in SPECIAL_NAMES order.
BYTE_SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "eod": "<|eot|>",
    "bos": "<|bos|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}

# Token strings looked up in a tokenizer.json, in order, when the caller does not name one.
HF_SPECIAL_CANDIDATES = {
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "eod": ("<|eot|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "</s>", "<eos>"),
    "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>"),
    "system": ("<|system|>",),
    "user": ("<|user|>",),
    "assistant": ("<|assistant|>",),
}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the six specials (256 = pad, 257 = eod, 258 = bos, 259..261 roles)."""

    kind = "byte"

    def __init__(self):
        self._special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_NAMES)}
        self._special_text = {self._special_ids[n]: BYTE_SPECIAL_TOKENS[n] for n in SPECIAL_NAMES}
        self.vocab_size = 256 + len(SPECIAL_NAMES)
        self.pad_id = self._special_ids["pad"]
        self.eod_id = self._special_ids["eod"]
        self.bos_id: Optional[int] = self._special_ids["bos"]

    def marker(self, role: str) -> int:
        _check_role(role)
        return self._special_ids[role]

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Bytes between specials are decoded together so multi-byte characters survive.
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if i not in self._special_text:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
            out.append(self._special_text[i])
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def spec(self) -> dict:
        return {
            "kind": "byte",
            "path": None,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "special_ids": dict(self._special_ids),
        }


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (`tokenizer.json`) behind the same interface.

    `specials` maps special names (see SPECIAL_NAMES) to token strings of the vocabulary; names
    left out are looked up among HF_SPECIAL_CANDIDATES. `eod` is required; `pad` falls back to
    `eod` (padding is never a target, so sharing the id is harmless); `bos` is optional; a role
    marker is required only when a chat turn of that role is encoded. Special-token strings that
    appear in encoded text are tokenized as plain text, never as the special token.
    """

    kind = "hf"

    def __init__(self, path: Union[str, os.PathLike], specials: Optional[Dict[str, str]] = None):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise ConfigError(f"tokenizer file {self.path} does not exist (expected a Hugging Face tokenizer.json)")
        st = os.stat(self.path)
        self._tok, self.sha256, self.vocab_size = _read_tokenizer_json(self.path, st.st_size, st.st_mtime_ns)

        specials = dict(specials or {})
        unknown = sorted(set(specials) - set(SPECIAL_NAMES))
        if unknown:
            raise ConfigError(f"unknown special token name(s) {unknown}; expected some of {list(SPECIAL_NAMES)}")
        self.special_tokens: Dict[str, str] = {}
        self._special_ids: Dict[str, int] = {}
        for name in SPECIAL_NAMES:
            if name in specials:
                token = specials[name]
                token_id = self._tok.token_to_id(token)
                if token_id is None:
                    raise ConfigError(
                        f"{self.path}: special '{name}' = {token!r} is not a token of this tokenizer"
                    )
            else:
                token, token_id = self._find(HF_SPECIAL_CANDIDATES[name])
            if token_id is not None:
                self.special_tokens[name] = token
                self._special_ids[name] = token_id
        if "eod" not in self._special_ids:
            raise ConfigError(
                f"{self.path}: no end-of-document token found (tried {list(HF_SPECIAL_CANDIDATES['eod'])}); "
                "name one with --special eod=TOKEN (Python: specials={'eod': TOKEN})"
            )
        if "pad" not in self._special_ids:
            self.special_tokens["pad"] = self.special_tokens["eod"]
            self._special_ids["pad"] = self._special_ids["eod"]
        self.pad_id = self._special_ids["pad"]
        self.eod_id = self._special_ids["eod"]
        self.bos_id = self._special_ids.get("bos")

    def _find(self, candidates):
        # a tokenizer that declares special (added) tokens: only those ("<s>" is an ordinary merge
        # in Qwen's vocabulary, not a bos); one that declares none: its plain vocabulary
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None and (token in added or not added):
                return token, token_id
        return None, None

    def marker(self, role: str) -> int:
        _check_role(role)
        if role not in self._special_ids:
            raise ConfigError(
                f"{self.path}: no token opens a '{role}' turn (tried {list(HF_SPECIAL_CANDIDATES[role])}); "
                f"add one to the tokenizer or name one with --special {role}=TOKEN"
            )
        return self._special_ids[role]

    def encode(self, text: str) -> List[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            text.encode("utf-8")  # an unpaired surrogate: raise Python's UnicodeEncodeError naming it
            raise

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict:
        return {
            "kind": "hf",
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "special_ids": dict(self._special_ids),
            "specials": dict(self.special_tokens),
        }


Tokenizer = Union[ByteTokenizer, HFTokenizer]


@functools.lru_cache(maxsize=8)
def _read_tokenizer_json(path: str, size: int, mtime_ns: int):
    """(tokenizers.Tokenizer, sha256, vocabulary size) of one version of a tokenizer.json: a real
    one is ~10 MB of JSON, seconds to parse, so one process reads each version once."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as err:  # the Rust library raises plain Exceptions with its own message
        raise ConfigError(f"{path}: not a readable Hugging Face tokenizer.json: {err}") from err
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    # Special-token strings inside user text stay text: data cannot inject role markers or eod.
    tok.encode_special_tokens = True
    return tok, sha256, tok.get_vocab_size(with_added_tokens=True)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {list(ROLES)}")


def parse_specials(items: Optional[Sequence[str]]) -> Dict[str, str]:
    """`["eod=</s>", "user=<|user|>"]` (the CLI's repeated --special) -> {"eod": "</s>", ...}."""
    out = {}
    for item in items or ():
        name, sep, token = item.partition("=")
        if not sep or not name or not token:
            raise ConfigError(f"--special {item!r}: expected NAME=TOKEN, e.g. eod=</s>")
        out[name] = token
    return out


def load_tokenizer(spec_or_path, specials: Optional[Dict[str, str]] = None) -> Tokenizer:
    """A tokenizer from "byte", a tokenizer.json path (or its directory), a `spec()` dict or an instance.

    Rebuilding from a spec checks that the result still matches it (same file contents, vocabulary
    size and special ids), so data prepared with one tokenizer is never read with another.
    """
    if isinstance(spec_or_path, (ByteTokenizer, HFTokenizer)):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return _from_spec(spec_or_path)
    if not isinstance(spec_or_path, (str, os.PathLike)):
        raise ConfigError(f"tokenizer must be 'byte', a tokenizer.json path or a spec dict, got {spec_or_path!r}")
    name = os.fspath(spec_or_path)
    if name == "byte":
        if specials:
            raise ConfigError("the byte tokenizer has fixed special tokens; --special applies to tokenizer.json only")
        return ByteTokenizer()
    if os.path.isdir(name):
        name = os.path.join(name, "tokenizer.json")
    if not os.path.isfile(name):
        raise ConfigError(f"tokenizer {name!r}: expected 'byte' or the path of a Hugging Face tokenizer.json")
    return HFTokenizer(name, specials=specials)


def _from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf":
        if not spec.get("path"):
            raise ConfigError("hf tokenizer spec has no 'path'")
        tok = HFTokenizer(spec["path"], specials=spec.get("specials"))
        if spec.get("sha256") and spec["sha256"] != tok.sha256:
            raise ConfigError(
                f"{tok.path} changed since the data was prepared (sha256 {tok.sha256[:12]}..., "
                f"recorded {spec['sha256'][:12]}...); prepare the data again or restore the file"
            )
    else:
        raise ConfigError(f"tokenizer spec kind {kind!r} is unknown; expected 'byte' or 'hf'")
    rebuilt = tok.spec()
    for key in ("vocab_size", "pad_id", "eod_id", "bos_id"):
        if key in spec and spec[key] != rebuilt[key]:
            raise ConfigError(
                f"tokenizer spec mismatch: {key} is {rebuilt[key]} now but {spec[key]} in the recorded spec"
            )
    return tok


def tokenizer_differences(a: Dict[str, Any], b: Dict[str, Any], names=("checkpoint", "data")) -> list:
    """"field: NAME_A value, NAME_B value" for each tokenizer spec field that differs, the file
    `path` aside (the same tokenizer.json copied elsewhere is the same tokenizer: `sha256` decides)."""
    diffs = []
    for key in sorted((set(a) | set(b)) - {"path"}):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {names[0]} {a.get(key, '<absent>')!r}, {names[1]} {b.get(key, '<absent>')!r}")
    return diffs
