"""The packaged Qwen3.5 chat template rendered by our sandbox, against transformers' rendering of the same files."""

import copy
import json

import pytest

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import build_qwen35_tokenizer

transformers = pytest.importorskip("transformers")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Météo pour une ville : l\'année <n> & "quotes"',
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer"},
                    "units": {"type": "object"},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}},
]
ARGS = {"city": "Paris", "days": 3, "units": {"temp": "C", "wind": ["km/h"]}}


def tool_conversation(arguments):
    return [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "It is 21 °C and clear.", "reasoning_content": "Summarise."},
        {"role": "user", "content": "Thanks!"},
    ]


MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "EARLY REASONING two plus two"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "LATEST REASONING three plus three"},
]


@pytest.fixture(scope="module")
def hf(qwen35_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(qwen35_tokenizer_dir))


def reference(hf, messages, **kwargs):
    # transformers does not parse JSON-string arguments; the template needs a mapping.
    messages = copy.deepcopy(messages)
    for m in messages:
        for call in m.get("tool_calls") or []:
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    kwargs.setdefault("add_generation_prompt", True)
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_generation_prompt(qwen35_tokenizer, hf, enable_thinking):
    messages = [{"role": "user", "content": "Hi there"}]
    out = qwen35_tokenizer.apply_chat_template(messages, enable_thinking=enable_thinking)
    assert out == reference(hf, messages, enable_thinking=enable_thinking)
    head = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert out == head + ("<think>\n" if enable_thinking else "<think>\n\n</think>\n\n")


def test_thinking_default_is_the_templates(qwen35_tokenizer, hf):
    # Not passing enable_thinking leaves the template's default: the 0.8B/2B template does not think.
    messages = [{"role": "user", "content": "Hi there"}]
    out = qwen35_tokenizer.apply_chat_template(messages)
    assert out == reference(hf, messages)
    assert out.endswith("<think>\n\n</think>\n\n")


def test_generation_prompt_tokens(qwen35_tokenizer):
    # Markers in the rendered prompt become single special tokens.
    tok = qwen35_tokenizer
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    ids = tok.encode(out)
    assert ids[0] == 248045 and ids.count(248045) == 2 and ids.count(248046) == 1
    blank = tok.encode("\n\n")
    assert ids[-(2 + 2 * len(blank)) :] == [248068, *blank, 248069, *blank]


def test_system_prompt(qwen35_tokenizer, hf):
    messages = [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "Hello"}]
    out = qwen35_tokenizer.apply_chat_template(messages)
    assert out == reference(hf, messages)
    assert out.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n")


def test_earlier_reasoning_is_dropped(qwen35_tokenizer, hf):
    out = qwen35_tokenizer.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert out == reference(hf, MULTI_TURN, add_generation_prompt=False)
    assert "EARLY REASONING" not in out
    assert "<|im_start|>assistant\n4<|im_end|>\n" in out
    assert out.endswith("<|im_start|>assistant\n<think>\nLATEST REASONING three plus three\n</think>\n\n6<|im_end|>\n")


def test_reasoning_alias_field(qwen35_tokenizer, hf):
    # OpenAI-style servers name it `reasoning`; it renders like `reasoning_content`, as in transformers.
    messages = [dict(m) for m in MULTI_TURN]
    messages[3] = {"role": "assistant", "content": "6", "reasoning": "LATEST REASONING"}
    out = qwen35_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert out == reference(hf, messages, add_generation_prompt=False)
    assert "<think>\nLATEST REASONING\n</think>\n\n6" in out


def test_reasoning_inside_content_is_split(qwen35_tokenizer, hf):
    messages = MULTI_TURN[:3] + [{"role": "assistant", "content": "<think>\nworking\n</think>\n\n6"}]
    out = qwen35_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert out == reference(hf, messages, add_generation_prompt=False)
    assert out.endswith("<|im_start|>assistant\n<think>\nworking\n</think>\n\n6<|im_end|>\n")


