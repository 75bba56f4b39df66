"""qwenlite's own CPU kernels, one C file per instruction set beside this module (avx512.c for AVX-512 with BF16 and
VNNI, avx2.c for AVX2 + FMA, neon.c for AArch64's Advanced SIMD; common.h, delta_rule.h, gemv_int8.h and step.h
shared, gemv_float.h by avx2.c and neon.c, quant_x86.h by avx2.c and avx512.c): decode GEMVs over bf16 / fp32 /
int8 / int4 weights, dequantization for prefill, a bf16 GEMM for prefill (avx2 only), a Gated DeltaNet token (conv,
norms, gates and the delta rule in one pass over the state), the delta rule over a prompt, an attention token,
RMSNorm, the prompt's conv + SiLU, and a whole decode step built from them (model/runner.py describes the model to
it). Each has a pure-torch reference twin (named in avx512.c's header) that the tests hold every instruction set's
build to (avx512 on an AVX2 machine too, emulated: tests/avx512_emulation.h).

The instruction set is chosen once, from the CPU's features as the OS reports them (/proc/cpuinfo lists a feature
only when the kernel enabled its register state): on x86-64 `avx512` where AVX-512 F/BW/VL, BF16 and VNNI are present,
else `avx2` where AVX2, FMA and the rest of x86-64-v3 are; on AArch64 `neon` where the "Features" line lists
`asimd`; else `torch` (torch's own kernels; also off Linux, where there is no /proc/cpuinfo to ask).
`QWENLITE_ISA=avx512|avx2|neon|torch` forces one: a CPU that cannot run it is a KernelError that says what it
lacks (so every path can be tested and benchmarked on one machine that has them). `QWENLITE_KERNELS=0` is
`QWENLITE_ISA=torch`.

The chosen file is compiled on first use with the machine's C compiler (`$CC`, default `cc`; `-march=native` for
avx512, `-march=x86-64-v3` for avx2, so the AVX2 build is what an AVX2 laptop runs, plus `-mavxvnni` where the flags
list `avx_vnni` (AVX-VNNI's vpdpbusd: avx2.c's int4 GEMV uses it); for neon `-march=armv8.2-a+dotprod` where the
"Features" line also lists `asimddp` (ARMv8.2's dot product, sdot: neon.c's int4 GEMV uses it), else
`-march=armv8-a+simd`, what any AArch64 CPU runs: `target_flags` decides, and tests/test_kernel_builds.py
cross-compiles both and runs them under qemu), cached under `$QWENLITE_CACHE` (default ~/.cache/qwenlite)/kernels by
a hash of the sources, the flags, the compiler and the CPU, and loaded with ctypes (the calls release the GIL). Both
neon builds are "neon" and give the same numbers, as both avx2 builds are "avx2" and do. Without a compiler the
automatic choice warns once and falls back to torch; a forced one fails.

Threads: OpenMP, sharing torch's libgomp (loaded by `import torch` before this library), with torch's thread
count passed on every call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlite.errors import KernelError

# Argument types, one letter each: P pointer, L int64, I int, F float (the C files' prototypes); after ">" the
# result's, where there is one.
SIGNATURES = {
    "qk_gemv_bf16": "PPPLLLI",
    "qk_gemv_int8": "PPILPIPILLLI",
    "qk_gemv_int4": "PPILPIPILLLLI",
    "qk_dequant_int8": "PPILLLLPII",
    "qk_dequant_int4": "PPILLLLLPII",
    "qk_rmsnorm": "PLPIFPILLI",
    "qk_gdn_decode": "PPPLPPPPPPPFPIILLLLLI",
    "qk_attn_decode": "PPPPPFPPLPPPPIIILLLLLI",
    "qk_read": "PLI>F",
    "qk_gemv_f32": "PPPLLLI",
    "qk_decode_step": "PPPI>I",
    "qk_rewind": "PPI>I",
    "qk_draft": "PPPPPLLI>I",
    "qk_embed_rows": "PPLPI",
    "qk_conv_silu": "PPPPIILLLLI",
    "qk_delta_rule": "PPPPPPPLLLLLLI",
}
# Kernels only some instruction sets' files have (the others run the torch twin), typed as SIGNATURES.
OPTIONAL = {"qk_gemm_bf16": "PPPLLLI>I"}
CTYPES = {"P": ctypes.c_void_p, "L": ctypes.c_int64, "I": ctypes.c_int, "F": ctypes.c_float}
CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off"]
# The architectures, as platform.machine() names them.
ARCHES = {"x86-64": ("x86_64", "AMD64"), "AArch64": ("aarch64", "arm64")}
# Per instruction set, fastest first within an architecture: its architecture, the /proc/cpuinfo flags it needs
# ("flags" on x86, "Features" on ARM), and the compiler's target.
ISAS = {
    "avx512": ("x86-64", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"), ["-march=native"]),
    "avx2": ("x86-64", ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"), ["-march=x86-64-v3"]),
    "neon": ("AArch64", ("asimd",), ["-march=armv8-a+simd"]),
}
# Optional features that raise an instruction set's target where the CPU has them (all of them): the flags then.
UPGRADES = {
    "avx2": (("avx_vnni",), ["-march=x86-64-v3", "-mavxvnni"]),
    "neon": (("asimddp",), ["-march=armv8.2-a+dotprod"]),
}
SOURCES = ("common.h", "delta_rule.h", "gemv_float.h", "gemv_int8.h", "plan.h", "quant_x86.h", "step.h")  # + the ISA's
MAX_ROWS = 8  # rows for the bf16 GEMV and the one-call decode step (decode, batched decode); more: torch's GEMM
# Quantized weights: up to these many rows a GEMV (a pass over W per 4 rows; a layer's W stays in L3 between
# passes) beats dequantize-then-GEMM, whose dequantization is a fixed cost (bench/results/gemv_rows.md).
INT8_GEMV_ROWS, INT4_GEMV_ROWS = 24, 64
DEQUANT_ROWS = 16384  # rows of a quantized W dequantized at a time for a bf16 GEMM: bounds the temporary (32 MB at K
# 1024); half as many for an fp32 GEMM


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags as the OS reports them (empty off Linux)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor(), frozenset()


def cpu_name() -> str:
    return _cpuinfo()[0]


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """/proc/cpuinfo's model name and the first processor's features: x86's "flags", ARM's "Features" (ARM names no
    model: then the platform's)."""
    lines = text.splitlines()
    field = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in reversed(lines) if ":" in ln}
    name = field.get("model name") or platform.processor() or platform.machine()
    return name, frozenset(field.get("flags", field.get("Features", "")).split())


