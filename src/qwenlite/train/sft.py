"""Supervised fine-tuning on chat conversations, loss on the assistant's tokens only.

Data: JSONL, one conversation per line: `{"messages": [...], "tools": [...]}` (tools optional), messages in the
OpenAI shape the chat template reads (`role` system / user / assistant / tool, `content`, and on assistant turns
optionally `reasoning_content` and `tool_calls`).

Images and videos. A user or tool message's content may be a list of OpenAI parts, `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` and vLLM's `{"type": "video_url", "video_url": {"url": ...}}` (the
shapes the server reads), the url a base64 `data:` URL or a file path, relative to the JSONL file's folder (a
training set travels with its images) or absolute. http(s) URLs are refused: a training run should not depend on the
network. An assistant message holds neither: the model is trained to write text. Every image and video is decoded
and preprocessed (io/images.py, io/video.py with PyAV: the checkpoint's preprocessor_config.json and
video_preprocessor_config.json) before training starts, and kept in memory; its tokens (an image's `<|image_pad|>`
run; a video's `<t seconds>` labels and `<|video_pad|>` runs, one per temporal patch) are context, never trained. A
row with images or videos runs through the model alone, its features and multimodal rotary positions taken as
inference takes them (model/vision.embed_prompt); rows without are padded together as before. The tower is frozen
(no gradient reaches it) unless `train_vision`, and is saved with the result.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlite.config import ModelConfig, load_config
from qwenlite.errors import QwenliteError
from qwenlite.io.images import ImageProcessor, data_url_bytes
from qwenlite.io.video import VideoProcessor, expand_vision_tokens
from qwenlite.model.vision import ImageInput, VideoInput
from qwenlite.text.tokenizer import ASSISTANT_HEADER, IM_END, IM_START, ChatTemplateError, Tokenizer
from qwenlite.train.common import FINE_TUNING_BETAS, Logger, TrainSettings, make_optimizer, run_steps
from qwenlite.train.moe import aux_loss_enabled
from qwenlite.train.posttrain import (
    IGNORE,
    LoRASettings,
    epoch_order,
    forward_logprobs,
    load_for_training,
    log_line,
    pad_batch,
    pad_token_id,
    read_jsonl,
    save_result,
)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where trained, IGNORE elsewhere (aligned with ids, not shifted)
    where: str  # "file:line", for messages about this example
    # Images and videos filling the `<|image_pad|>` / `<|video_pad|>` runs of ids, in order.
    images: list[ImageInput | VideoInput] = field(default_factory=list)

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
    (DPO trains only the completion after a shared prompt). Image and video parts must have been read (`read_media`)."""
    if any(
        isinstance(p, dict) and p.get("type") in ("image_url", "video_url")
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
    ):
        raise QwenliteError(f"{where}: image and video parts are read only by `train sft` (of a model with a tower)")
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


@dataclass
class VisionReader:
    """What reads the images and videos of a model with a vision tower and places them in a prompt."""

    images: ImageProcessor
    videos: VideoProcessor
    tokenizer: Tokenizer  # a video's tokens hold its frames' times as text
    config: ModelConfig  # the placeholder token ids

    @classmethod
    def from_dir(cls, path: str | Path, tokenizer: Tokenizer, config: ModelConfig) -> VisionReader:
        """The checkpoint's preprocessor_config.json and video_preprocessor_config.json (or the tower's defaults)."""
        vision = config.vision_config
        return cls(ImageProcessor.from_dir(path, vision), VideoProcessor.from_dir(path, vision), tokenizer, config)

    def read(self, kind: str, url: str, folder: Path) -> ImageInput | VideoInput:
        """The image or video (`kind`) at `url`: a data: URL, or a path relative to `folder` (or absolute)."""
        processor = self.videos if kind == "video" else self.images
        if url.startswith("data:"):
            return processor.load(data_url_bytes(url, kind=kind), name=f"the data: URL {kind}")
        if "://" in url:
            raise QwenliteError(
                f"{kind} URLs are not fetched for training ({url.partition('://')[0]}://...): save the {kind} and "
                "give its path, relative to the data file, or a data: URL"
            )
        return processor.load(folder / url)

    def expand(self, placeholder: int, media: ImageInput | VideoInput) -> list[int]:
        """The tokens that stand for `media` where the template wrote its one `placeholder`."""
        return expand_vision_tokens([placeholder], [media], self.tokenizer, self.config)


PARTS = {"image_url": "image", "video_url": "video"}  # an OpenAI part -> the template's placeholder part


def read_media(
    messages: list, folder: Path, reader: VisionReader | None, where: str
) -> tuple[list, list[ImageInput | VideoInput]]:
    """The messages with each `image_url` / `video_url` part as the template's placeholder, and those images and
    videos read and preprocessed, in order (see the module docstring for what a url may be)."""
    out, media = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(part)
                continue
            at = f"{where}: message {i}"
            if kind not in PARTS:
                raise QwenliteError(f"{at}: content parts are text, image_url or video_url, got {kind or part!r}")
            what = PARTS[kind]
            a_what = ("an " if what == "image" else "a ") + what
            if message.get("role") == "assistant":
                raise QwenliteError(f"{at}: an assistant message holds no {what} (they go in user messages)")
            if reader is None:
                raise QwenliteError(
                    f"{at}: {a_what}, which this model or command does not read (`train sft` of a "
                    "model with a vision tower does)"
                )
            url = part[kind].get("url") if isinstance(part.get(kind), dict) else None
            if not isinstance(url, str):
                raise QwenliteError(f'{at}: {a_what}_url part needs {{"{kind}": {{"url": ...}}}}')
            try:
                media.append(reader.read(what, url, folder))
            except QwenliteError as e:
                raise type(e)(f"{at}: {e}") from None
            parts.append({"type": what})  # the template writes a placeholder per part; it needs no URL
        out.append({**message, "content": parts})
    return out, media


