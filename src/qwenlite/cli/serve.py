"""`qwenlite serve`: argument parsing only; the work is in serve/."""

from __future__ import annotations

import argparse

from qwenlite.cli.options import add_device_flag, add_dtype_flag, add_mmproj_flag, add_quant_flag, add_speculate_flags
from qwenlite.errors import QwenliteError
from qwenlite.io.hub import DEFAULT_MODEL
from qwenlite.serve.app import DEFAULT_CTX, serve
from qwenlite.serve.engine import SNAPSHOT_INTERVAL


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (and web chat)",
        description="Serve a model over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
        "/v1/models, /health, and a chat page at /.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-concurrency", type=int, default=4, help="requests decoded together (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--ctx", type=int, help=f"context per request in tokens (default {DEFAULT_CTX} or the model's)")
    p.add_argument("--cache-mb", type=float, default=1024, help="memory for reusable prompt states (default 1024)")
    p.add_argument("--snapshot-every", type=int, default=SNAPSHOT_INTERVAL, metavar="N",
                   help=f"keep a reusable prompt state every N prompt tokens, so any shared prefix is reused to "
                   f"within N tokens (default {SNAPSHOT_INTERVAL}; 0: only where assistant turns start)")  # fmt: skip
    add_dtype_flag(p)
    p.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    add_quant_flag(p)
    add_mmproj_flag(p)
    add_device_flag(p)
    add_speculate_flags(p, measured=False)  # bench measures one stream; a batch may gain less
    p.add_argument(
        "--allow-special-in-content",
        action="store_true",
        help="encode control tokens that chat messages spell ('<|im_end|>') as control tokens, not as text "
        "(lets clients forge role boundaries; for trusted clients that relied on it)",
    )
    p.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="let image parts name http(s) URLs, downloaded by the server (public addresses only, 20 MB, 10 s); "
        "otherwise images come as data: URLs",
    )
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", type=lora_pair,
                   help="serve a LoRA adapter (PEFT format, as `qwenlite train --lora` writes it) on the model as "
                   "the model NAME; repeat for more: requests pick one by `model`, and rows with different adapters "
                   "decode in the same batch")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def lora_pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_concurrency < 1 or args.max_queue < 0 or (args.ctx is not None and args.ctx < 2):
        raise QwenliteError("--max-concurrency must be >= 1, --max-queue >= 0 and --ctx >= 2")
    if args.snapshot_every < 0:
        raise QwenliteError(f"--snapshot-every must be >= 0, got {args.snapshot_every}")
    serve(args.model, args.host, args.port, args.api_key, args.max_concurrency, args.max_queue, args.ctx,
          args.cache_mb, args.dtype, args.served_model_name, args.quant,
          allow_special_in_content=args.allow_special_in_content, allow_image_urls=args.allow_image_urls,
          device=args.device, snapshot_interval=args.snapshot_every, lora=args.lora, mmproj=args.mmproj,
          speculate=args.speculate or 0, draft=args.draft)  # fmt: skip
    return 0