def missing_features(isa: str) -> list[str]:
    """What this CPU lacks to run `isa`'s kernels ([] = it can)."""
    if isa == "torch":
        return []
    arch, flags, _ = ISAS[isa]
    if platform.machine() not in ARCHES[arch]:
        return [f"an {arch} CPU (this is {platform.machine()})"]
    return [f for f in flags if f not in _cpuinfo()[1]]


def _upgrade(isa: str, features: frozenset[str] | None) -> tuple[tuple[str, ...], list[str]] | None:
    """UPGRADES' entry for `isa` where a CPU with `features` (this one's by default) has what it names, else None."""
    features = _cpuinfo()[1] if features is None else features
    return UPGRADES[isa] if isa in UPGRADES and set(UPGRADES[isa][0]) <= features else None


def target_flags(isa: str, features: frozenset[str] | None = None) -> list[str]:
    """The compiler's target flags for `isa` on a CPU with `features` (this one's by default): ISAS', raised by
    UPGRADES where the CPU has the features they name."""
    upgrade = _upgrade(isa, features)
    return upgrade[1] if upgrade else ISAS[isa][2]


def runnable_isas() -> list[str]:
    """The instruction sets this CPU can run, fastest first; always ends with "torch"."""
    return [isa for isa in ISAS if not missing_features(isa)] + ["torch"]


def isa() -> str:
    """The kernels in use: "avx512", "avx2", "neon", or "torch" (no fast path here, QWENLITE_KERNELS=0 or
    QWENLITE_ISA=torch, or the automatic choice failed to build and warned). A QWENLITE_ISA this CPU cannot run is a
    KernelError."""
    lib = library()
    return "torch" if lib is None else lib.qk_isa().decode()


def isa_label() -> str:
    """`isa()` with the optional features its build has (UPGRADES'): "avx2+avx_vnni", "neon+asimddp", "avx512",
    "torch". What `qwenlite bench` prints."""
    lib = library()
    return "torch" if lib is None else "+".join([lib.qk_isa().decode(), *lib.built_with])


def _isa(forced: str) -> str:
    if not forced:
        return runnable_isas()[0]
    if forced != "torch" and forced not in ISAS:
        raise KernelError(f"QWENLITE_ISA={forced}: unknown; choose one of {', '.join([*ISAS, 'torch'])}")
    if lacks := missing_features(forced):
        raise KernelError(f"QWENLITE_ISA={forced}: this CPU ({_cpuinfo()[0]}) lacks {', '.join(lacks)}; "
                          f"it can run {', '.join(runnable_isas())}")  # fmt: skip
    return forced


