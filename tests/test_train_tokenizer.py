"""`train_tokenizer`: byte-level BPE with Qwen3.5's pre-tokenizer and special tokens, loadable by qwenlite and
by transformers."""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwenlite.errors import QwenliteError
from qwenlite.text.vocab import QWEN35_SPECIAL_TOKENS
from qwenlite.train.tokenizer_train import train_tokenizer

from train_helpers import write_jsonl_corpus

TEXTS = [
    "the cat sees the dog.",
    "Numbers 12345 and 3.14159 split digit by digit",
    "café naïve — e\u0301 combining, 日本語のテキスト, emoji 🐍🚀",
    "def f(x):\n    return x ** 2  # tabs\tand\r\nnewlines\n\n\n",
    "   leading spaces, trailing spaces   ",
    "literal <|im_start|> in text",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl_corpus(root / "corpus.jsonl")
    extra = root / "extra.txt"
    extra.write_text("\n".join(TEXTS[1:4]) * 20, encoding="utf-8")
    tok = train_tokenizer([corpus, extra], 400, root / "out", show_progress=False)
    return tok, root / "out"


def test_round_trips_any_text(trained):
    tok, _ = trained
    for text in TEXTS + ["never seen: Ωμέγα ∑ 🦀 \x00\x7f"]:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)  # the NFC normaliser


def test_special_tokens_follow_the_learned_vocabulary_in_qwen35_order(trained):
    tok, out = trained
    assert tok.vocab_size <= 400
    learned = tok.vocab_size - len(QWEN35_SPECIAL_TOKENS)
    assert learned > 256  # merges were learned
    for i, token in enumerate(QWEN35_SPECIAL_TOKENS):
        assert tok.token_to_id(token) == learned + i
    assert tok.token_to_id("<|endoftext|>") == learned
    # written in the text, a special token is one id (as in a rendered chat prompt) and decodes back
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids >= {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"


def test_pre_tokenizer_is_qwen35s(trained):
    tok, _ = trained
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("x 2024 e\u0301t\u00e9")]
    # digits one by one; a combining mark stays inside its letter run (byte-level symbols shown)
    assert pieces[:6] == ["x", "Ġ", "2", "0", "2", "4"]
    assert len(pieces) == 7
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC normaliser


def test_chat_template_renders_with_the_trained_vocabulary(trained):
    tok, _ = trained
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], enable_thinking=False)
    assert prompt.startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 2


def test_transformers_loads_it_with_the_same_ids(trained):
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_empty_corpus_and_tiny_vocab_are_errors_and_write_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n')
    with pytest.raises(QwenliteError, match="empty"):
        train_tokenizer([empty], 400, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    corpus = write_jsonl_corpus(tmp_path / "c.jsonl", documents=5)
    with pytest.raises(QwenliteError, match="at least 289"):
        train_tokenizer([corpus], 100, tmp_path / "out", show_progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(QwenliteError, match=r"bad\.jsonl:2: malformed JSON"):
        train_tokenizer([bad], 400, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