@pytest.mark.parametrize("arguments", [json.dumps(ARGS), ARGS], ids=["json_string", "dict"])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_tools_and_tool_calls(qwen35_tokenizer, hf, arguments, enable_thinking):
    messages = tool_conversation(arguments)
    out = qwen35_tokenizer.apply_chat_template(messages, tools=TOOLS, enable_thinking=enable_thinking)
    assert out == reference(hf, messages, tools=TOOLS, enable_thinking=enable_thinking)

    system, rest = out.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    # tojson as transformers: no HTML escaping, no ASCII escaping, keys in the given order.
    assert json.dumps(TOOLS[0], ensure_ascii=False) in system
    assert "</tools>" in system and "<IMPORTANT>" in system
    assert system.endswith("</IMPORTANT>\n\nYou are a weather bot.")

    call = (
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n"
        '<parameter=units>\n{"temp": "C", "wind": ["km/h"]}\n</parameter>\n'
        "</function>\n</tool_call>"
        "\n<tool_call>\n<function=now>\n</function>\n</tool_call><|im_end|>\n"
    )
    # Only the last user query counts, so the tool-calling turn (before "Thanks!") loses its reasoning.
    assert "<|im_start|>assistant\n" + call in rest
    assert "I should call the tool." not in out and "Summarise." not in out
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>'
        "\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    ) in rest


def test_tool_call_turn_after_last_query_keeps_reasoning(qwen35_tokenizer, hf):
    messages = tool_conversation(json.dumps(ARGS))[:5]  # ends with the tool responses: an agent loop in progress
    out = qwen35_tokenizer.apply_chat_template(messages, tools=TOOLS, enable_thinking=True)
    assert out == reference(hf, messages, tools=TOOLS, enable_thinking=True)
    assert "<|im_start|>assistant\n<think>\nI should call the tool.\n</think>\n\n<tool_call>\n" in out
    assert out.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_caller_messages_are_not_modified(qwen35_tokenizer):
    messages = tool_conversation(json.dumps(ARGS))
    before = copy.deepcopy(messages)
    qwen35_tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert messages == before


def test_invalid_json_arguments(qwen35_tokenizer):
    messages = tool_conversation('{"city": "Paris"')
    with pytest.raises(ValueError, match="get_weather"):
        qwen35_tokenizer.apply_chat_template(messages, tools=TOOLS)


def test_template_exception_is_value_error(qwen35_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="System message must be at the beginning") as err:
        qwen35_tokenizer.apply_chat_template(messages)
    assert isinstance(err.value, QwenliteError)
    with pytest.raises(ValueError, match="No user query"):
        qwen35_tokenizer.apply_chat_template([{"role": "system", "content": "only system"}])


def test_no_chat_template():
    tok = Tokenizer(build_qwen35_tokenizer())
    with pytest.raises(QwenliteError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_syntax_error_is_value_error():
    tok = Tokenizer(build_qwen35_tokenizer(), chat_template="{% if %}")
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_is_sandboxed():
    tok = Tokenizer(build_qwen35_tokenizer(), chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def newer(qwen36_tokenizer_dir):
    """(ours, transformers') tokenizers with a Qwen3.6-style template."""
    ours = Tokenizer.from_dir(qwen36_tokenizer_dir)
    return ours, transformers.AutoTokenizer.from_pretrained(str(qwen36_tokenizer_dir))


@pytest.mark.parametrize("preserve", [True, False, None])
@pytest.mark.parametrize("effort", ["low", "xhigh", None])
def test_newer_template_variables_render_as_transformers_renders_them(newer, preserve, effort):
    """preserve_thinking (Qwen3.6) and reasoning_effort (Qwen3.8) reach the checkpoint's template as transformers
    passes them: earlier reasoning kept only when asked, an effort the template refuses is a ChatTemplateError."""
    ours, theirs = newer
    kwargs = {k: v for k, v in {"preserve_thinking": preserve, "reasoning_effort": effort}.items() if v is not None}
    messages = [*MULTI_TURN, {"role": "user", "content": "And 4+4?"}]
    out = ours.apply_chat_template(messages, enable_thinking=True, **kwargs)
    assert out == reference(theirs, messages, enable_thinking=True, **kwargs)
    assert ("EARLY REASONING" in out) == bool(preserve) and ("LATEST REASONING" in out) == bool(preserve)
    assert (f"Effort: {effort}\n" in out) == (effort is not None)
    ids = ours.encode_chat(messages, enable_thinking=True, **kwargs)
    assert ours.decode(ids) == out
    with pytest.raises(QwenliteError, match="reasoning_effort must be low, medium or xhigh"):
        ours.apply_chat_template(messages, reasoning_effort="extreme")