def _build(isa: str, target: list[str], cache_dir: Path) -> Path:
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    files = {name: resources.files("qwenlite.ops.cpu").joinpath(name).read_bytes() for name in (f"{isa}.c", *SOURCES)}
    flags = [*CFLAGS, *target]
    cpu, features = _cpuinfo()
    key = hashlib.sha256(b"\0".join([*files.values(), version.encode(), cpu.encode(),
                                      " ".join(sorted(features)).encode(), " ".join(flags).encode()]))  # fmt: skip
    lib = cache_dir / f"kernels-{isa}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_bytes(text)
        out = Path(tmp) / "kernels.so"
        done = subprocess.run([cc, *flags, str(Path(tmp) / f"{isa}.c"), "-o", str(out)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        out.replace(lib)  # atomic: a concurrent build of the same sources writes the same file
    return lib


def cache_root() -> Path:
    """Where qwenlite keeps what it builds or measures on this machine: $QWENLITE_CACHE, else ~/.cache/qwenlite."""
    return Path(os.environ.get("QWENLITE_CACHE", Path.home() / ".cache" / "qwenlite"))


@functools.cache
def _load(isa: str) -> ctypes.CDLL:
    """`isa`'s library, built for `target_flags`; where an upgrade's flags do not build (a compiler older than the
    CPU: gcc before 11 has no -mavxvnni), the plain build of the same instruction set, with a warning. `built_with`
    names the upgrade's features the library has."""
    cache_dir = cache_root() / "kernels"
    upgrade = _upgrade(isa, None)
    try:
        path = _build(isa, target_flags(isa), cache_dir)
    except RuntimeError as e:
        if upgrade is None:
            raise
        warnings.warn(f"qwenlite: the {isa} kernels did not build with {' '.join(upgrade[1])} ({e}); building them "
                      f"without {', '.join(upgrade[0])}", RuntimeWarning, stacklevel=3)  # fmt: skip
        path, upgrade = _build(isa, ISAS[isa][2], cache_dir), None
    lib = ctypes.CDLL(str(path))
    lib.built_with = upgrade[0] if upgrade else ()
    lib.qk_isa.restype = ctypes.c_char_p
    if lib.qk_isa().decode() != isa:
        raise KernelError(f"kernels built for {isa} report {lib.qk_isa().decode()}")
    for name, signature in (SIGNATURES | {n: t for n, t in OPTIONAL.items() if hasattr(lib, n)}).items():
        arguments, _, result = signature.partition(">")
        getattr(lib, name).argtypes = [CTYPES[c] for c in arguments]
        getattr(lib, name).restype = CTYPES[result] if result else None
    lib.qk_plan_layout.restype = ctypes.POINTER(PlanField)
    lib.qk_plan_layout.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    check_plan_layout(c_plan_layout(lib))
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels of the chosen instruction set, or None where torch's kernels are the path (see the
    module docstring). Tests that switch QWENLITE_ISA call `library.cache_clear()`."""
    if os.environ.get("QWENLITE_KERNELS", "1") == "0":
        return None
    forced = os.environ.get("QWENLITE_ISA", "").strip().lower()
    chosen = _isa(forced)
    if chosen == "torch":
        return None
    try:
        return _load(chosen)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        if forced:
            raise KernelError(f"QWENLITE_ISA={forced}: the kernels did not build ({e})") from e
        warnings.warn(f"qwenlite: CPU kernels unavailable, using torch's ({e})", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    return library() is not None


@functools.cache
def bf16_gemm_is_fast() -> bool:
    """Whether torch's bf16 GEMM keeps up with its fp32 one on this CPU: with AVX512-BF16 or AMX-BF16 (oneDNN's native
    bf16). Elsewhere it does not (AVX2 Zen, 2 threads: x W^T at 11 GFLOP/s against fp32's 37; x @ W with W stored
    (K, N) 7.2 s against 95 ms), so prefill dequantizes to fp32 and bf16 projections of many rows run in fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpuinfo()[1])


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a GEMM over activations of `dtype` runs in here: bf16 only where bf16_gemm_is_fast()."""
    return dtype if dtype != torch.bfloat16 or bf16_gemm_is_fast() else torch.float32


def dequant_rows(dtype: torch.dtype) -> int:
    return DEQUANT_ROWS if dtype != torch.float32 else DEQUANT_ROWS // 2


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _is_bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def _plain(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


ACT_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# bf16 weights


def gemv_bf16_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (M, K) bf16 with M <= MAX_ROWS, weight (N, K) bf16, both contiguous on the CPU."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype == torch.bfloat16
            and _plain(x, weight) and available())  # fmt: skip


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) bf16, fp32 accumulation; needs `gemv_bf16_ok`."""
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    library().qk_gemv_bf16(_p(weight), _p(x), _p(y), M, N, K, torch.get_num_threads())
    return y


# Rows up to which qwenlite's bf16 GEMM runs (a prompt's chunks, model/runner.PREFILL_CHUNK): there it beat torch's
# fp32 GEMM on widened weights (214-898 rows x 1024: 1.03-1.15x, the weights hot in cache; a 214-token prefill with
# them cold 1.30x); over thousands of rows (a large image's patches in the vision tower) it lost (3600 x 768 x 3072:
# 0.75x; 784 x 2304 x 768: 0.91x), its tiles re-reading x from L3 for each block of W.
GEMM_ROWS = 512


