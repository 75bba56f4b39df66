"""Qwen3.5's XML tool calls, parsed out of the answer text as it streams.

The model writes (the chat template's format):

    <tool_call>
    <function=NAME>
    <parameter=P>
    value
    </parameter>
    </function>
    </tool_call>

`ToolCallParser` takes answer text in pieces and returns plain content and OpenAI-style tool-call deltas: the
name once `<function=NAME>` is complete, then the JSON arguments parameter by parameter (`{"p": 1`, `, "q": "x"`,
`}`), so a client sees a call build up while the model writes it. Values are typed by the tool's JSON schema,
as the template wrote them: strings raw, everything else as JSON (booleans also as Python's True / False)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_FUNCTION_CLOSE = "</function>"


@dataclass
class ToolCallDelta:
    index: int  # which call of this answer, from 0
    arguments: str = ""  # the next piece of the JSON arguments string
    id: str | None = None  # on a call's first delta
    name: str | None = None  # on a call's first delta


def parameter_schemas(tools: list[dict] | None) -> dict[str, dict[str, dict]]:
    """OpenAI `tools` -> {function name: {parameter name: JSON schema}}."""
    out: dict[str, dict[str, dict]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def convert_value(text: str, schema: dict | None):
    """A parameter's text -> its value: raw for strings and unknown parameters, parsed for other types."""
    types = schema.get("type") if isinstance(schema, dict) else None
    types = types if isinstance(types, list) else [types]
    if schema is None or "string" in types or types == [None]:
        return text
    stripped = text.strip()
    if "boolean" in types and stripped in ("True", "False"):
        return stripped == "True"  # the template writes non-mapping values with Jinja's `string`
    if "null" in types and stripped == "None":
        return None
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        return text


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that could still grow into `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Feed answer text with `feed`, then call `finish`; each returns content strings and `ToolCallDelta`s."""

    def __init__(self, tools: list[dict] | None):
        self.schemas = parameter_schemas(tools)
        self.buffer = ""  # text not yet handed out
        self.held_space = ""  # trailing whitespace of the content: dropped if a tool call follows
        self.in_call = False
        self.calls = 0  # tool calls started so far
        self.name: str | None = None  # of the call being parsed, once known
        self.params = 0  # parameters emitted for that call
        self.closed = False  # its arguments JSON is complete

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        self.buffer += text
        out: list[str | ToolCallDelta] = []
        while True:
            if not self.in_call:
                i = self.buffer.find(TOOL_CALL_OPEN)
                if i < 0:
                    keep = _held_prefix(self.buffer, TOOL_CALL_OPEN)
                    self._content(self.buffer[: len(self.buffer) - keep], out)
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return out
                self._content(self.buffer[:i], out)
                self.held_space = ""  # the template separates content from a call with blank lines
                self.buffer = self.buffer[i + len(TOOL_CALL_OPEN) :]
                self.in_call, self.name, self.params, self.closed = True, None, 0, False
                self.calls += 1
            self._parse_call(out)
            end = self.buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                return out
            self._end_call(out)
            self.buffer = self.buffer[end + len(TOOL_CALL_CLOSE) :]

    def finish(self) -> list[str | ToolCallDelta]:
        """Whatever is held back once the answer ends; a call cut short is closed if its name is known."""
        out: list[str | ToolCallDelta] = []
        if self.in_call:
            self._parse_call(out)
            self._end_call(out)
        else:
            self._content(self.buffer, out)
            if self.calls == 0 and self.held_space:
                out.append(self.held_space)
        self.buffer = self.held_space = ""
        return out

    def _content(self, text: str, out: list) -> None:
        # Trailing whitespace waits: before a tool call it is dropped, after the calls it is noise.
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body) :]
        if body:
            out.append(body)

    def _parse_call(self, out: list) -> None:
        index = self.calls - 1
        if self.name is None:
            m = _FUNCTION.search(self.buffer)
            if m is None:
                return
            self.name = m.group(1).strip()
            self.buffer = self.buffer[m.end() :]
            out.append(ToolCallDelta(index, "", id=f"call_{uuid.uuid4().hex[:24]}", name=self.name))
        if self.closed:
            return
        schemas = self.schemas.get(self.name, {})
        while (m := _PARAMETER.search(self.buffer)) is not None:
            if (close := self.buffer.find(_FUNCTION_CLOSE)) >= 0 and close < m.start():
                break
            name, value = m.group(1).strip(), m.group(2)
            value = value.removeprefix("\n").removesuffix("\n")
            piece = json.dumps(name, ensure_ascii=False) + ": "
            piece += json.dumps(convert_value(value, schemas.get(name)), ensure_ascii=False)
            out.append(ToolCallDelta(index, ("{" if self.params == 0 else ", ") + piece))
            self.params += 1
            self.buffer = self.buffer[m.end() :]
        if (close := self.buffer.find(_FUNCTION_CLOSE)) >= 0:
            out.append(ToolCallDelta(index, "}" if self.params else "{}"))
            self.closed = True
            self.buffer = self.buffer[close + len(_FUNCTION_CLOSE) :]

    def _end_call(self, out: list) -> None:
        if self.name is None:  # not a call after all: give the text back as content
            self.calls -= 1
            self._content(TOOL_CALL_OPEN + self.buffer.split(TOOL_CALL_CLOSE)[0], out)
        elif not self.closed:
            out.append(ToolCallDelta(self.calls - 1, "}" if self.params else "{}"))
            self.closed = True
        self.in_call = False
