"""The NEON kernels (ops/cpu/neon.c) on an x86 machine: tests/kernels_driver.c runs every exported kernel on the same
deterministic inputs, built twice with the flags kernels.py builds the library with, once natively with avx2.c and
once with Debian's AArch64 cross compiler with neon.c (a static binary run under qemu-user), and the two builds'
outputs are compared case by case. avx2.c is itself held to the torch twins by test_kernels.py, so agreement with it
checks NEON against the reference, transitively. On an AArch64 machine this file skips and test_kernels.py runs the
neon kernels natively against the twins (neon is then a runnable instruction set).

The cases: GEMVs over bf16 / fp32 weights with K = 1024 (the 0.8B's hidden size; N cut to 384 to keep qemu quick)
and K not a multiple of 16, int8 (groups 16, 32, K) and int4 (groups 32, 128) with fp32 and bf16 activations, 1, 3,
5 and 8 rows; dequantization; RMSNorm (rows of a wider tensor included); Gated DeltaNet and attention tokens (the
0.8B's head shapes and small ones, gated and not) over three steps; the prompt's conv + SiLU in three pieces; the
whole decode step (step.h) on a two-layer model in fp32, bf16, and int8 / int4 weights, with Qwen2's attention
(biases, no q/k norms) and with MoE MLPs; the bandwidth probe.

Tolerances (max |neon - avx2| / max |avx2|), test_kernels.py's against the twins:
- fp32 outputs 1e-5 (the summation order: 4 lanes against 8), the recurrent state too;
- bf16 outputs 1e-2 (a value near a rounding boundary may land one bf16 step apart; avx2 multiplies int8 / int4
  weights with bf16 activations in integers, neon in fp32: both within bf16's rounding of the reference);
- the whole decode step with bf16 activations 3e-2: such one-step differences pass through two layers, as in
  test_kernels.py's model test;
- dequantization, the conv state and the value cache bitwise.
Measured: fp32 <= 8e-7, bf16 <= 2.6e-3, the bf16 step <= 1.3e-2.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from qwenlite.ops.cpu import kernels

CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DRIVER = Path(__file__).with_name("kernels_driver.c")
SOURCES = Path(kernels.__file__).parent

NO_TOOLS = "needs Debian's AArch64 cross compiler and qemu-user: apt-get install gcc-aarch64-linux-gnu qemu-user"
NO_AVX2 = "compared with avx2.c's build, which this CPU cannot run (on AArch64 test_kernels.py runs neon natively)"
pytestmark = [
    pytest.mark.skipif(not (shutil.which(CROSS_CC) and shutil.which(QEMU)), reason=NO_TOOLS),
    pytest.mark.skipif("avx2" not in kernels.runnable_isas(), reason=NO_AVX2),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
STEP_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
FAMILIES = ["gemv", "int8", "int4", "dequant", "rmsnorm", "gdn", "attn", "conv", "step", "read"]


def build(cc: str, isa: str, out: Path, *extra: str) -> Path:
    """The driver linked with `isa`'s kernels, compiled as kernels.py compiles the library (as a program)."""
    flags = [f for f in kernels.CFLAGS if f not in ("-shared", "-fPIC")] + kernels.ISAS[isa][2]
    argv = [cc, *flags, *extra, "-I", str(SOURCES), str(DRIVER), str(SOURCES / f"{isa}.c"), "-o", str(out), "-lm"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def records(data: bytes) -> list[tuple[str, torch.Tensor, bool]]:
    """The driver's output: (name, values, bitwise) per output array (its header comment has the format)."""
    out, off = [], 0
    while off < len(data):
        name, bf16, exact, n = struct.unpack_from("<48siiq", data, off)
        off += 64
        dtype = torch.bfloat16 if bf16 else torch.float32
        size = n * dtype.itemsize
        values = torch.frombuffer(bytearray(data[off : off + size]), dtype=dtype) if n else torch.empty(0, dtype=dtype)
        out.append((name.rstrip(b"\0").decode(), values, bool(exact)))
        off += size
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, list]:
    """Both builds' outputs, by instruction set."""
    tmp = tmp_path_factory.mktemp("neon")
    x86 = build(os.environ.get("CC", "cc"), "avx2", tmp / "driver-avx2")
    arm = build(CROSS_CC, "neon", tmp / "driver-neon", "-static")
    runs = {"avx2": [str(x86)], "neon": [QEMU, str(arm)]}
    got = {}
    for isa, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        got[isa] = records(done.stdout)
    return got


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return ((fast.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def test_the_builds_are_the_two_instruction_sets(outputs):
    assert outputs["avx2"][0][0] == "isa:avx2" and outputs["neon"][0][0] == "isa:neon"
    assert [r[0] for r in outputs["avx2"]][1:] == [r[0] for r in outputs["neon"]][1:]
    assert {r[0].split()[0].split("_")[0] for r in outputs["neon"][1:]} == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_neon_matches_avx2(outputs, family):
    """Every output of the family's cases within its tolerance (bitwise where exact), all failures listed at once."""
    failures, cases = [], 0
    for (name, ref, exact), (_, fast, _) in zip(outputs["avx2"][1:], outputs["neon"][1:], strict=True):
        if name.split()[0].split("_")[0] != family:
            continue
        cases += 1
        assert fast.shape == ref.shape and fast.dtype == ref.dtype, name
        if exact:
            bits = torch.int16 if ref.dtype == torch.bfloat16 else torch.int32
            if not torch.equal(fast.view(bits), ref.view(bits)):
                failures.append(f"{name}: not bitwise equal")
            continue
        bound = (STEP_TOLERANCE if family == "step" else TOLERANCE)[ref.dtype]
        if not relative_error(fast, ref) <= bound:  # NaN fails too
            failures.append(f"{name}: {relative_error(fast, ref):.2e} > {bound:.0e}")
    assert cases and not failures, "\n".join(failures)
