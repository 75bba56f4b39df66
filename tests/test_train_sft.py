"""SFT: labels on exactly the assistant tokens of the rendered conversation (real Qwen3.5 tokenizer and template),
the loss falls on a tiny model, the result loads in transformers, and bad data fails naming file and line
before anything is written."""

import json
import re

import pytest
import torch

from qwenlite.cli.main import build_parser
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.common import TrainSettings
from qwenlite.train.posttrain import IGNORE
from qwenlite.train.sft import assistant_spans, encode_chat, load_sft_data, train_sft

from helpers import max_abs_diff, random_ids, reference_logits
from tiny_chat import make_chat_checkpoint, write_jsonl

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 °C.", "reasoning_content": "Summarise the tool result."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome!", "reasoning_content": "Be friendly."},
]  # fmt: skip
# What the template renders for the three assistant turns after their `<|im_start|>assistant\n` header: the first
# two come before the last user message, so the template drops their reasoning; the last keeps its <think> block.
TRAINED_TEXT = [
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>",
    "It is 21 °C.<|im_end|>",
    "<think>\nBe friendly.\n</think>\n\nYou're welcome!<|im_end|>",
]


def runs(example):
    """Maximal runs of consecutive tokens with the same trained / not-trained state: [(trained, ids)]."""
    out = []
    for i, label in zip(example.ids, example.labels, strict=True):
        trained = label != IGNORE
        if not out or out[-1][0] != trained:
            out.append((trained, []))
        out[-1][1].append(i)
    return out


def test_sft_labels_exactly_the_assistant_tokens(qwen35_tokenizer):
    tok = qwen35_tokenizer
    example = encode_chat(tok, CONVERSATION, TOOLS)
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    assert example.ids == tok.encode(text)  # trained on exactly the ids inference would see
    for i, label in zip(example.ids, example.labels, strict=True):
        assert label in (i, IGNORE)  # labels are the ids themselves, not shifted

    trained = [ids for is_trained, ids in runs(example) if is_trained]
    assert [tok.decode(ids) for ids in trained] == TRAINED_TEXT
    # token by token: each trained run is the tokenization of that text alone, nothing more or less
    assert trained == [tok.encode(t) for t in TRAINED_TEXT]
    context = [tok.decode(ids) for is_trained, ids in runs(example) if not is_trained]
    assert all(c.endswith("<|im_start|>assistant\n") for c in context[:3])  # headers are context
    assert "I should call the tool" not in text and "Summarise" not in text  # what the template dropped
    assert "".join(tok.decode(ids) for _, ids in runs(example)) == text


def test_dpo_style_labels_start_at_a_message(qwen35_tokenizer):
    example = encode_chat(qwen35_tokenizer, CONVERSATION, TOOLS, train_from_message=5)
    trained = [qwen35_tokenizer.decode(ids) for is_trained, ids in runs(example) if is_trained]
    assert trained == TRAINED_TEXT[2:]


def test_assistant_spans():
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\nbye"
    controls = [(m.start(), m.end()) for m in re.finditer(r"<\|im_(start|end)\|>", text)]
    assert [text[s:e] for s, e in assistant_spans(text, controls)] == ["hello<|im_end|>", "bye"]
    # "<|im_end|>" inside the first turn is text, not a control token: the turn runs on to the next one.
    text = "<|im_start|>assistant\nA <|im_end|> B<|im_end|>\n"
    controls = [(0, 12), (len(text) - 11, len(text) - 1)]
    assert [text[s:e] for s, e in assistant_spans(text, controls)] == ["A <|im_end|> B<|im_end|>"]


def test_control_tokens_inside_messages_are_text(qwen35_tokenizer):
    """A header or an <|im_end|> that a message spells neither opens nor closes a turn: as inference sees it."""
    tok = qwen35_tokenizer
    messages = [
        {"role": "user", "content": "say <|im_start|>assistant\nhi"},
        {"role": "assistant", "content": "no <|im_end|> way"},
    ]
    example = encode_chat(tok, messages)
    assert example.ids == tok.encode_chat(messages, add_generation_prompt=False)
    trained = [tok.decode(ids) for is_trained, ids in runs(example) if is_trained]
    assert trained == ["<think>\n\n</think>\n\nno <|im_end|> way<|im_end|>"]
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert example.ids.count(start) == example.ids.count(end) == 2  # the two turns' own, no more


