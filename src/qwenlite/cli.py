"""`qwenlite <command>`: wires the library together; holds no model logic.

Errors caused by the user's input print one line and exit non-zero; set QWENLITE_DEBUG=1 for tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.hub import DEFAULT_MODEL


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: checkpoint's)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument("--quant", choices=["int8", "int4"], help="quantize weights on load")


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
    g.add_argument("--system", help="system prompt")
    g.add_argument("--verbose", "-v", action="store_true", help="timings on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlite", description="Run Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="answer one prompt and exit", description="Stream one answer to stdout.")
    run.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help=f"model (default {DEFAULT_MODEL}); '-' = stdin")
    run.add_argument("--raw", action="store_true", help="plain continuation of PROMPT, no chat template")
    _add_model_flags(run)
    _add_sampling_flags(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal", description=CHAT_HELP)
    chat.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    _add_model_flags(chat)
    _add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)

    init = sub.add_parser("init-random", help="write a random-weight checkpoint with real shapes")
    init.add_argument("preset", help="qwen3.5-0.8b, qwen3.5-2b, qwen3.5-4b, qwen3.5-9b or tiny")
    init.add_argument("outdir")
    init.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init_random)

    # Each of these modules declares its own command; this file only lists them.
    from qwenlite.bench import add_bench_command
    from qwenlite.gguf import add_convert_command
    from qwenlite.quant import add_quantize_command
    from qwenlite.server import add_serve_command
    from qwenlite.train.cli import add_train_commands
    from qwenlite.train.post_cli import add_post_train_commands

    add_serve_command(sub)
    add_convert_command(sub)
    add_quantize_command(sub)
    add_bench_command(sub)
    add_post_train_commands(add_train_commands(sub))
    return parser


CHAT_HELP = "Chat with a model. Commands: /reset (new conversation), /think (toggle reasoning), /exit."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenliteError as e:
        print(f"qwenlite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never show a user a traceback unless asked
        if os.environ.get("QWENLITE_DEBUG"):
            raise
        hint = "(QWENLITE_DEBUG=1 shows the traceback)"
        print(f"qwenlite: internal error: {type(e).__name__}: {e} {hint}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
# Commands


class Session:
    """A loaded model with its tokenizer and the sampling settings from flags over the checkpoint's."""

    def __init__(self, model_ref: str, args: argparse.Namespace):
        from qwenlite.generate import SAMPLING_FIELDS, generation_defaults
        from qwenlite.gguf_import import load_any
        from qwenlite.hub import resolve_model_path
        from qwenlite.sample import SamplingParams

        path = resolve_model_path(model_ref)
        self.model, self.tokenizer = load_any(path, args.dtype, args.quant)
        settings = {**generation_defaults(path), **{k: getattr(args, k) for k in SAMPLING_FIELDS}}
        settings = {k: v for k, v in settings.items() if v is not None}
        self.params = SamplingParams(**settings, seed=args.seed)
        try:
            self.params.validate()
        except ValueError as e:
            raise QwenliteError(str(e)) from None
        if args.max_tokens < 1:
            raise QwenliteError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        self.args = args

    def prompt_ids(self, messages: list[dict], think: bool | None) -> list[int]:
        kwargs = {} if think is None else {"enable_thinking": think}
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, **kwargs))

    def answer(self, prompt_ids: list[int]) -> Iterator:
        from qwenlite.generate import stream

        a = self.args
        return stream(self.model, self.tokenizer, prompt_ids, self.params, a.max_tokens, a.stop, a.ctx)


def _print_stream(session: Session, prompt_ids: list[int]) -> dict:
    """Answer to stdout, reasoning to stderr (dim on a terminal); returns the assistant message."""
    dim, reset = ("\033[2m", "\033[0m") if sys.stderr.isatty() else ("", "")
    answer, reasoning = [], []
    stats = None
    try:
        for chunk in session.answer(prompt_ids):
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


def cmd_run(args: argparse.Namespace) -> int:
    if len(args.args) > 2:
        raise QwenliteError("run takes [MODEL] PROMPT; quote a prompt that has spaces")
    model_ref, prompt = (DEFAULT_MODEL, args.args[0]) if len(args.args) == 1 else args.args
    if prompt == "-":
        prompt = sys.stdin.read()
    session = Session(model_ref, args)
    if args.raw:
        ids = session.tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = session.prompt_ids(messages, args.think)
    _print_stream(session, ids)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    session = Session(args.model, args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
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
            messages = list(system)
            print("(new conversation)", file=sys.stderr)
            continue
        if text == "/think":
            think = not (think if think is not None else False)
            print(f"(reasoning {'on' if think else 'off'})", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages.append(_print_stream(session, session.prompt_ids(messages, think)))
        except KeyboardInterrupt:
            # The partial answer is dropped: the next turn starts from the user's message alone.
            messages.pop()
            print("(stopped)", file=sys.stderr)
        except QwenliteError as e:
            # e.g. the conversation outgrew the context: keep the session, say why this turn failed.
            messages.pop()
            print(f"qwenlite: error: {e}", file=sys.stderr)


def cmd_init_random(args: argparse.Namespace) -> int:
    from qwenlite.config import DTYPES, preset_config
    from qwenlite.tokenizer import write_tokenizer_files
    from qwenlite.weights import atomic_write, write_random_checkpoint

    config = preset_config(args.preset, dtype=args.dtype)
    out = Path(args.outdir)
    write_random_checkpoint(config, out, DTYPES[args.dtype], seed=args.seed)
    write_tokenizer_files(out)
    generation = {"eos_token_id": [248046, 248044], "pad_token_id": 248044, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.8, "top_k": 20}  # fmt: skip
    atomic_write(out / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2)))
    print(f"wrote a random {args.preset} checkpoint to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