def gemm_bf16_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`linear_fp32_ok` with at most GEMM_ROWS rows, on an instruction set whose file has the bf16 GEMM (avx2), x and
    weight contiguous."""
    lib = library()
    return (x.shape[0] <= GEMM_ROWS and linear_fp32_ok(x, weight) and _plain(x, weight) and lib is not None
            and hasattr(lib, "qk_gemm_bf16"))  # fmt: skip


def gemm_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) bf16 from fp32 sums, for many rows (a prompt): `linear_fp32` (the twin)
    without widening the weight in memory first; needs `gemm_bf16_ok`."""
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    if library().qk_gemm_bf16(_p(weight), _p(x), _p(y), M, N, K, torch.get_num_threads()):
        raise MemoryError(f"the bf16 GEMM's buffers ({M} x {K} and a block of {K} per thread) could not be allocated")
    return y


def linear_fp32_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (M, K) bf16 with more rows than the GEMV takes, weight (N, K) bf16, on a CPU whose bf16 GEMM is slow."""
    return (x.dim() == 2 and x.shape[0] > MAX_ROWS and x.dtype == weight.dtype == torch.bfloat16
            and x.device.type == weight.device.type == "cpu" and gemm_dtype(x.dtype) == torch.float32)  # fmt: skip


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) -> bf16 as torch's fp32 GEMM computes it (bf16 GEMMs accumulate in fp32 and round once:
    the same sums), a chunk of the weight's rows at a time upcast into a reused buffer; needs `linear_fp32_ok`."""
    (N, K), xf, step = weight.shape, x.float(), dequant_rows(torch.float32)
    y = torch.empty(x.shape[0], N, dtype=torch.bfloat16)
    for r in range(0, N, step):
        w = scratch((min(step, N - r), K), torch.float32).copy_(weight[r : r + step])
        y[:, r : r + w.shape[0]] = F.linear(xf, w)  # rounded to bf16 on the way in: no concatenation after
    return y


# ---------------------------------------------------------------------------------------------
# int8 weights (quant_matmul's format)


