"""Train a byte-level BPE tokenizer for a from-scratch model, built like Qwen3.5's.

Same pipeline as the real one (`qwenlite.text.vocab.build_qwen35_tokenizer`): NFC normaliser, the Qwen3.5 split
regex (combining marks stay in letter runs, digits one by one) followed by the byte-level mapping, a byte-level
decoder. The 256 byte symbols are always in the vocabulary, so any text encodes. The 33 Qwen3.5 special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<think>`, `<tool_call>`, ...) come right after the learned
vocabulary, in Qwen3.5's order, so the packaged chat template works unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, pre_tokenizers, trainers

from qwenlite.errors import QwenliteError
from qwenlite.io.files import atomic_write
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import QWEN35_SPECIAL_TOKENS, qwen35_bpe, qwen35_chat_template, tokenizer_config
from qwenlite.train.data import iter_documents, list_data_files

MIN_VOCAB_SIZE = 256 + len(QWEN35_SPECIAL_TOKENS)  # the byte alphabet and the special tokens


def train_tokenizer_from_iterator(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True
) -> tokenizers.Tokenizer:
    """Learn merges from `texts` until the vocabulary, special tokens included, has `vocab_size` ids (fewer
    when the corpus runs out of pairs seen `min_frequency` times)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise QwenliteError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + 33 special tokens)")
    tok = qwen35_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN35_SPECIAL_TOKENS),
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    learned = tok.get_vocab_size(with_added_tokens=True)
    # Appended in Qwen3.5's order: <|endoftext|> is the first id after the learned vocabulary.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in QWEN35_SPECIAL_TOKENS]
    )
    for i, t in enumerate(QWEN35_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == learned + i, t
    return tok


def save_tokenizer(tok: tokenizers.Tokenizer, out_dir: str | Path) -> None:
    """tokenizer.json, tokenizer_config.json and the packaged chat template, each written atomically."""
    out = Path(out_dir)
    atomic_write(out / "tokenizer.json", lambda p: tok.save(str(p)))
    config = json.dumps(tokenizer_config(), indent=2) + "\n"
    atomic_write(out / "tokenizer_config.json", lambda p: p.write_text(config, encoding="utf-8"))
    template = qwen35_chat_template()
    atomic_write(out / "chat_template.jinja", lambda p: p.write_text(template, encoding="utf-8"))


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train on text, JSONL or Parquet files (read as `qwenlite.train.data` reads them) and write the tokenizer
    files into `out_dir`, which `Tokenizer.from_dir` and transformers' AutoTokenizer then load."""
    paths = list_data_files(files)
    documents = 0

    def texts() -> Iterator[str]:
        nonlocal documents
        for path in paths:
            for text, _ in iter_documents(path):
                documents += 1
                yield text

    # The data is read (and a bad line reported) before anything is written.
    tok = train_tokenizer_from_iterator(texts(), vocab_size, min_frequency, show_progress)
    if not documents:
        raise QwenliteError(f"no text to learn from in {', '.join(map(str, paths))}: the corpus is empty")
    save_tokenizer(tok, out_dir)
    return Tokenizer.from_dir(out_dir)
