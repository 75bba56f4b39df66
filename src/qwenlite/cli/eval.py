"""`qwenlite perplexity`: argument parsing only; the work is in eval/perplexity.py."""

from __future__ import annotations

import argparse
import json

from qwenlite.cli.options import add_dtype_flag, add_quant_flag
from qwenlite.config import DTYPES
from qwenlite.errors import InvalidArgument
from qwenlite.eval import perplexity
from qwenlite.model.quantized import QUANT_CHOICES


def add_perplexity_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perplexity",
        help="perplexity and bits per byte over a text file; KL divergence from a base model",
        description=perplexity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory, quantized checkpoint, .gguf file or hub id")
    p.add_argument("--file", required=True, help="the text, UTF-8")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    add_quant_flag(p)
    add_dtype_flag(p)
    p.add_argument("--base", help="compare with this model (same vocabulary): KL(base || model), top-1 agreement")
    p.add_argument("--base-quant", choices=list(QUANT_CHOICES), help="quantize the base on load")
    p.add_argument("--base-dtype", choices=list(DTYPES), help="the base's weight dtype (default: its checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args: argparse.Namespace) -> int:
    if args.base is None and (args.base_quant or args.base_dtype):
        raise InvalidArgument("--base-quant and --base-dtype need --base (which may be MODEL itself)")
    result = perplexity.perplexity(
        args.model, args.file, args.ctx, args.dtype, args.quant, args.base, args.base_dtype, args.base_quant
    )
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0