def int8_ok(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Activations fp32/bf16, scales fp32/bf16, group size a multiple of 16, all contiguous on the CPU."""
    K = qweight.shape[1]
    G = K // scales.shape[1]
    return (x.dtype in ACT_DTYPES and scales.dtype in ACT_DTYPES and G % 16 == 0 and G * scales.shape[1] == K
            and _plain(x, qweight, scales) and available())  # fmt: skip


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype; needs `int8_ok`. A GEMV for up to INT8_GEMV_ROWS rows (any number where it
    multiplies in integers), else W dequantized a chunk of rows at a time for torch's GEMM (prefill), in x's dtype
    or fp32 (`gemm_dtype`)."""
    if takes_gemv(x, INT8_GEMV_ROWS):
        return int8_gemv(x, qweight, scales)
    (N, K), dtype, out = qweight.shape, gemm_dtype(x.dtype), []
    xg, step = x.to(dtype), dequant_rows(dtype)
    for r in range(0, N, step):
        rows = slice(r, min(r + step, N))
        w = int8_dequant(qweight, scales, rows, dtype, scratch((rows.stop - r, K), dtype))
        out.append(F.linear(xg, w).to(x.dtype))
    return torch.cat(out, dim=-1)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype, streaming W once per 4 rows of x; needs `int8_ok`."""
    (M, K), N = x.shape, qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    library().qk_gemv_int8(_p(qweight), _p(scales), _is_bf16(scales), K // scales.shape[1], _p(x), _is_bf16(x),
                           _p(y), _is_bf16(y), M, N, K, torch.get_num_threads())  # fmt: skip
    return y


_scratch = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer, reused: dequantized weights live only until the next chunk's, and fresh memory for each
    would cost a page fault every 4 KiB (a 2B prefill dequantizes 3 GB)."""
    numel = math.prod(shape)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in inference mode and out of it alike
            buf = _scratch.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, rows: slice, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Rows of W = q * s in `dtype` (fp32 or bf16), bitwise quant_matmul.dequantize_int8 rounded to `dtype`; into
    `out` when given."""
    K = qweight.shape[1]
    out = torch.empty(rows.stop - rows.start, K, dtype=dtype) if out is None else out
    library().qk_dequant_int8(_p(qweight), _p(scales), _is_bf16(scales), K // scales.shape[1], rows.start,
                              rows.stop, K, _p(out), _is_bf16(out), torch.get_num_threads())  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# int4 weights (quant_matmul's tiled64 format)


def int4_ok(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> bool:
    K = packed.shape[1]
    return (x.dtype in ACT_DTYPES and scales_and_zeros.dtype in ACT_DTYPES and group_size % 16 == 0
            and K % group_size == 0 and _plain(x, packed, scales_and_zeros) and available())  # fmt: skip


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                n: int) -> torch.Tensor:  # fmt: skip
    """x (M, K) -> (M, n) in x's dtype; needs `int4_ok`. As `int8_matmul`: GEMV or dequantize + GEMM (on W^T, the
    layout the tiles dequantize to with whole-vector stores)."""
    if takes_gemv(x, INT4_GEMV_ROWS):
        return int4_gemv(x, packed, scales_and_zeros, group_size, n)
    (tiles, K, _), dtype, out = packed.shape, gemm_dtype(x.dtype), []
    xg, step = x.to(dtype), dequant_rows(dtype) // 64
    for t in range(0, tiles, step):
        chunk = slice(t, min(t + step, tiles))
        w_t = scratch((K, (chunk.stop - t) * 64), dtype)
        out.append((xg @ int4_dequant_t(packed, scales_and_zeros, group_size, chunk, dtype, w_t)).to(x.dtype))
    return torch.cat(out, dim=-1)[:, :n]


def integer_gemv(x: torch.Tensor) -> bool:
    """Whether the quantized GEMVs multiply x in integers here: bf16 activations, in every instruction set's file
    (int8 weights with the activations as int16 blocks, power-of-two scales: exact to 2^-16 of a block's largest
    value; int4 weights with int8 blocks of 16, quant_matmul.quantize_activations the twin; avx512 through VNNI, neon
    in both its builds with avx2's numbers bit for bit). fp32 activations widen the weights instead."""
    return x.dtype == torch.bfloat16 and available()


def takes_gemv(x: torch.Tensor, max_rows: int) -> bool:
    """Whether a quantized matmul of x runs the GEMV rather than dequantize + GEMM: up to `max_rows` rows, and at
    every row count where the GEMV multiplies in integers and torch's bf16 GEMM is slow (`bf16_gemm_is_fast`); there
    the GEMV wins (bench/results/gemv_rows.md): it passes over W once for all rows of x, a tile (int4) or a block of
    rows (int8) of W in L2 while it meets every 4 rows of x in turn. Measured on AVX2; neon follows it unmeasured (no
    ARM machine yet), which also keeps its prefill and decode on the same numbers. With AVX512-BF16 or AMX a prompt
    keeps torch's bf16 GEMM (oneDNN's)."""
    return x.shape[0] <= max_rows or (integer_gemv(x) and not bf16_gemm_is_fast())


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
              n: int) -> torch.Tensor:  # fmt: skip
    """x (M, K) -> (M, n) in x's dtype, streaming W once per 4 rows of x; needs `int4_ok`."""
    M, K = x.shape
    y = torch.empty(M, n, dtype=x.dtype)
    Np = packed.shape[0] * 64
    sz = scales_and_zeros
    library().qk_gemv_int4(_p(packed), _p(sz), _is_bf16(sz), group_size, _p(x), _is_bf16(x), _p(y), _is_bf16(y),
                           M, Np, n, K, torch.get_num_threads())  # fmt: skip
    return y


def int4_dequant_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, tiles: slice,
                   dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Rows [64 tiles.start, 64 tiles.stop) of W, transposed: (K, rows) in `dtype`, bitwise
    quant_matmul.dequantize_int4 (transposed) rounded to `dtype`; into `out` when given."""
    K = packed.shape[1]
    out = torch.empty(K, (tiles.stop - tiles.start) * 64, dtype=dtype) if out is None else out
    sz = scales_and_zeros
    library().qk_dequant_int4(_p(packed), _p(sz), _is_bf16(sz), group_size, packed.shape[0] * 64, tiles.start,
                              tiles.stop, K, _p(out), _is_bf16(out), torch.get_num_threads())  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Decode-step fusions


def rows_stride(x: torch.Tensor) -> int | None:
    """The stride between x's rows of x.shape[-1] elements when all its leading dims collapse into one (a
    contiguous tensor, or a slice of the last dim of one), else None."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    ld = x.stride(-2) if x.dim() > 1 else x.shape[-1]
    for i in range(x.dim() - 2):
        if x.shape[i] > 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
    return ld


