"""Byte tokenizer and the Hugging Face tokenizer.json wrapper (a tiny one built here, nothing downloaded)."""
import json

import pytest

from megatron_tokweight.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    parse_specials,
)
from megatron_tokweight.errors import ConfigError

TEXTS = ["", "hello world", "héllo — ✓ 日本語 🙂", "line\nbreak\ttab  spaces", "#### 72"]


def build_hf_tokenizer(path, special_tokens=("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>")):
    """A byte-level BPE trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the cat sat on the mat", "Natalia sold 48/2 = 24 clips in May.", "#### 72", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return path


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 262
    # documented ids: bytes, then pad, eod, bos, system, user, assistant
    assert (tok.pad_id, tok.eod_id, tok.bos_id) == (256, 257, 258)
    assert [tok.marker(r) for r in ("system", "user", "assistant")] == [259, 260, 261]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([258, 104, 105, 257]) == "<|bos|>hi<|eot|>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([262])
    with pytest.raises(ValueError, match="role"):
        tok.marker("tool")


def test_byte_spec_round_trip():
    spec = ByteTokenizer().spec()
    assert spec["kind"] == "byte" and spec["vocab_size"] == 262 and spec["eod_id"] == 257
    assert json.loads(json.dumps(spec)) == spec
    rebuilt = load_tokenizer(spec)
    assert isinstance(rebuilt, ByteTokenizer) and rebuilt.spec() == spec
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer({**spec, "vocab_size": 300})
    with pytest.raises(ConfigError, match="kind"):
        load_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(ConfigError, match="byte"):
        load_tokenizer("no/such/tokenizer.json")


def test_hf_tokenizer(tmp_path):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(path))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.eod_id == raw.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.eod_id  # no pad token: falls back to eod
    assert tok.bos_id is None
    assert tok.marker("user") == raw.token_to_id("<|user|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges learned
    # special-token strings in text stay text: data cannot inject a marker or an end of document
    injected = tok.encode("a<|user|>b<|endoftext|>")
    assert tok.marker("user") not in injected and tok.eod_id not in injected
    assert tok.decode(injected) == "a<|user|>b<|endoftext|>"
    with pytest.raises(UnicodeEncodeError):
        tok.encode("a\ud800b")

    spec = tok.spec()
    assert spec["kind"] == "hf" and spec["specials"]["eod"] == "<|endoftext|>"
    rebuilt = load_tokenizer(json.loads(json.dumps(spec)))
    assert rebuilt.spec() == spec
    assert load_tokenizer(str(tmp_path)).spec() == spec  # a directory holding tokenizer.json

    # explicit specials override the defaults
    explicit = load_tokenizer(str(path), specials={"pad": "<|system|>"})
    assert explicit.pad_id == raw.token_to_id("<|system|>")
    with pytest.raises(ConfigError, match="not a token"):
        load_tokenizer(str(path), specials={"bos": "<s>"})
    with pytest.raises(ConfigError, match="unknown special"):
        load_tokenizer(str(path), specials={"eos": "<|endoftext|>"})

    # the file changed after preparing: refuse to rebuild from the old spec
    build_hf_tokenizer(path, special_tokens=("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<x>"))
    with pytest.raises(ConfigError, match="changed"):
        load_tokenizer(spec)


def test_hf_tokenizer_missing_specials(tmp_path):
    no_eod = build_hf_tokenizer(tmp_path / "a.json", special_tokens=("<|user|>",))
    with pytest.raises(ConfigError, match=r"end-of-document.*--special eod="):
        load_tokenizer(str(no_eod))
    tok = load_tokenizer(str(no_eod), specials={"eod": "<|user|>"})
    assert tok.eod_id == tok.pad_id
    with pytest.raises(ConfigError, match=r"'assistant' turn.*--special assistant="):
        tok.marker("assistant")
    with pytest.raises(ConfigError, match="not a readable"):
        (tmp_path / "bad.json").write_text("{}")
        load_tokenizer(str(tmp_path / "bad.json"))


def test_parse_specials():
    assert parse_specials(["eod=</s>", "user=<|user|>"]) == {"eod": "</s>", "user": "<|user|>"}
    assert parse_specials(None) == {}
    with pytest.raises(ConfigError, match="NAME=TOKEN"):
        parse_specials(["eod"])
    with pytest.raises(ConfigError, match="byte tokenizer"):
        load_tokenizer("byte", specials={"eod": "x"})
