"""Supervised fine-tuning on chat conversations, loss on the assistant's tokens only.

Data: JSONL, one conversation per line: `{"messages": [...], "tools": [...]}` (tools optional), messages in the
OpenAI shape the chat template reads (`role` system / user / assistant / tool, `content`, and on assistant turns
optionally `reasoning_content` and `tool_calls`).

Which tokens are trained. Each conversation is rendered once, whole, with the checkpoint's own chat template
(`add_generation_prompt=False`), exactly the text the model will see, and encoded as inference encodes it
(`Tokenizer.encode_chat`: a "<|im_end|>" that a message spells is text). The assistant spans are then found in that
text: each runs from the end of an `<|im_start|>assistant\\n` header to the end of the next `<|im_end|>`, both control
tokens (not text a message spells), and a token is trained when its characters (the tokenizer's offsets) lie inside
a span. So the trained text is whatever the template renders for an assistant turn: `<think>` blocks where it keeps
them, `<tool_call>` blocks, the closing `<|im_end|>`; never the header, system, user or tool turns.

Rendering prefixes (messages[:i] against messages[:i+1]) and diffing was rejected: the Qwen3.5 template is not
prefix-stable. It drops the reasoning of assistant turns before the last user message, a decision that depends on
later messages, and closes a tool turn depending on what follows it, so a prefix render differs from the text of
the full render and the labels would describe text the model never sees. The one assumption left is ChatML's
framing; a render whose header count differs from its assistant-message count is refused rather than guessed at.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import ASSISTANT_HEADER, IM_END, IM_START, ChatTemplateError, Tokenizer
from qwenlite.train.common import FINE_TUNING_BETAS, Logger, TrainSettings, make_optimizer, run_steps
from qwenlite.train.posttrain import (
    IGNORE,
    LoRASettings,
    epoch_order,
    load_for_training,
    log_line,
    pad_batch,
    pad_token_id,
    read_jsonl,
    save_result,
    token_logprobs,
)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where trained, IGNORE elsewhere (aligned with ids, not shifted)
    where: str  # "file:line", for messages about this example

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def assistant_spans(text: str, controls: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns' bodies in rendered ChatML text, each ending after its
    `<|im_end|>` (or at the end of the text for an unfinished turn). `controls` are the (start, end) spans of the
    text's control tokens: a header or an `<|im_end|>` that a message spells is text, not one of them."""
    ends = [e for s, e in controls if text[s:e] == IM_END]
    spans = []
    for s, e in controls:
        if text[s:e] == IM_START and text.startswith(ASSISTANT_HEADER, s):
            body = s + len(ASSISTANT_HEADER)
            k = bisect.bisect_left(ends, body + 1)
            spans.append((body, ends[k] if k < len(ends) else len(text)))
    return spans


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    train_from_message: int = 0,
    where: str = "",
) -> Example:
    """Render `messages` whole and label the tokens of the assistant turns at index >= `train_from_message`
    (DPO trains only the completion after a shared prompt)."""
    try:
        # As inference encodes it: control tokens where the template writes them, what messages spell as text.
        text, ids, offsets = tokenizer.encode_chat_with_offsets(messages, tools=tools, add_generation_prompt=False)
    except ChatTemplateError as e:
        raise QwenliteError(f"{where}: {e}") from None
    roles = [m.get("role") for m in messages]
    trained_turns = [i >= train_from_message for i, role in enumerate(roles) if role == "assistant"]
    framing = {tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)} - {None}
    spans = assistant_spans(text, [span for i, span in zip(ids, offsets, strict=True) if i in framing])
    if len(spans) != len(trained_turns):
        raise QwenliteError(
            f"{where}: the rendered conversation has {len(spans)} assistant headers for {len(trained_turns)} "
            f"assistant messages (the chat template does not frame turns as ChatML)"
        )
    spans = [span for span, trained in zip(spans, trained_turns, strict=True) if trained]
    labels = [IGNORE] * len(ids)
    k = 0  # spans and tokens both run left to right
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and s >= spans[k][0] and e <= spans[k][1]:
            labels[t] = ids[t]
    return Example(ids, labels, where)


def load_sft_data(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """Read, validate and encode every conversation before training starts, so that bad data fails before any
    model is loaded or file written."""
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        messages, tools = record.get("messages"), record.get("tools")
        if not isinstance(messages, list) or not messages:
            raise QwenliteError(f'{where}: expected {{"messages": [...]}} with at least one message')
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise QwenliteError(f"{where}: the conversation has no assistant turn, so nothing to train on")
        if tools is not None and not isinstance(tools, list):
            raise QwenliteError(f'{where}: "tools" must be a list')
        example = encode_chat(tokenizer, messages, tools, where=where)
        example.ids, example.labels = example.ids[:max_len], example.labels[:max_len]
        if example.n_trained == 0:
            raise QwenliteError(f"{where}: no assistant token within the first {max_len} tokens (raise --max-len)")
        examples.append(example)
    if not examples:
        raise QwenliteError(f"{path}: no conversations (the file is empty)")
    return examples


def train_sft(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    lora: LoRASettings | None = None,
    log: Logger = log_line,
) -> list[dict]:
    """Fine-tune the checkpoint at `model_path` on the conversations in `data_path`; write the result to
    `out_dir` (see `posttrain.save_result`). Returns the log records."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    settings = settings or TrainSettings()
    tokenizer = Tokenizer.from_dir(model_path)
    examples = load_sft_data(data_path, tokenizer, settings.max_len)
    pad_id = pad_token_id(tokenizer)

    torch.manual_seed(settings.seed)
    ckpt = load_for_training(model_path, settings, lora)
    model = ckpt.model
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, FINE_TUNING_BETAS)
    total_steps = settings.total_steps(len(examples))
    per_step = settings.batch_size * settings.grad_accum
    order = epoch_order(len(examples), total_steps * per_step, settings.seed)

    def train_step() -> tuple[dict, int]:  # one optimizer step's micro-batches; the loop is common.run_steps
        batch = [examples[next(order)] for _ in range(per_step)]
        n_trained = sum(ex.n_trained for ex in batch)
        loss = 0.0
        for i in range(0, per_step, settings.batch_size):  # gradient accumulation over micro-batches
            ids, labels = pad_batch([(ex.ids, ex.labels) for ex in batch[i : i + settings.batch_size]], pad_id)
            # The mean over the whole step's trained tokens, however they fall into micro-batches.
            micro_loss = -token_logprobs(model, ids, labels).sum() / n_trained
            micro_loss.backward()
            loss += micro_loss.item()
        return {"loss": loss, "trained_tokens": n_trained}, sum(len(ex.ids) for ex in batch)

    history = run_steps(model, optimizer, settings, total_steps, train_step, log)
    save_result(ckpt, out_dir, lora, history)
    return history
