"""`qwenlite run`, `qwenlite chat` and `qwenlite init-random`: a loaded model answering in the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from qwenlite.cli.options import (
    add_device_flag,
    add_dtype_flag,
    add_mmproj_flag,
    add_quant_flag,
    add_speculate_flags,
)
from qwenlite.config import DTYPES, PRESETS, preset_config
from qwenlite.errors import GrammarError, QwenliteError
from qwenlite.generate import stream
from qwenlite.io.checkpoint import write_random_checkpoint
from qwenlite.io.files import atomic_write
from qwenlite.io.hub import DEFAULT_MODEL, resolve_model_path
from qwenlite.io.images import ImageProcessor
from qwenlite.io.load import generation_defaults, load_model, processors
from qwenlite.io.video import VideoProcessor, expand_vision_tokens
from qwenlite.model.vision import ImageInput, VideoInput
from qwenlite.sample import SAMPLING_FIELDS, SamplingParams
from qwenlite.speculative import decision_key, make_speculation, measured_default
from qwenlite.text.grammar import Constraint, GrammarMatcher, Grammars, json_schema
from qwenlite.text.tokenizer import ENCODE_CHAT_ARGUMENTS
from qwenlite.text.vocab import write_tokenizer_files

CHAT_HELP = (
    "Chat with a model. Commands: /image PATH and /video PATH (attach to the next message), /reset (new "
    "conversation), "
    "/think (toggle reasoning), /exit."
)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="answer one prompt and exit", description="Stream one answer to stdout.")
    run.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help=f"model (default {DEFAULT_MODEL}); '-' = stdin")
    run.add_argument("--raw", action="store_true", help="plain continuation of PROMPT, no chat template")
    run.add_argument("--image", action="append", default=[], metavar="PATH", help="an image before PROMPT (repeatable)")
    run.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video before PROMPT, after the images (repeatable; PyAV: qwenlite[video])")  # fmt: skip
    run.add_argument("--json-schema", metavar="FILE",
                     help="answer in JSON valid against this JSON schema (reasoning stays free)")  # fmt: skip
    _add_model_flags(run)
    _add_sampling_flags(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal", description=CHAT_HELP)
    chat.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    _add_model_flags(chat)
    _add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)

    init = sub.add_parser("init-random", help="write a random-weight checkpoint with real shapes")
    init.add_argument("preset", help=", ".join(PRESETS))
    init.add_argument("--layers", type=int, help="keep only the first N layers (their real shapes and attention kinds)")
    init.add_argument("outdir")
    init.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init_random)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    add_dtype_flag(p)
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    add_quant_flag(p)
    add_mmproj_flag(p)
    add_device_flag(p)
    add_speculate_flags(p)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-tokens", type=int, default=2048, help="most tokens to generate (default 2048)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument(
        "--think", action=argparse.BooleanOptionalAction, default=None, help="reasoning on/off (default: template's)"
    )
    g.add_argument("--reasoning-effort", metavar="LEVEL",
                   help="the template's reasoning_effort (Qwen3.8 templates: low, medium, xhigh)")  # fmt: skip
    g.add_argument("--preserve-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="keep earlier turns' reasoning in the history (Qwen3.6 and later templates)")  # fmt: skip
    g.add_argument("--chat-template-kwargs", metavar="JSON", type=_json_object, default={},
                   help="more variables for the chat template, as a JSON object")  # fmt: skip
    g.add_argument("--system", help="system prompt")
    g.add_argument("--verbose", "-v", action="store_true", help="timings on stderr")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"preserve_thinking\": true}'")
    return value


class Session:
    """A loaded model with its tokenizer and the sampling settings from flags over the checkpoint's."""

    def __init__(self, model_ref: str, args: argparse.Namespace):
        path = resolve_model_path(model_ref)
        self.model, self.tokenizer = load_model(path, args.dtype, args.quant, args.device, mmproj=args.mmproj)
        settings = {**generation_defaults(path), **{k: getattr(args, k) for k in SAMPLING_FIELDS}}
        settings = {k: v for k, v in settings.items() if v is not None}
        self.params = SamplingParams(**settings, seed=args.seed)
        self.params.validate()
        if reserved := sorted(ENCODE_CHAT_ARGUMENTS & set(args.chat_template_kwargs)):
            raise QwenliteError(f"--chat-template-kwargs cannot set {', '.join(reserved)}")
        if args.max_tokens < 1:
            raise QwenliteError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        k, draft = args.speculate, args.draft
        if k is None:  # the measured default, or off
            measured = measured_default(decision_key(path, args.quant, args.dtype, args.device))
            k, draft, speedup = measured or (0, draft, 0.0)
            if k and args.verbose:
                print(f"speculating by default: --speculate {k} --draft {draft} decoded {speedup:.2f}x faster in "
                      "`qwenlite bench` on this machine (--speculate 0 turns it off)", file=sys.stderr)  # fmt: skip
        self.speculation = make_speculation(path, self.model, k, draft)
        self.args = args
        self.path = path

    def load_image(self, path: str) -> ImageInput:
        return self.media_processors()[0].load(path)

    def load_video(self, path: str) -> VideoInput:
        return self.media_processors()[1].load(path)

    def media_processors(self) -> tuple[ImageProcessor, VideoProcessor]:
        """The model's image and video preprocessing (io/load.py's `processors`); an error without a tower."""
        if self.model.visual is None:
            raise QwenliteError(
                f"{self.path} reads no images or videos: it has no vision tower (a GGUF file needs its mmproj: "
                "--mmproj PATH)"
            )
        return processors(self.path, self.model, self.args.mmproj)

    def prompt_ids(
        self, messages: list[dict], think: bool | None, images: Sequence[ImageInput | VideoInput] = ()
    ) -> list[int]:
        """The messages through the checkpoint's template, with the flags' template variables (the named flags
        over --chat-template-kwargs); each image or video part's placeholder expanded for its input (`images`,
        images and videos in the messages' order). What the messages spell stays text."""
        a = self.args
        named = {"enable_thinking": think, "reasoning_effort": a.reasoning_effort,
                 "preserve_thinking": a.preserve_thinking}  # fmt: skip
        kwargs = {**a.chat_template_kwargs, **{k: v for k, v in named.items() if v is not None}}
        ids = self.tokenizer.encode_chat(messages, **kwargs)
        return expand_vision_tokens(ids, images, self.tokenizer, self.model.config) if images else ids

    def answer(
        self,
        prompt_ids: list[int],
        images: Sequence[ImageInput | VideoInput] = (),
        grammar: GrammarMatcher | None = None,
    ) -> Iterator:
        a = self.args
        return stream(self.model, self.tokenizer, prompt_ids, self.params, a.max_tokens, a.stop, a.ctx,
                      self.speculation, images, grammar)  # fmt: skip


