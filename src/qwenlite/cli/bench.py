"""`qwenlite bench`: argument parsing only; the work is in bench.py."""

from __future__ import annotations

import argparse
import json

from qwenlite import bench
from qwenlite.cli.options import add_device_flag, add_dtype_flag, add_quant_flag, add_speculate_flags
from qwenlite.errors import QwenliteError


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure prefill, decode, memory and the bandwidth limit",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory, quantized checkpoint, .gguf file or hub id")
    add_quant_flag(p)
    add_dtype_flag(p)
    add_device_flag(p)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode", type=int, default=128, help="decode steps (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the best counts (default 3)")
    p.add_argument("--threads", type=int, help="threads (default: torch's, one per core)")
    add_speculate_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    for name in ("prompt", "decode", "repeat"):
        if getattr(args, name) < 1:
            raise QwenliteError(f"--{name} must be at least 1, got {getattr(args, name)}")
    result = bench.bench(args.model, args.quant, args.dtype, args.prompt, args.decode, args.repeat, args.threads,
                         args.device, args.speculate or 0, args.draft)  # fmt: skip
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0
