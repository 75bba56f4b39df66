"""Flags that several commands share, spelled and explained once."""

from __future__ import annotations

import argparse

from qwenlite.config import DTYPES
from qwenlite.model.quantized import QUANT_CHOICES


def add_dtype_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the checkpoint's)")


def add_quant_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--quant", choices=list(QUANT_CHOICES), help="quantize weights on load")


def add_device_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