def _read_json_schema(path: str) -> Constraint:
    """--json-schema FILE as a constraint (read before the model loads, so a bad file fails at once)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenliteError(f"cannot read --json-schema {path}: {e}") from None
    try:
        return json_schema(text)
    except GrammarError as e:
        raise GrammarError(f"--json-schema {path}: {e}") from None


def _print_stream(
    session: Session,
    prompt_ids: list[int],
    images: Sequence[ImageInput | VideoInput] = (),
    grammar: GrammarMatcher | None = None,
) -> dict:
    """Answer to stdout, reasoning to stderr (dim on a terminal); returns the assistant message."""
    dim, reset = ("\033[2m", "\033[0m") if sys.stderr.isatty() else ("", "")
    answer, reasoning = [], []
    stats = None
    try:
        for chunk in session.answer(prompt_ids, images, grammar):
            if chunk.reasoning:
                reasoning.append(chunk.reasoning)
                sys.stderr.write(dim + chunk.reasoning + reset)
                sys.stderr.flush()
            if chunk.text:
                if reasoning and not answer:
                    sys.stderr.write("\n")
                answer.append(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            stats = chunk.stats or stats
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if stats and session.args.verbose:
        print(stats.summary(), file=sys.stderr)
    message = {"role": "assistant", "content": "".join(answer)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def part(item: ImageInput | VideoInput) -> dict:
    """The content part that stands for an image or a video in a message (the template writes its placeholder)."""
    return {"type": "video"} if isinstance(item, VideoInput) else {"type": "image"}


def cmd_run(args: argparse.Namespace) -> int:
    if len(args.args) > 2:
        raise QwenliteError("run takes [MODEL] PROMPT; quote a prompt that has spaces")
    model_ref, prompt = (DEFAULT_MODEL, args.args[0]) if len(args.args) == 1 else args.args
    if prompt == "-":
        prompt = sys.stdin.read()
    if args.raw and (args.image or args.video):
        raise QwenliteError("--image and --video need the chat template, which --raw leaves out")
    constraint = _read_json_schema(args.json_schema) if args.json_schema else None
    session = Session(model_ref, args)
    images = [*map(session.load_image, args.image), *map(session.load_video, args.video)]
    if args.raw:
        ids = session.tokenizer.encode(prompt)
    else:
        content = [*map(part, images), {"type": "text", "text": prompt}] if images else prompt
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content}
        ]
        ids = session.prompt_ids(messages, args.think, images)
    grammar = None
    if constraint is not None:
        grammar = Grammars(session.tokenizer, session.model.config.vocab_size).matcher(constraint, ids)
    _print_stream(session, ids, images, grammar)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    session = Session(args.model, args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    images: list[ImageInput | VideoInput] = []  # the conversation's, in order
    attached: list[ImageInput | VideoInput] = []  # for the next message
    think = args.think
    if interactive:
        print(f"qwenlite chat: {args.model}. {CHAT_HELP} Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            messages, images, attached = list(system), [], []
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith(("/image ", "/video ")):
            kind, _, where = text.partition(" ")
            try:
                load = session.load_image if kind == "/image" else session.load_video
                attached.append(load(where.strip()))
                print(f"({kind[1:]} attached to the next message: {len(attached)})", file=sys.stderr)
            except QwenliteError as e:
                print(f"qwenlite: error: {e}", file=sys.stderr)
            continue
        if text == "/think":
            think = not (think if think is not None else False)
            print(f"(reasoning {'on' if think else 'off'})", file=sys.stderr)
            continue
        content = [*map(part, attached), {"type": "text", "text": line}] if attached else line
        messages.append({"role": "user", "content": content})
        turn_images = images + attached
        try:
            ids = session.prompt_ids(messages, think, turn_images)
            messages.append(_print_stream(session, ids, turn_images))
            images, attached = turn_images, []
        except KeyboardInterrupt:
            # The partial answer is dropped: the next turn starts from the user's message alone.
            messages.pop()
            print("(stopped)", file=sys.stderr)
        except QwenliteError as e:
            # e.g. the conversation outgrew the context: keep the session, say why this turn failed.
            messages.pop()
            print(f"qwenlite: error: {e}", file=sys.stderr)


def cmd_init_random(args: argparse.Namespace) -> int:
    from qwenlite.config import DTYPES

    config = preset_config(args.preset, args.layers, dtype=args.dtype)
    out = Path(args.outdir)
    write_random_checkpoint(config, out, DTYPES[args.dtype], seed=args.seed)
    write_tokenizer_files(out, qwen3=config.dense)
    if config.dense:  # Qwen3's vocabulary and sampling defaults
        generation = {"eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True,
                      "temperature": 0.6, "top_p": 0.95, "top_k": 20}  # fmt: skip
    else:
        generation = {"eos_token_id": [248046, 248044], "pad_token_id": 248044, "do_sample": True,
                      "temperature": 0.7, "top_p": 0.8, "top_k": 20}  # fmt: skip
    atomic_write(out / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2)))
    print(f"wrote a random {args.preset} checkpoint to {out}", file=sys.stderr)
    return 0
