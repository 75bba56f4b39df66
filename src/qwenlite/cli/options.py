"""Flags that several commands share, spelled and explained once."""

from __future__ import annotations

import argparse

from qwenlite.config import DTYPES
from qwenlite.model.quantized import QUANT_CHOICES
from qwenlite.speculative import DRAFTS


def add_dtype_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the checkpoint's)")


def add_quant_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--quant", choices=list(QUANT_CHOICES), help="quantize weights on load")


def add_mmproj_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--mmproj", metavar="PATH", help="the vision tower of a .gguf model, llama.cpp's mmproj file "
                   "(default: the only mmproj-*.gguf beside the model)")  # fmt: skip


def add_device_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_speculate_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, measured: bool = True) -> None:
    """`measured`: without --speculate the command follows what `bench` recorded (else it is off)."""
    default = ("what `qwenlite bench --speculate K` measured for this model on this machine, off if it never ran"
               if measured else "off")  # fmt: skip
    speculate = f"speculative decoding: draft K tokens (1..8) and verify them in one pass; 0 = off (default: {default})"
    p.add_argument("--speculate", type=int, metavar="K", help=speculate)
    draft = "drafts from the checkpoint's MTP head (default) or by prompt lookup"
    p.add_argument("--draft", choices=list(DRAFTS), default="mtp", help=draft)