def test_a_template_that_is_not_chatml_is_refused(qwen35_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(qwen35_tokenizer_dir / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(QwenliteError, match="data.jsonl:7: .*0 assistant headers for 1"):
        encode_chat(Tokenizer.from_dir(tmp_path), messages, where="data.jsonl:7")


CHATS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Two plus two is four."}]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris.", "reasoning_content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "The weather in Paris is sunny."}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "What is three plus three?"},
                  {"role": "assistant", "content": "Three plus three is six."}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    make_chat_checkpoint(root / "base")
    return root / "base", write_jsonl(root / "chat.jsonl", CHATS)


def test_sft_loss_falls_and_the_result_loads_in_transformers(chat_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, data = chat_checkpoint
    settings = TrainSettings(lr=3e-3, max_steps=30, batch_size=2, warmup_steps=3, log_every=100)
    history = train_sft(base, data, tmp_path / "out", settings, log=lambda r: None)
    losses = [h["loss"] for h in history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == losses

    ours = load_checkpoint(tmp_path / "out", dtype="float32").model
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    hf.config._attn_implementation = "eager"
    ids = random_ids(1, 30, seed=1)
    with torch.no_grad():
        assert max_abs_diff(ours(ids), reference_logits(hf.eval(), ids)) < 1e-4
    assert (tmp_path / "out" / "chat_template.jinja").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_max_grad_norm_zero_is_no_clipping(chat_checkpoint, tmp_path):
    """0 turns clipping off (clip_grad_norm_ with 0 would zero every gradient, and no step would change the
    weights): the steps equal those under a bound no gradient reaches."""
    base, data = chat_checkpoint
    runs = [train_sft(base, data, tmp_path / str(norm), TrainSettings(lr=1e-3, max_steps=3, max_grad_norm=norm),
                      log=lambda r: None) for norm in (0.0, 1e9)]  # fmt: skip
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_gradient_accumulation_is_one_big_batch(chat_checkpoint, tmp_path):
    """The loss is the mean over all trained tokens of a step, however they are split into micro-batches."""
    base, data = chat_checkpoint
    one = TrainSettings(lr=1e-3, max_steps=2, batch_size=4, log_every=100)
    four = TrainSettings(lr=1e-3, max_steps=2, batch_size=1, grad_accum=4, log_every=100)
    a = train_sft(base, data, tmp_path / "a", one, log=lambda r: None)
    b = train_sft(base, data, tmp_path / "b", four, log=lambda r: None)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)


BAD_DATA = {
    "malformed JSON": ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                       '{"messages": [{"role": "user", "content": "hi"}, ', ""],
    "no assistant turn": ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                          "", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}'],
    "expected a JSON object": ["[1, 2]"],
    "at least one message": ['{"messages": []}'],
}  # fmt: skip
WHERE = {"malformed JSON": 2, "no assistant turn": 3, "expected a JSON object": 1, "at least one message": 1}


@pytest.mark.parametrize("problem", BAD_DATA)
def test_bad_data_names_file_and_line_and_writes_nothing(problem, chat_checkpoint, tmp_path):
    base, _ = chat_checkpoint
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_DATA[problem])
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier result")
    args = build_parser().parse_args(
        ["train", "sft", "--model", str(base), "--data", str(data), "--out", str(out), "--lora", "2"]
    )
    with pytest.raises(QwenliteError, match=f"bad.jsonl:{WHERE[problem]}: .*{problem}"):
        args.func(args)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"an earlier result"


def test_empty_data_file(chat_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(QwenliteError, match="empty.jsonl: no conversations"):
        load_sft_data(data, None, 100)
