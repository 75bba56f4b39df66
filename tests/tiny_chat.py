"""A tiny chat checkpoint for post-training tests: the transformers-built tiny Qwen3.5 (vocab 512, helpers.py)
plus a Qwen3.5-style byte-level BPE tokenizer small enough for that vocabulary (256 bytes, ~200 merges learned from
a few sentences, then the 33 Qwen3.5 special tokens) and the packaged chat template, so that SFT and DPO run the
real template and labelling on a model that trains in seconds.

Import as `from tiny_chat import ...` (tests/ is on sys.path, see helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from qwenlite.text.tokenizer import ENDOFTEXT, IM_END
from qwenlite.text.vocab import (
    QWEN3_PATTERN,
    QWEN3_SPECIAL_TOKENS,
    QWEN35_PATTERN,
    QWEN35_SPECIAL_TOKENS,
    qwen35_chat_template,
)

from helpers import TINY_TEXT_CONFIG, make_hf_checkpoint, make_multimodal_checkpoint

TINY_VOCAB = 480  # learned ids + 33 special tokens; below the tiny model's 512 rows
CORPUS = [
    "The capital of France is Paris. The weather in Paris is sunny.",
    "What is two plus two? Two plus two is four. Three plus three is six.",
    "You are a helpful assistant. Answer the question briefly and politely.",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "<|im_start|>system\n<|im_start|>user\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]


def tiny_tokenizer(qwen3: bool = False, vocab: int = TINY_VOCAB) -> tokenizers.Tokenizer:
    """`vocab` ids in all; with `qwen3`, Qwen2 / Qwen3's split regex and their 26 special tokens."""
    pattern, specials = (QWEN3_PATTERN, QWEN3_SPECIAL_TOKENS) if qwen3 else (QWEN35_PATTERN, QWEN35_SPECIAL_TOKENS)
    tok = tokenizers.Tokenizer(BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(specials),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in specials]
    )
    return tok


def write_tiny_tokenizer(path: str | Path, qwen3: bool = False, vocab: int = TINY_VOCAB) -> None:
    path = Path(path)
    tiny_tokenizer(qwen3, vocab).save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT,
              "unk_token": None, "add_prefix_space": False, "clean_up_tokenization_spaces": False}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.jinja").write_text(qwen35_chat_template())


def make_chat_checkpoint(
    path: str | Path, *, tied: bool = True, scale: float = 0.2, seed: int = 0, text_config: dict | None = None
):
    """The tiny transformers checkpoint (or one with `text_config`, vocab_size >= TINY_VOCAB) with the tiny tokenizer
    and template; returns the transformers model."""
    hf_model = make_hf_checkpoint(path, tied=tied, scale=scale, seed=seed, text_config=text_config)
    write_tiny_tokenizer(path)
    return hf_model


def make_multimodal_chat_checkpoint(path: str | Path):
    """helpers.make_multimodal_checkpoint on the tiny tokenizer (vocabulary 512, its image and video token ids): a
    model with a vision tower that fine-tunes in seconds; returns the transformers model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path)
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip
    token_ids = {key: tok.token_to_id(token) for key, token in names.items()}
    return make_multimodal_checkpoint(path, None, vocab_size=TINY_TEXT_CONFIG["vocab_size"], token_ids=token_ids)


def write_jsonl(path: str | Path, records: list) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
