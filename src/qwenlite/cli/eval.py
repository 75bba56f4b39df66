"""`qwenlite perplexity`, `qwenlite eval` and `qwenlite report`: argument parsing only; the work is in eval/ and
report.py."""

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


EVAL_HELP = """Score a model on lm-evaluation-harness tasks (the harness's registry, or local YAML tasks under
--include-path) with qwenlite's engine: each multiple-choice context is prefilled once and every choice scored from
its saved state. Writes the harness's results JSON with --output-path."""


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks (accuracy, perplexity, ...)", description=EVAL_HELP)
    p.add_argument("model", help="checkpoint directory, quantized checkpoint, .gguf file or hub id")
    p.add_argument("--tasks", required=True, help="comma-separated task names (harness names or local YAML tasks)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of local task YAML files")
    p.add_argument("--limit", type=float, help="examples per task (a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--output-path", metavar="FILE", help="write the results JSON here")
    p.add_argument("--max-length", type=int, help="longest input in tokens (default: the model's context)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="reasoning on/off when the chat template is applied (default: the template's)")  # fmt: skip
    p.add_argument("--cache", metavar="PREFIX", help="cache finished requests in PREFIX*.db: a rerun resumes")
    p.add_argument("--log-samples", action="store_true", help="keep every scored sample in the results")
    p.add_argument("--batch-size", type=int, default=8, help="continuations of one context per forward (default 8)")
    add_quant_flag(p)
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from qwenlite.eval import harness  # imports lm-evaluation-harness (seconds): only for this command

    if args.limit is not None and args.limit <= 0:
        raise InvalidArgument(f"--limit must be positive, got {args.limit:g}")
    if args.max_length is not None and args.max_length < 2:
        raise InvalidArgument(f"--max-length must be at least 2, got {args.max_length}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = harness.evaluate(
        args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.output_path, args.quant, args.dtype,
        args.max_length, args.apply_chat_template, args.think, args.cache, args.log_samples, batch_size=args.batch_size,
    )  # fmt: skip
    print(harness.make_table(results))
    return 0


def add_report_command(sub: argparse._SubParsersAction) -> None:
    from qwenlite import report

    p = sub.add_parser(
        "report",
        help="quality, size and speed of a model's variants side by side (report.md, report.json, plots)",
        description=report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory, quantized checkpoint, .gguf file or hub id")
    p.add_argument("--variants", default="bf16,int8,int4", help="comma-separated (default bf16,int8,int4); the "
                   "first is the reference of the KL column")  # fmt: skip
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text for perplexity and KL")
    p.add_argument("--ctx", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (gives the density columns)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of local task YAML files")
    p.add_argument("--limit", type=float, help="examples per task")
    p.add_argument("--prompt", type=int, default=128, help="bench prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=32, help="bench decode steps (default 32)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from qwenlite import report

    if args.prompt < 1 or args.decode < 1:
        raise InvalidArgument("--prompt and --decode must be at least 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    report.report(args.model, args.variants, args.text, args.out, args.ctx, tasks, args.include_path, args.limit,
                  args.prompt, args.decode)  # fmt: skip
    print(f"wrote {args.out}/report.md, report.json and two plots")
    return 0
