"""`qwenlite quantize` and `qwenlite convert`: argument parsing only; the work is in io/quantized.py and
io/gguf_export.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenlite.config import DTYPES, load_config
from qwenlite.io.checkpoint import match_vision
from qwenlite.io.gguf_export import FILE_TYPES, export_gguf, gguf_metadata
from qwenlite.io.gguf_mmproj import export_mmproj, mmproj_path
from qwenlite.io.hub import resolve_model_path
from qwenlite.io.quantized import quantize_checkpoint


def add_quantize_command(subparsers) -> argparse.ArgumentParser:
    """`qwenlite quantize MODEL OUT --bits 4|8 [--group-size G]`."""
    p = subparsers.add_parser(
        "quantize",
        help="write an int8 or int4 weight-only quantized checkpoint",
        description="Quantize every linear layer and the embedding of MODEL and write the result to OUT, "
        "a checkpoint that `qwenlite run OUT` loads memory-mapped.",
    )
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale (default: int8 one per output channel, int4 128)")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of the scales and unquantized tensors (default: the checkpoint's)")  # fmt: skip
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    out = quantize_checkpoint(resolve_model_path(args.model), args.out, args.bits, args.group_size, dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_convert_command(subparsers) -> argparse.ArgumentParser:
    """`qwenlite convert MODEL --to gguf OUT [--dtype f16]`."""
    p = subparsers.add_parser(
        "convert",
        help="write a checkpoint in another format (GGUF for llama.cpp)",
        description="Write MODEL as one GGUF file with llama.cpp's tensor names and conventions for its family "
        "(qwen35, qwen35moe, qwen3, qwen2); a Qwen3.5 checkpoint's MTP head goes in as the nextn tail block that "
        "llama.cpp's --spec-type draft-mtp reads. A checkpoint with a vision tower also gets llama.cpp's mmproj "
        "file beside OUT, mmproj-<name>-F16.gguf (F32 / BF16 / Q8_0 with that --dtype), which llama-mtmd-cli --mmproj "
        "and qwenlite run read.",
    )
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("--to", choices=["gguf"], required=True, help="output format")
    p.add_argument("out", help="output file, e.g. model-f16.gguf")
    p.add_argument("--dtype", choices=list(FILE_TYPES), default="f16", help="type of the weight matrices (default f16)")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    root = resolve_model_path(args.model)
    out = export_gguf(root, args.out, args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    if match_vision(root, load_config(root))[0]:
        name = gguf_metadata(root, None, 0).name
        mmproj = export_mmproj(root, mmproj_path(Path(args.out), name, args.dtype), args.dtype)
        print(f"wrote {mmproj}", file=sys.stderr)
    return 0
