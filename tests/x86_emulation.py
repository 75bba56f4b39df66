"""Build flags for the x86 kernel paths this CPU may lack, emulated for the tests (test_kernels.py,
test_kernel_builds.py): avx512.c or avx2.c's AVX-VNNI path compiled for AVX2 with a header forced in first that
maps the missing intrinsics onto SIMDe (Debian's libsimde-dev, header-only; avx512_emulation.h, avx_vnni_emulation.h
say what they add to it). Correctness only: the emulated builds are slow."""

from __future__ import annotations

from pathlib import Path

SIMDE = Path("/usr/include/simde/x86/avx512.h")  # what `apt-get install libsimde-dev` puts there


def emulated(header: str, *more: str) -> list[str]:
    """The target flags of an AVX2 build with `header` (beside this file) forced in, then `more`."""
    return ["-march=x86-64-v3", "-Wno-psabi", "-include", str(Path(__file__).with_name(header)), *more]


AVX512 = emulated("avx512_emulation.h")
AVX_VNNI = emulated("avx_vnni_emulation.h")
