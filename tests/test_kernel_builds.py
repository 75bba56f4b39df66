"""Every kernel file's builds on an x86 machine, output by output: tests/kernels_driver.c runs every exported kernel
on the same deterministic inputs, linked natively with avx2.c, with avx2.c built for AVX-VNNI, with avx512.c, and, by
Debian's AArch64 cross compiler, with neon.c (static binaries run under qemu-user), the kernels compiled with the
flags kernels.py builds the library with, and the builds' outputs are compared case by case with avx2.c's. neon.c
is built both ways kernels.target_flags can build it: for ARMv8.2 with dotprod (run on qemu's `max` CPU, which has
it), and for plain ARMv8.0 (run on a Cortex-A57, which lacks dotprod, so an sdot left in that build would stop it;
it runs only the families that differ between the builds: int8, int4 and the decode step). The AVX-VNNI and
AVX-512 builds run natively where the CPU has those, else with the instructions emulated by SIMDe
(tests/avx_vnni_emulation.h, tests/avx512_emulation.h; Debian's libsimde-dev). avx2.c is itself held to the torch
twins by test_kernels.py, so agreement with it checks the others against the reference, transitively. On an AArch64
machine this file skips and test_kernels.py runs the neon kernels natively against the twins (neon is then a
runnable instruction set).

The cases: GEMVs over bf16 / fp32 weights with K = 1024 (the 0.8B's hidden size; N cut to 384 to keep qemu quick)
and K not a multiple of 16, int8 (groups 16, 32, K) and int4 (groups 32, 128) with fp32 and bf16 activations, 1, 3,
5 and 8 rows, and bf16 rows with an inf and a NaN; dequantization; RMSNorm (rows of a wider tensor included); Gated
DeltaNet and attention tokens (the 0.8B's head shapes and small ones, gated and not) over three steps; the prompt's
conv + SiLU in three pieces; the whole decode step (step.h) on a two-layer model in fp32, bf16, and int8 / int4
weights (one token a row, then a tracked step of three tokens a row and its rewind, then an MTP head's step with its
prelude and its greedy drafts), with Qwen2's attention
(biases, no q/k norms) and with MoE MLPs; the bandwidth probe.

Tolerances (max |build - avx2| / max |avx2|), test_kernels.py's against the twins:
- fp32 outputs 1e-5 (the summation order: 4 or 16 lanes against 8), the recurrent state too;
- bf16 outputs 1e-2 (a value near a rounding boundary may land one bf16 step apart), the whole decode step too;
- the int8 and int4 GEMVs with bf16 activations bitwise in both NEON builds and the AVX-VNNI one: the same quantized
  activations, exact integer sums (sdot, smlal or vpdpbusd there, vpmaddwd / vpmaddubsw in avx2.c) kept in the same
  lanes or reaching the same fp32 steps per row; NaN in the same places (the rows with an inf or a NaN, all of
  them); in the AVX-512 build within the tolerances above (the same integer sums, summed in fp32 over 16 lanes);
- dequantization, the conv state, the value cache and the greedy drafts bitwise.
Measured: fp32 <= 1.3e-6, bf16 <= 3e-3, the bf16 step bitwise (0).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import x86_emulation

from qwenlite.ops.cpu import kernels

CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DRIVER = Path(__file__).with_name("kernels_driver.c")
SOURCES = Path(kernels.__file__).parent

NO_TOOLS = ("needs Debian's AArch64 cross compiler, qemu-user and SIMDe: apt-get install gcc-aarch64-linux-gnu "
            "qemu-user libsimde-dev")  # fmt: skip
NO_AVX2 = "compared with avx2.c's build, which this CPU cannot run (on AArch64 test_kernels.py runs neon natively)"
pytestmark = [
    pytest.mark.skipif(
        not (shutil.which(CROSS_CC) and shutil.which(QEMU) and x86_emulation.SIMDE.exists()), reason=NO_TOOLS
    ),
    pytest.mark.skipif("avx2" not in kernels.runnable_isas(), reason=NO_AVX2),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
FAMILIES = ["gemv", "int8", "int4", "dequant", "rmsnorm", "gdn", "attn", "conv", "delta", "step", "read"]
# neon.c's builds: target flags, the qemu CPU, and the driver families run (all when empty)
NEON_BUILDS = {
    "neon": (kernels.target_flags("neon", frozenset({"asimddp"})), "max", []),
    "neon-v8.0": (kernels.target_flags("neon", frozenset()), "cortex-a57", ["int8", "int4", "step"]),
}


# x86 builds besides avx2.c's own: kernel file and target flags, natively where the CPU has the features
HAS = kernels._cpuinfo()[1]
X86_BUILDS = {
    "avx2-vnni": ("avx2", kernels.UPGRADES["avx2"][1] if "avx_vnni" in HAS else x86_emulation.AVX_VNNI),
    "avx512": ("avx512", kernels.ISAS["avx512"][2] if not kernels.missing_features("avx512")
               else x86_emulation.AVX512),
}  # fmt: skip
DRIVER_FLAGS = ["-O1", "-std=c11", "-ffp-contract=off"]  # it only makes the inputs and writes the outputs


def popen(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def build(cc: str, isa: str, target: list[str], out: Path) -> list[subprocess.Popen]:
    """Starts compiling `isa`'s kernels as kernels.py compiles the library (for `target`), and the driver, into
    objects beside `out`."""
    flags = [f for f in kernels.CFLAGS if f not in ("-shared", "-fPIC")] + target
    kernel = [cc, *flags, "-c", str(SOURCES / f"{isa}.c"), "-o", f"{out}.k.o"]
    driver = [cc, *DRIVER_FLAGS, "-I", str(SOURCES), "-c", str(DRIVER), "-o", f"{out}.d.o"]
    return [popen(kernel), popen(driver)]


def link(cc: str, out: Path, *extra: str) -> None:
    argv = [cc, "-fopenmp", *extra, f"{out}.d.o", f"{out}.k.o", "-o", str(out), "-lm"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


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


def family(name: str) -> str:
    return name.split()[0].split("_")[0]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, list]:
    """The builds' outputs, by name ("avx2", "avx2-vnni", "avx512", "neon", "neon-v8.0"); they compile at once."""
    tmp = tmp_path_factory.mktemp("builds")
    native = os.environ.get("CC", "cc")
    x86 = {"avx2": ("avx2", kernels.ISAS["avx2"][2]), **X86_BUILDS}
    jobs = {name: build(native, isa, target, tmp / name) for name, (isa, target) in x86.items()}
    runs = {name: [str(tmp / name)] for name in x86}
    for name, (target, cpu, families) in NEON_BUILDS.items():
        jobs[name] = build(CROSS_CC, "neon", target, tmp / name)
        runs[name] = [QEMU, "-cpu", cpu, str(tmp / name), *families]
    for name, started in jobs.items():
        for job in started:
            assert job.wait(timeout=300) == 0, f"{name}: {job.stderr.read()[-3000:]}"
        if name in x86:
            link(native, tmp / name)
        else:
            link(CROSS_CC, tmp / name, "-static")
    got = {}
    for name, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, timeout=300)
        assert done.returncode == 0, f"{name}: {done.stderr.decode()[-3000:]}"
        got[name] = records(done.stdout)
    return got


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return ((fast.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def test_the_builds_are_the_instruction_sets(outputs):
    assert outputs["avx2"][0][0] == outputs["avx2-vnni"][0][0] == "isa:avx2" and outputs["avx512"][0][0] == "isa:avx512"
    assert outputs["neon"][0][0] == outputs["neon-v8.0"][0][0] == "isa:neon"
    for name in ("avx2-vnni", "avx512", "neon"):
        assert [r[0] for r in outputs["avx2"]][1:] == [r[0] for r in outputs[name]][1:], name
    assert {family(r[0]) for r in outputs["neon"][1:]} == set(FAMILIES)
    ran = {family(r[0]) for r in outputs["neon-v8.0"][1:]}
    assert ran == {"int8", "int4", "dequant", "step"}


def compare(ref: list, fast: list, families: set[str], loose: frozenset[str] = frozenset()) -> tuple[int, list[str]]:
    """(cases compared, failures) over the records of `families`, in the driver's order; those of the `loose`
    families within tolerance even where the driver asks for bits."""
    failures, cases = [], 0
    ours, theirs = ([r for r in recs[1:] if family(r[0]) in families] for recs in (ref, fast))
    for (name, want, exact), (got_name, got, _) in zip(ours, theirs, strict=True):
        cases += 1
        assert got_name == name and got.shape == want.shape and got.dtype == want.dtype, name
        if exact and family(name) not in loose:
            bits = torch.int16 if want.dtype == torch.bfloat16 else torch.int32
            if not torch.equal(got.view(bits), want.view(bits)):
                failures.append(f"{name}: not bitwise equal")
            continue
        nan = want.isnan()  # the inf and nan cases' rows: NaN in the same places, the rest within tolerance
        if not torch.equal(got.isnan(), nan):
            failures.append(f"{name}: NaN elsewhere")
            continue
        if nan.all():
            continue
        got, want = got[~nan], want[~nan]
        if not relative_error(got, want) <= TOLERANCE[want.dtype]:
            failures.append(f"{name}: {relative_error(got, want):.2e} > {TOLERANCE[want.dtype]:.0e}")
    return cases, failures


@pytest.mark.parametrize("family", FAMILIES)
def test_neon_matches_avx2(outputs, family):
    """Every output of the family's cases within its tolerance (bitwise where exact), all failures listed at once."""
    cases, failures = compare(outputs["avx2"], outputs["neon"], {family})
    assert cases and not failures, "\n".join(failures)


def test_neon_without_dotprod_matches_avx2(outputs):
    """The ARMv8.0 build (smlal where the other has sdot) on its families, as above."""
    cases, failures = compare(outputs["avx2"], outputs["neon-v8.0"], {"int8", "int4", "dequant", "step"})
    assert cases and not failures, "\n".join(failures)


@pytest.mark.parametrize("family", FAMILIES)
def test_avx512_matches_avx2(outputs, family):
    """avx512.c (emulated where the CPU lacks AVX-512) against avx2.c: the integer GEMVs within tolerance."""
    cases, failures = compare(outputs["avx2"], outputs["avx512"], {family}, frozenset({"int8", "int4"}))
    assert cases and not failures, "\n".join(failures)


def test_avx2_with_avx_vnni_matches_avx2(outputs):
    """avx2.c built for AVX-VNNI (its int4 GEMV through vpdpbusd) against the plain build, every family, the int4
    GEMVs and the decode steps over them bitwise where the driver asks."""
    cases, failures = compare(outputs["avx2"], outputs["avx2-vnni"], set(FAMILIES))
    assert cases and not failures, "\n".join(failures)


def test_inf_and_nan_make_their_rows_nan(outputs):
    """The driver puts an inf in row 1 of 5 and a NaN in row 3: those rows' outputs are all NaN, the others none,
    in every build."""
    for build, recs in outputs.items():
        bad = {name: values for name, values, _ in recs if name.endswith("inf and nan")}
        assert sorted(bad) == ["int4_bf16 inf and nan", "int8_bf16 inf and nan"], build
        for name, values in bad.items():
            nan = values.float().reshape(5, -1).isnan()
            assert nan.all(1).tolist() == nan.any(1).tolist() == [False, True, False, True, False], (build, name)
