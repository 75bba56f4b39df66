"""`qwenlite <command>`: wires the library together; holds no model logic. Each command group's flags live in a
module of its own beside this one.

Errors caused by the user's input print one line and exit non-zero; set QWENLITE_DEBUG=1 for tracebacks."""

from __future__ import annotations

import argparse
import os
import sys

from qwenlite.cli.bench import add_bench_command
from qwenlite.cli.convert import add_convert_command, add_quantize_command
from qwenlite.cli.eval import add_eval_command, add_perplexity_command, add_report_command
from qwenlite.cli.run import add_run_commands
from qwenlite.cli.serve import add_serve_command
from qwenlite.cli.train import add_train_commands
from qwenlite.errors import QwenliteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlite", description="Run Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(sub)
    add_serve_command(sub)
    add_convert_command(sub)
    add_quantize_command(sub)
    add_bench_command(sub)
    add_train_commands(sub)
    add_perplexity_command(sub)
    add_eval_command(sub)
    add_report_command(sub)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