def rmsnorm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype in ACT_DTYPES and weight.dtype in ACT_DTYPES and x.device.type == "cpu" and x.numel() > 0
            and x.shape[-1] % 16 == 0 and rows_stride(x) is not None and _plain(weight) and available())  # fmt: skip


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm: x_hat * (1 + w) in fp32, rounded to x's dtype; needs `rmsnorm_ok`."""
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype)
    library().qk_rmsnorm(_p(x), rows_stride(x), _p(weight), _is_bf16(weight), eps, _p(out), _is_bf16(x),
                         x.numel() // D, D, torch.get_num_threads())  # fmt: skip
    return out


def conv_silu_ok(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (B, T, C) and state (B, K-1, C) in one activation dtype, weight (C, 1, K) with K <= 8, C % 16 == 0."""
    return (x.dim() == 3 and x.dtype == state.dtype and x.dtype in ACT_DTYPES and weight.dtype in ACT_DTYPES
            and x.shape[-1] % 16 == 0 and weight.shape[-1] <= 8 and _plain(x, state, weight)
            and available())  # fmt: skip


def conv_silu(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """silu(causal_conv1d(x, weight, state)[0]) in fp32, with the state advanced in place; needs `conv_silu_ok`."""
    B, T, C = x.shape
    out = torch.empty(B, T, C)
    library().qk_conv_silu(_p(x), _p(state), _p(weight), _p(out), _is_bf16(x), _is_bf16(weight), B, T, C,
                           weight.shape[-1], torch.get_num_threads())  # fmt: skip
    return out


def delta_rule_ok(v: torch.Tensor, state: torch.Tensor | None) -> bool:
    """v (B, T, Hv, Dv) on the CPU with Dv a multiple of 16; the state, where there is one, fp32 and contiguous."""
    return (v.dim() == 4 and v.shape[-1] % 16 == 0 and v.device.type == "cpu"
            and (state is None or (state.dtype == torch.float32 and _plain(state))) and available())  # fmt: skip


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ops.delta_rule.gated_delta_rule_recurrent for a prompt, in C: (o (B, T, Hv, Dv) fp32, the final state), the
    state given advanced in place (zeros where None). Needs `delta_rule_ok`; the inputs are made fp32 and contiguous."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    q, k, v, g, beta = (t.float().contiguous() for t in (q, k, v, g, beta))
    state = torch.zeros(B, Hv, Dk, Dv) if state is None else state
    o = torch.empty(B, T, Hv, Dv)
    library().qk_delta_rule(_p(q), _p(k), _p(v), _p(g), _p(beta), _p(state), _p(o), B, T, Hk, Hv, Dk, Dv,
                            torch.get_num_threads())  # fmt: skip
    return o, state


def gdn_decode_ok(qkv: torch.Tensor, state: torch.Tensor, *small: torch.Tensor) -> bool:
    """Inputs of one token (T == 1) in one activation dtype, the small weights all in one dtype, the fp32 state,
    head dims multiples of 16."""
    return (qkv.dim() == 3 and qkv.shape[1] == 1 and qkv.dtype in ACT_DTYPES and state.dtype == torch.float32
            and state.shape[-1] % 16 == 0 and state.shape[-2] % 16 == 0
            and len({t.dtype for t in small}) == 1 and small[0].dtype in ACT_DTYPES
            and _plain(qkv, state, *small) and available())  # fmt: skip


def gdn_decode(layer: torch.nn.Module, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor,
               conv_state: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """model.GatedDeltaNet between its projections and out_proj for one token: qkv (B, 1, C), a and b (B, 1, Hv),
    z (B, 1, Hv Dv) in the activation dtype; conv_state (B, K-1, C) and the fp32 state (B, Hv, Dk, Dv) updated in
    place. Returns (B, 1, Hv Dv). Needs `gdn_decode_ok` for qkv, state and the layer's small weights, and a, b, z
    contiguous in qkv's dtype."""
    B = qkv.shape[0]
    Hv, Dv = layer.num_v_heads, layer.head_v_dim
    out = torch.empty(B, 1, Hv * Dv, dtype=qkv.dtype)
    conv_w = layer.conv1d.weight
    library().qk_gdn_decode(
        _p(qkv), _p(conv_state), _p(conv_w), conv_w.shape[-1], _p(a.contiguous()), _p(b.contiguous()),
        _p(layer.A_log), _p(layer.dt_bias), _p(state), _p(z.contiguous()), _p(layer.norm.weight), layer.norm.eps,
        _p(out), _is_bf16(qkv), _is_bf16(conv_w), B, layer.num_k_heads, Hv, layer.head_k_dim, Dv,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def attn_decode_ok(qg: torch.Tensor, k_cache: torch.Tensor, *small: torch.Tensor) -> bool:
    """One token (T == 1) in the caches' dtype, the norm weights in one dtype, head dim a multiple of 16."""
    return (qg.dim() == 3 and qg.shape[1] == 1 and qg.dtype == k_cache.dtype and qg.dtype in ACT_DTYPES
            and k_cache.shape[-1] % 16 == 0 and len({t.dtype for t in small}) == 1 and small[0].dtype in ACT_DTYPES
            and _plain(qg, k_cache, *small) and available())  # fmt: skip


def attn_decode(layer: torch.nn.Module, qg: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """model.Attention between its projections and o_proj for one token: qg = q_proj(x) (B, 1, H * 2D or H * D),
    kx, vx (B, 1, Hkv * D); cos, sin as TextModel computes them for this step; row b sits at position pos[b]
    (its key and value are written there). Returns (B, 1, H * D); needs `attn_decode_ok`."""
    B = qg.shape[0]
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    R = cos.shape[-1]
    cos, sin = (t.reshape(-1, R).expand(B, R).contiguous() for t in (cos, sin))
    out = torch.empty(B, 1, H * D, dtype=qg.dtype)
    pos = pos.to(torch.int64).contiguous()
    library().qk_attn_decode(
        _p(qg), _p(kx.contiguous()), _p(vx.contiguous()), _p(layer.q_norm.weight), _p(layer.k_norm.weight),
        layer.q_norm.eps, _p(cos), _p(sin), R, _p(pos), _p(k_cache), _p(v_cache), _p(out), int(layer.gated),
        _is_bf16(qg), _is_bf16(layer.q_norm.weight), B, H, Hkv, k_cache.shape[2], D, torch.get_num_threads(),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# A whole decode step (qk_decode_step): the model described by plan.h's structs, mirrored here field for field.

FMT_BF16, FMT_F32, FMT_INT8, FMT_INT4 = range(4)
LINEAR_ATTENTION, FULL_ATTENTION = range(2)
P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64


class QkLinear(ctypes.Structure):
    _fields_ = [("fmt", I32), ("s_bf16", I32), ("w", P), ("s", P), ("bias", P), ("g", I64), ("n", I64), ("np", I64),
                ("k", I64)]  # fmt: skip


class QkGdn(ctypes.Structure):
    _fields_ = [("qkv", QkLinear), ("z", QkLinear), ("a", QkLinear), ("b", QkLinear), ("conv_w", P), ("A_log", P),
                ("dt_bias", P), ("norm_w", P)]  # fmt: skip


class QkAttn(ctypes.Structure):
    _fields_ = [("q", QkLinear), ("k", QkLinear), ("v", QkLinear), ("q_norm", P), ("k_norm", P)]


class QkMlp(ctypes.Structure):
    _fields_ = [("gate", QkLinear), ("up", QkLinear), ("down", QkLinear)]


class QkMoe(ctypes.Structure):
    _fields_ = [("router", QkLinear), ("experts", ctypes.POINTER(QkMlp)), ("shared", QkMlp), ("shared_gate", QkLinear)]


class QkMixer(ctypes.Union):
    _fields_ = [("gdn", QkGdn), ("attn", QkAttn)]


class QkLayer(ctypes.Structure):
    _fields_ = [("kind", I32), ("in_norm", P), ("post_norm", P), ("mixer", QkMixer), ("out", QkLinear), ("mlp", QkMlp),
                ("moe", ctypes.POINTER(QkMoe))]  # fmt: skip


class QkGdnCache(ctypes.Structure):
    _fields_ = [("conv", P), ("state", P), ("before_conv", P), ("inputs", P), ("before_state", P)]


class QkAttnCache(ctypes.Structure):
    _fields_ = [("k", P), ("v", P)]


class QkCache(ctypes.Union):
    _fields_ = [("gdn", QkGdnCache), ("attn", QkAttnCache)]


class QkModel(ctypes.Structure):
    _fields_ = [("act_bf16", I32), ("w_bf16", I32), ("gated", I32), ("eps", ctypes.c_float), ("hidden", I64),
                ("intermediate", I64), ("n_layers", I64), ("vocab", I64), ("k_heads", I64), ("v_heads", I64),
                ("k_head_dim", I64), ("v_head_dim", I64), ("conv_kernel", I64), ("heads", I64), ("kv_heads", I64),
                ("head_dim", I64), ("rotary_dim", I64), ("n_experts", I64), ("top_k", I64),
                ("layers", ctypes.POINTER(QkLayer)), ("final_norm", P), ("head", QkLinear), ("fuse", QkLinear),
                ("fuse_norm_e", P), ("fuse_norm_h", P), ("rows", I64), ("tokens", I64), ("max_seq_len", I64),
                ("logits_rows", I64), ("positions", P), ("cos", P), ("sin", P),
                ("caches", ctypes.POINTER(QkCache))]  # fmt: skip


class PlanField(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("offset", I64), ("size", I64)]


PLAN_TYPES = {"struct qk_linear": QkLinear, "struct qk_gdn": QkGdn, "struct qk_attn": QkAttn, "struct qk_mlp": QkMlp,
              "struct qk_moe": QkMoe, "union qk_mixer": QkMixer, "struct qk_layer": QkLayer,
              "struct qk_gdn_cache": QkGdnCache, "struct qk_attn_cache": QkAttnCache, "union qk_cache": QkCache,
              "struct qk_model": QkModel}  # fmt: skip


def plan_layout() -> dict[str, tuple[int, int]]:
    """The classes above as qk_plan_layout reports plan.h's structs: {"struct qk_linear": (-1, size),
    "struct qk_linear.fmt": (offset, size), ...}."""
    layout = {}
    for name, cls in PLAN_TYPES.items():
        layout[name] = (-1, ctypes.sizeof(cls))
        layout |= {f"{name}.{f}": (getattr(cls, f).offset, getattr(cls, f).size) for f, _ in cls._fields_}
    return layout


def c_plan_layout(lib: ctypes.CDLL) -> dict[str, tuple[int, int]]:
    n = ctypes.c_int64()
    table = lib.qk_plan_layout(ctypes.byref(n))
    return {f.name.decode(): (f.offset, f.size) for f in table[: n.value]}


def check_plan_layout(c: dict[str, tuple[int, int]]) -> None:
    """A KernelError naming the first type or field on which the library's layout `c` and plan_layout() disagree."""
    ours = plan_layout()

    def said(layout: tuple[int, int] | None) -> str:
        return "absent" if layout is None else f"{layout[1]} bytes" + ("" if layout[0] < 0 else f" at {layout[0]}")

    for name in sorted(c.keys() | ours.keys()):
        if c.get(name) != ours.get(name):
            raise KernelError(f"decode plan layout: {name} is {said(c.get(name))} in C, {said(ours.get(name))} in "
                              f"kernels.py (plan.h and kernels.py must agree)")  # fmt: skip


def plan_linear(fmt: int, w: torch.Tensor, n: int, k: int, dtype: torch.dtype, bias: torch.Tensor | None = None,
                scales: torch.Tensor | None = None, group_size: int = 0,
                padded: int = 0) -> QkLinear | None:  # fmt: skip
    """A projection for decode_step under activations of `dtype`, or None where its bias is not one the step adds
    (a contiguous CPU tensor in `dtype`)."""
    if bias is not None and not (bias.dtype == dtype and _plain(bias)):
        return None
    s = 0 if scales is None else scales.data_ptr()
    s_bf16 = int(scales is not None and scales.dtype == torch.bfloat16)
    return QkLinear(fmt, s_bf16, w.data_ptr(), s, 0 if bias is None else bias.data_ptr(), group_size, n, padded or n, k)


def decode_step(model: QkModel, x: torch.Tensor) -> torch.Tensor:
    """Run every layer for `model.tokens` consecutive tokens of each of `model.rows` rows: x (tokens * rows, hidden)
    embeddings, token-major (token t of row b at t * rows + b), overwritten with the final normed hidden states;
    returns the logits (tokens * rows, vocab) in x's dtype, token-major, or only the last `model.logits_rows`. The
    caller keeps every tensor the plan points at alive (model/runner.py)."""
    logits = torch.empty(model.logits_rows or x.shape[0], model.vocab, dtype=x.dtype)
    if library().qk_decode_step(ctypes.byref(model), _p(x), _p(logits), torch.get_num_threads()):
        raise MemoryError(f"the decode step's buffer for {x.shape[0]} rows could not be allocated")
    return logits


def rewind_step(model: QkModel, keep: torch.Tensor) -> None:
    """After a tracked decode_step (the model struct it ran with, its caches' `inputs` set): row b keeps its first
    keep[b] tokens (int64, (rows,)), its Gated DeltaNet states restored and the kept tokens' recurrence replayed."""
    if library().qk_rewind(ctypes.byref(model), _p(keep), torch.get_num_threads()):
        raise MemoryError("the rewind's scratch could not be allocated")


def draft_greedy(model: QkModel, x: torch.Tensor, embed: QkLinear, count: int) -> list[int]:
    """`count` greedy drafts of the MTP head described by `model` (its cache, positions and cos / sin of the
    positions filled in; qk_draft in step.h) from x (n, 2 hidden): each position's token embedding and the hidden state
    before it (overwritten); embed: the embedding table (`embed_rows`), its rows read in x's dtype."""
    tokens = torch.empty(count, dtype=torch.int64)
    logits = torch.empty(model.vocab, dtype=x.dtype)
    if library().qk_draft(ctypes.byref(model), _p(x), ctypes.byref(embed), _p(tokens), _p(logits), x.shape[0], count,
                          torch.get_num_threads()):  # fmt: skip
        raise MemoryError("the draft step's buffer could not be allocated")
    return tokens.tolist()


def embed_rows(table: QkLinear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows `ids` (any shape, int64 in range) of an embedding table described as a projection (rows: tokens;
    `plan_linear`), (*ids.shape, hidden) in `dtype` (one of ACT_DTYPES): a float table's rows (its dtype `dtype`),
    an int8 / int4 one's as quant_matmul.int8_rows / int4_rows (the twins) dequantize them. Only those rows are
    read."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(*ids.shape, table.k, dtype=dtype)
    library().qk_embed_rows(ctypes.byref(table), _p(flat), flat.numel(), _p(out), _is_bf16(out))
    return out


def read_memory(buf: torch.Tensor) -> float:
    """Read a contiguous fp32 CPU tensor once (vector loads on all of torch's threads); returns its sum."""
    return library().qk_read(_p(buf), buf.numel(), torch.get_num_threads())