def place_media(example: Example, media: list[ImageInput | VideoInput], reader: VisionReader, max_len: int) -> None:
    """Expand each image's and video's one placeholder to its tokens (labels: context) and cut the example to
    `max_len`, dropping the inputs whose tokens lie after the cut; an input whose pad tokens the cut would split is
    refused."""
    c = reader.config
    placeholders = {c.image_token_id, c.video_token_id} - {None}
    found = sum(i in placeholders for i in example.ids)
    if found != len(media):
        raise QwenliteError(f"{example.where}: the chat template wrote {found} image and video placeholders for "
                            f"{len(media)} image and video parts")  # fmt: skip
    ids, labels, pads = [], [], []  # pads: each input's first and last pad token + 1
    pending = iter(media)
    for i, label in zip(example.ids, example.labels, strict=True):
        if i not in placeholders:
            ids.append(i)
            labels.append(label)
            continue
        run = reader.expand(i, next(pending))  # an image's pads; a video's times and pads, per temporal patch
        where = [len(ids) + k for k, t in enumerate(run) if t == i]
        pads.append((where[0], where[-1] + 1))
        ids += run
        labels += [IGNORE] * len(run)  # placeholders sit in user turns: context, never trained
    for (start, end), m in zip(pads, media, strict=True):
        if start < max_len < end:
            what = "a video's" if isinstance(m, VideoInput) else "an image's"
            raise QwenliteError(f"{example.where}: --max-len {max_len} cuts {what} tokens (raise --max-len)")
    example.ids, example.labels = ids[:max_len], labels[:max_len]
    example.images = [m for m, (s, _) in zip(media, pads, strict=True) if s < max_len]


def load_sft_data(
    path: str | Path,
    tokenizer: Tokenizer,
    max_len: int,
    vision: VisionReader | None = None,
) -> list[Example]:
    """Read, validate and encode every conversation (and read its images and videos, through `vision`, None for a
    model without a vision tower) before training starts, so that bad data fails before any model is loaded or file
    written."""
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
        messages, media = read_media(messages, Path(path).parent, vision, where)
        example = encode_chat(tokenizer, messages, tools, where=where)
        if media:
            place_media(example, media, vision, max_len)
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
    train_vision: bool = False,
) -> list[dict]:
    """Fine-tune the checkpoint at `model_path` on the conversations in `data_path`; write the result to
    `out_dir` (see `posttrain.save_result`). `train_vision`: the vision tower's weights train too (not with
    LoRA). Returns the log records."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    settings = settings or TrainSettings()
    config = load_config(model_path)
    if train_vision and config.vision_config is None:
        raise QwenliteError(f"--train-vision: {model_path} has no vision tower")
    if train_vision and lora is not None:
        raise QwenliteError("--train-vision trains the tower's own weights, which a LoRA adapter does not hold: "
                            "drop --lora or --train-vision")  # fmt: skip
    tokenizer = Tokenizer.from_dir(model_path)
    vision = VisionReader.from_dir(model_path, tokenizer, config) if config.vision_config else None
    examples = load_sft_data(data_path, tokenizer, settings.max_len, vision)
    pad_id = pad_token_id(tokenizer)

    torch.manual_seed(settings.seed)
    ckpt = load_for_training(model_path, settings, lora, train_vision)
    model = ckpt.model
    if model.visual is None and (ex := next((ex for ex in examples if ex.images), None)):
        raise QwenliteError(f"{ex.where}: an image or a video, but {model_path} holds no vision tower weights")
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, FINE_TUNING_BETAS)
    total_steps = settings.total_steps(len(examples))
    per_step = settings.batch_size * settings.grad_accum
    order = epoch_order(len(examples), total_steps * per_step, settings.seed)

    def train_step() -> tuple[dict, int]:  # one optimizer step's micro-batches; the loop is common.run_steps
        batch = [examples[next(order)] for _ in range(per_step)]
        n_trained = sum(ex.n_trained for ex in batch)
        loss = aux_loss = 0.0
        for i in range(0, per_step, settings.batch_size):  # gradient accumulation over micro-batches
            micro = batch[i : i + settings.batch_size]
            # A row with images or videos runs alone (its features and rotary positions are its own); the others padded.
            plain = [ex for ex in micro if not ex.images]
            for rows in [[ex] for ex in micro if ex.images] + ([plain] if plain else []):
                ids, labels = pad_batch([(ex.ids, ex.labels) for ex in rows], pad_id)
                logps, aux = forward_logprobs(model, ids, labels, rows[0].images, [len(ex.ids) for ex in rows])
                # The mean over the whole step's trained tokens, however they fall into micro-batches.
                micro_loss = -logps.sum() / n_trained
                loss += micro_loss.item()
                if aux is not None:  # a MoE's load-balancing loss (train/moe.py), its mean over the step's rows
                    aux = aux * len(rows) / per_step
                    aux_loss += aux.item()
                    micro_loss = micro_loss + model.config.router_aux_loss_coef * aux
                micro_loss.backward()
        fields = {"loss": loss, **({"aux_loss": aux_loss} if aux_loss_enabled(model.config) else {})}
        return {**fields, "trained_tokens": n_trained}, sum(len(ex.ids) for ex in batch)

    history = run_steps(model, optimizer, settings, total_steps, train_step, log)
    save_result(ckpt, out_dir, lora, history)
    return history
