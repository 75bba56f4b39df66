"""qwenlite's C kernels (ops/cpu/kernels.py) against their pure-torch reference twins, over the real layer shapes of
the 0.8B / 2B models and awkward ones, and the whole model with them against the model without: once for every
instruction set this CPU can run (the `isa` fixture forces each through QWENLITE_ISA: on an AVX-512 BF16 + VNNI
machine both avx512 and avx2, on an AVX2 one avx2 and avx512 with its intrinsics emulated (avx512_emulation.h), on
AArch64 Linux neon; skipped only on a CPU with none of them; on x86, test_kernel_builds.py checks neon under qemu).
The fallbacks (no compiler, QWENLITE_KERNELS=0) and the choice of instruction set run on every CPU and check that the
model then runs on torch's kernels and answers what transformers answers.

Tolerances (max |fast - ref| / max |ref|):
- fp32 outputs: 1e-5 (accumulation order; measured <= 8e-7);
- bf16 outputs: 1e-2 (both round to bf16, a step of 2^-8 relative; an output near a rounding boundary may land
  one step apart, measured <= 3.2e-3);
- int8 GEMVs with bf16 activations (every instruction set: activations as int16 in blocks with power-of-two
  scales, integer products): bf16's 1e-2; the int16 rounding (at most 2^-16 of a block's largest value) is far
  below it;
- int4 GEMVs with bf16 activations (activations as int8 in blocks of 16, integer products): bf16's 1e-2
  against the reference fed the same int8 activations (quant_matmul.quantize_activations, the twin); the int8
  rounding itself (up to 1/254 of a block's largest value) is the whole-model tests' concern;
- int8 / int4 past INT8_GEMV_ROWS / INT4_GEMV_ROWS rows (dequantize to the activation dtype, then torch's GEMM):
  the same two, as in bf16 the dequantized weight is rounded to bf16 like any bf16 model's;
- dequantization: bitwise equal to the reference's, rounded to the output dtype;
- the fusions (a Gated DeltaNet token, an attention token, RMSNorm, the prompt's conv + SiLU) as fp32 / bf16
  outputs above, against the model's own torch code; the recurrent state 1e-5 in both dtypes (it is fp32 in both
  paths, which read the same bf16 or fp32 inputs: only the fp32 summation order differs); conv state and value
  cache bitwise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import x86_emulation

import qwenlite
from qwenlite.config import ModelConfig, preset_config
from qwenlite.errors import KernelError
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.model.cache import make_cache
from qwenlite.model.quantized import QuantEmbedding, QuantLinear
from qwenlite.model.qwen3_5 import Attention, GatedDeltaNet, RMSNorm
from qwenlite.model.runner import run_model
from qwenlite.ops import quant_matmul as qm
from qwenlite.ops.conv import causal_conv1d
from qwenlite.ops.cpu import kernels
from qwenlite.ops.delta_rule import gated_delta_rule_recurrent
from qwenlite.ops.rope import rope_cos_sin, rope_inv_freq

from helpers import kl_and_top1, make_hf_checkpoint, random_ids, tiny_checkpoint

KERNEL_ISAS = [isa for isa in kernels.runnable_isas() if isa != "torch"]
# avx512.c on an x86 CPU without AVX-512: built for AVX2 with its intrinsics emulated (avx512_emulation.h, over
# Debian's libsimde-dev), so that every x86 file is held to the twins on any x86-64-v3 machine; a CPU with AVX-512
# BF16 and VNNI runs it natively instead.
EMULATED, UNTESTED = {}, []
if "avx512" not in KERNEL_ISAS and "avx2" in KERNEL_ISAS:
    if x86_emulation.SIMDE.exists():
        EMULATED = {"avx512": ("x86-64", (), x86_emulation.AVX512)}
        KERNEL_ISAS = ["avx512", *KERNEL_ISAS]
    else:
        NO_SIMDE = "no AVX-512 here; apt-get install libsimde-dev to test it emulated"
        UNTESTED = [pytest.param("avx512", marks=pytest.mark.skip(reason=NO_SIMDE))]


def force_isa(monkeypatch, isa: str) -> None:
    """Makes `isa` the instruction set of the next kernel call: through QWENLITE_ISA, an emulated one with its build
    flags in place of the CPU's features."""
    monkeypatch.setenv("QWENLITE_ISA", isa)
    if isa in EMULATED:
        monkeypatch.setitem(kernels.ISAS, isa, EMULATED[isa])
    kernels.library.cache_clear()


@pytest.fixture(
    params=KERNEL_ISAS + UNTESTED or [pytest.param("none", marks=pytest.mark.skip(reason="no kernels for this CPU"))]
)
def isa(request, monkeypatch):
    """Each instruction set this CPU runs (or emulates), forced for one test."""
    force_isa(monkeypatch, request.param)
    yield request.param
    kernels.library.cache_clear()  # the next test chooses again, after monkeypatch restores the environment


# The kernel-vs-twin tests run once per instruction set; the fallback tests at the end run on every CPU. The tests
# over the real shapes run two threads (conftest's `threads`, where the kernels split the work; a pytest-xdist
# worker has one).
two_threads = pytest.mark.usefixtures("threads")
needs_kernels = pytest.mark.usefixtures("isa")
# The GEMV tests over the real shapes check every instruction set inside one test, against one computation of their
# slow fp32 reference.
needs_some_kernels = pytest.mark.skipif(not KERNEL_ISAS, reason="no kernels for this CPU")


@pytest.fixture
def each_isa(monkeypatch):
    """each_isa() yields each instruction set this CPU runs, forced through QWENLITE_ISA until the next."""

    def each():
        for isa in KERNEL_ISAS:
            force_isa(monkeypatch, isa)
            yield isa

    yield each
    kernels.library.cache_clear()  # the next test chooses again, after monkeypatch restores the environment


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (K, N): the 0.8B's and 2B's projections and head, then shapes that are not multiples of anything.
REAL = [(1024, 6144), (1024, 3584), (3584, 1024), (2048, 1024), (1024, 16), (2048, 6144), (6144, 2048),
        (1024, 248320)]  # fmt: skip
AWKWARD_BF16 = [(100, 96), (33, 7), (1, 5), (64, 1)]
AWKWARD_INT8 = [(96, 100), (16, 5), (160, 48)]  # K % 16 == 0: the kernel's requirement (else torch's path)
AWKWARD_INT4 = [(96, 100), (64, 33), (160, 130)]


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return ((fast.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


# The head's shape (N > 100K) only in bf16, its dtype in use, and one group size: the fp32 reference takes seconds.
QUANT_CASES = [(K, N, d) for K, N in REAL for d in (torch.float32, torch.bfloat16)
               if not (N > 100_000 and d == torch.float32)]  # fmt: skip


def group_sizes(K: int, N: int, choices: tuple[int, ...]) -> list[int]:
    fit = [G for G in choices if K % G == 0]
    return fit[-1:] if N > 100_000 else fit


def rows_for(N: int) -> tuple[int, ...]:
    """1 (decode), 3 and 8 (batched decode: one pass over W, then a second one), 19 (a short prompt: more passes),
    70 (past INT8_GEMV_ROWS and INT4_GEMV_ROWS: the dequantize + GEMM path, but for GEMVs that multiply in
    integers, which take every row count); the head only at 1 and 8: its fp32 reference takes seconds."""
    return (1, 8) if N > 100_000 else (1, 3, 8, 19, 70)


def test_kernels_build_here(isa):
    assert kernels.available() and kernels.isa() == isa, f"the {isa} kernels did not build on a CPU that runs them"


@two_threads
@needs_some_kernels
@pytest.mark.parametrize("K,N", REAL + AWKWARD_BF16)
def test_gemv_bf16_matches_linear(K, N, each_isa):
    gen = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=gen).to(torch.bfloat16)
    xs = [torch.randn(M, K, generator=gen).to(torch.bfloat16) for M in (1, 3, 5, 8)]
    refs = [F.linear(x, w) for x in xs]
    for isa in each_isa():
        for x, ref in zip(xs, refs, strict=True):
            assert kernels.gemv_bf16_ok(x, w)
            assert relative_error(kernels.gemv_bf16(x, w), ref) <= TOLERANCE[torch.bfloat16], (isa, len(x))
        assert not kernels.gemv_bf16_ok(torch.randn(kernels.MAX_ROWS + 1, K).to(torch.bfloat16), w)
        assert not kernels.gemv_bf16_ok(torch.randn(1, K), w)  # fp32 activations: torch's


@two_threads
@needs_some_kernels
@pytest.mark.parametrize("K,N", [(1024, 3584), (3584, 1024), (100, 97), (17000, 7)], ids=str)
def test_gemm_bf16_rounds_fp32_sums_once(K, N, each_isa):
    """A prompt's bf16 projection through qwenlite's GEMM (avx2's) is F.linear of the widened operands rounded once
    to bf16: every output within half a bf16 step of the fp32 result, plus fp32's summation-order error (1e-5 of the
    largest); row counts no multiple of its 4-row tiles, W rows no multiple of 3, K no multiple of 8 and a K whose
    rows fill a block alone included. Instruction sets without it say so (their prompts take linear_fp32), as it
    does past GEMM_ROWS rows."""
    gen = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=gen).to(torch.bfloat16)
    xs = [torch.randn(M, K, generator=gen).to(torch.bfloat16) for M in (9, 11, 70, 214)]
    refs = [F.linear(x.float(), w.float()) for x in xs]
    for isa in each_isa():
        has = kernels.gemm_bf16_ok(xs[0], w)
        assert has == (isa == "avx2"), isa
        too_many = torch.zeros(kernels.GEMM_ROWS + 1, K, dtype=torch.bfloat16)
        assert not kernels.gemm_bf16_ok(too_many, w)  # a large image's patches: torch's GEMM
        for x, ref in zip(xs if has else [], refs, strict=False):
            got = kernels.gemm_bf16(x, w)
            assert got.dtype == torch.bfloat16 and got.shape == ref.shape
            bound = ref.abs() * 2.0**-8 + 1e-5 * ref.abs().max()  # half a step: at most 2^-8 of the value
            assert ((got.float() - ref).abs() <= bound).all(), (isa, len(x))


@pytest.mark.parametrize("K,N", [(1024, 6144), (3584, 1024), (100, 96)])
def test_linear_fp32_matches_bf16_linear(K, N, monkeypatch):
    """Prefill of a bf16 model on a CPU whose bf16 GEMM is slow: the fp32 GEMM of the upcast operands, rounded once,
    is bf16's F.linear up to its summation order (bf16 tolerance); the Linear module takes it for many rows only,
    in chunks of weight rows (a chunk smaller than N here)."""
    from qwenlite.model.qwen3_5 import Linear

    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: False)
    monkeypatch.setattr(kernels, "DEQUANT_ROWS", 2048)  # fp32 chunks of 1024 rows
    gen = torch.Generator().manual_seed(K + N)
    layer = Linear(K, N, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 37, K, generator=gen).to(torch.bfloat16)
    assert kernels.linear_fp32_ok(x.reshape(-1, K), layer.weight)
    assert not kernels.linear_fp32_ok(x[0, :3], layer.weight)  # few rows: the GEMV's
    with torch.no_grad():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert relative_error(got, want) <= TOLERANCE[torch.bfloat16]
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: True)
    assert not kernels.linear_fp32_ok(x.reshape(-1, K), layer.weight)


@two_threads
@needs_some_kernels
@pytest.mark.parametrize("K,N,dtype", QUANT_CASES + [(K, N, torch.float32) for K, N in AWKWARD_INT8], ids=str)
def test_int8_matches_reference(K, N, dtype, each_isa):
    gen = torch.Generator().manual_seed(K * N)
    w = torch.randn(N, K, generator=gen) * 0.05
    for G in group_sizes(K, N, (16, 32, K)):  # group-wise, and one scale per channel
        q, s = qm.quantize_int8(w, G, dtype)
        xs = [torch.randn(M, K, generator=gen).to(dtype) for M in rows_for(N)]
        refs = qm.int8_matmul_ref(torch.cat(xs), q, s).split([len(x) for x in xs])  # one pass of the slow reference
        rows = slice(N // 3, N)
        want = qm.dequantize_int8(q[rows], s[rows]).to(dtype) if N < 100_000 else None
        for isa in each_isa():
            for x, ref in zip(xs, refs, strict=True):
                assert kernels.int8_ok(x, q, s)
                assert relative_error(kernels.int8_matmul(x, q, s), ref) <= TOLERANCE[dtype], (isa, G, len(x))
            if want is not None:
                assert torch.equal(kernels.int8_dequant(q, s, rows, dtype), want), isa


def references(xs: list[torch.Tensor], dtype: torch.dtype, matmul, *weights):
    """The slow reference's outputs for each x (`matmul(rows, *weights)`) under the forced instruction set, computed
    in one pass per kind: of the int8-quantized activations where the int4 GEMV takes x and multiplies bf16
    activations in integers (kernels.integer_gemv, `takes_gemv`: int4 weights meet int8 activations there), else of
    x itself."""
    done = {}

    def kind(quantized: bool) -> list[torch.Tensor]:
        if quantized not in done:
            rows = torch.cat(xs)
            if quantized:
                rows = qm.dequantize_activations(*qm.quantize_activations(rows))
            done[quantized] = matmul(rows, *weights).to(dtype).split([len(x) for x in xs])
        return done[quantized]

    def of() -> list[torch.Tensor]:
        quantized = [kernels.integer_gemv(x) and kernels.takes_gemv(x, kernels.INT4_GEMV_ROWS) for x in xs]
        return [kind(q)[i] for i, q in enumerate(quantized)]

    return of


@two_threads
@needs_some_kernels
@pytest.mark.parametrize("K,N,dtype", QUANT_CASES + [(K, N, torch.float32) for K, N in AWKWARD_INT4], ids=str)
def test_int4_matches_reference(K, N, dtype, each_isa):
    gen = torch.Generator().manual_seed(K * N + 1)
    w = torch.randn(N, K, generator=gen) * 0.05
    for G in group_sizes(K, N, (32, 128)):
        packed, sz = qm.quantize_int4(w, G, dtype)
        xs = [torch.randn(M, K, generator=gen).to(dtype) for M in rows_for(N)]
        tiles = slice(packed.shape[0] // 2, packed.shape[0])
        want = None
        if N < 100_000:
            want = qm.dequantize_int4(packed, sz, slice(tiles.start * 64, tiles.stop * 64)).to(dtype)
        refs = references(xs, dtype, qm.int4_matmul_ref, packed, sz, N)
        for isa in each_isa():
            for x, ref in zip(xs, refs(), strict=True):
                assert kernels.int4_ok(x, packed, sz, G)
                fast = kernels.int4_matmul(x, packed, sz, G, N)
                assert fast.shape == ref.shape == (len(x), N)
                assert relative_error(fast, ref) <= TOLERANCE[dtype], (isa, G, len(x))
            if want is not None:
                assert torch.equal(kernels.int4_dequant_t(packed, sz, G, tiles, dtype).t(), want), isa


@two_threads
@pytest.mark.skipif("avx2" not in KERNEL_ISAS, reason="avx2.c does not run on this CPU")
@pytest.mark.skipif(not x86_emulation.SIMDE.exists(), reason="apt-get install libsimde-dev")
@pytest.mark.parametrize("K,N,G", [(1024, 3584, 32), (2048, 1024, 128), (160, 130, 32), (192, 100, 64)], ids=str)
def test_avx_vnni_build_gives_the_avx2_numbers(K, N, G, monkeypatch):
    """avx2.c's int4 GEMV built for AVX-VNNI (vpdpbusd on four columns: exact int32 block sums, each row's fp32 steps
    those of the vpmaddubsw path) equals the plain AVX2 build bit for bit, for 1 to 19 rows and both scale dtypes:
    natively on a CPU with AVX-VNNI, else with vpdpbusd emulated by SIMDe. The plain build is held to the twins
    above, so this holds the VNNI one to them too. The same build with a vpdpbusd that adds nothing gives other
    numbers: the VNNI path is the one these flags build."""
    native = "avx_vnni" in kernels._cpuinfo()[1]
    vnni = kernels.UPGRADES["avx2"][1] if native else x86_emulation.AVX_VNNI
    builds = {"avx2": ["-march=x86-64-v3"], "avx-vnni": vnni,
              "broken": [*x86_emulation.AVX_VNNI, "-DQK_DPBUSD_ADDS_NOTHING"]}  # fmt: skip
    gen = torch.Generator().manual_seed(K + N + G)
    w = torch.randn(N, K, generator=gen) * 0.05
    xs = [torch.randn(M, K, generator=gen).to(torch.bfloat16) for M in (1, 3, 5, 8, 19)]
    quantized = [qm.quantize_int4(w, G, dtype) for dtype in (torch.bfloat16, torch.float32)]
    outs = {}
    for name, flags in builds.items():
        monkeypatch.setitem(kernels.UPGRADES, "avx2", ((), flags))  # () <= any CPU's features: these flags
        force_isa(monkeypatch, "avx2")
        kernels._load.cache_clear()  # one library per instruction set: the previous build's
        outs[name] = [kernels.int4_gemv(x, packed, sz, G, N) for packed, sz in quantized for x in xs]
    kernels._load.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(outs["avx2"], outs["avx-vnni"], strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(outs["avx2"], outs["broken"], strict=True))


def test_activation_quantization_twin():
    """quant_matmul.quantize_activations, the twin of the kernels' int8 activations: each block of 16 within half a
    step of its scale (max |x| / 127, the largest value exact), an all-zero block all zeros, a block with an inf or a
    NaN a NaN scale (so the outputs it feeds are NaN), the others untouched."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 64, generator=gen) * torch.logspace(-3, 3, 64)).to(torch.bfloat16)
    x[1, 16:32] = 0
    x[2, 0], x[2, 40] = float("inf"), float("nan")
    q, s = qm.quantize_activations(x)
    assert q.dtype == torch.int8 and s.shape == (3, 4)
    back = qm.dequantize_activations(q, s)
    blocks = x.float().reshape(3, 4, 16)
    top = blocks.abs().amax(-1)
    ok = top.isfinite()
    err = (back.reshape(3, 4, 16) - blocks).abs().amax(-1)
    assert (err[ok] <= 0.5 * s[ok] * 1.0001).all() and torch.equal(s[ok], top[ok] / 127)
    assert (q.reshape(3, 4, 16).abs().amax(-1)[ok & (top > 0)] == 127).all()
    assert torch.equal(q[1, 16:32], torch.zeros(16, dtype=torch.int8)) and s[1, 1] == 0
    assert s[2, 0].isnan() and s[2, 2].isnan() and not s[2, 1].isnan() and not s[2, 3].isnan()


@needs_kernels
def test_int4_gemv_propagates_inf_and_nan(isa):
    """An inf or a NaN in a row of x makes that row's outputs NaN (the reference's are inf or NaN), never finite
    numbers, and leaves the other rows alone."""
    gen = torch.Generator().manual_seed(4)
    packed, sz = qm.quantize_int4(torch.randn(64, 128, generator=gen), 32, torch.bfloat16)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
        x[3, 70] = bad
        y = kernels.int4_matmul(x, packed, sz, 32, 64)
        assert y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any(), isa


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_of_the_first_rows(isa, dtype):
    """Outputs 0..n of a (Np, K) int4 matrix (the MTP drafts' restricted head; the kernel runs only the tiles that
    hold them): exactly the full product's first n columns, for n inside a tile and on a tile's edge, the scales
    still read Np apart; NaN scales past row n change nothing."""
    gen = torch.Generator().manual_seed(6)
    packed, sz = qm.quantize_int4(torch.randn(320, 128, generator=gen), 32, dtype)
    x = torch.randn(3, 128, generator=gen).to(dtype)
    full = kernels.int4_gemv(x, packed, sz, 32, 320)
    poisoned = sz.clone()
    poisoned[:, 192:] = float("nan")
    for n in (64, 100, 192):
        assert torch.equal(kernels.int4_gemv(x, packed, poisoned, 32, n), full[:, :n]), (isa, n)
    assert kernels.int4_gemv(x, packed, poisoned, 32, 193).isnan().any()  # the poison is in play


@needs_kernels
@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 32), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_embedding_rows_in_c_are_the_reference_rows(isa, bits, group_size, dtype):
    """QuantEmbedding looks rows up in C (kernels.embed_rows): bit for bit quant_matmul.int8_rows / int4_rows, for ids
    of any shape, in a tile's second half, on a tile's edge and in the last, padded tile (100 rows); a float table's
    rows are its own. An id outside the table is a one-line IndexError, never a read past it."""
    gen = torch.Generator().manual_seed(9)
    embed = QuantEmbedding.sharing(QuantLinear.from_weight(torch.randn(100, 96, generator=gen).to(dtype), bits,
                                                           group_size))  # fmt: skip
    ids = torch.tensor([[0, 31, 32, 63], [64, 99, 5, 5]])
    assert embed.kernel_plan(dtype) is not None  # the C lookup is the one under test
    rows = qm.int8_rows if bits == 8 else qm.int4_rows
    want = rows(embed.qweight, embed.scale_tensor, ids, dtype)
    assert want.shape == (2, 4, 96) and torch.equal(embed(ids), want)
    w = torch.randn(100, 96, generator=gen).to(dtype)
    table = kernels.plan_linear(kernels.FMT_BF16 if dtype == torch.bfloat16 else kernels.FMT_F32, w, 100, 96, dtype)
    assert torch.equal(kernels.embed_rows(table, ids, dtype), w[ids])
    for bad in (100, -1):
        with pytest.raises(IndexError, match=f"token id {bad} is outside the embedding's 100 rows"):
            embed(torch.tensor([3, bad]))


@needs_kernels
def test_quantized_kernels_refuse_what_they_cannot_do():
    """A group size that is not a multiple of 16, or activations in fp16, go to torch's kernels or the reference,
    never to a kernel that would read them wrong."""
    q, s = qm.quantize_int8(torch.randn(8, 48), 24, torch.float32)
    assert not kernels.int8_ok(torch.randn(1, 48), q, s)
    q, s = qm.quantize_int8(torch.randn(8, 40), 40, torch.float32)
    assert not kernels.int8_ok(torch.randn(1, 40), q, s)
    assert not kernels.int8_ok(torch.randn(1, 48).half(), *qm.quantize_int8(torch.randn(8, 48), 48, torch.float32))
    packed, sz = qm.quantize_int4(torch.randn(8, 64), 32, torch.float32)
    assert not kernels.int4_ok(torch.randn(1, 128)[:, ::2], packed, sz, 32)  # not contiguous


def layer_config(**overrides) -> ModelConfig:
    """The 0.8B's layer shapes by default (hidden 1024, 16 x 128 delta-rule heads, 8 x 256 attention heads)."""
    return preset_config("qwen3.5-0.8b", **{"num_hidden_layers": 4, "vocab_size": 64, **overrides})


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif not name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# The recurrent state is fp32 in both paths and in both dtypes, fed the same inputs (the projections are the same
# kernels in both, the layer's `fast` flag switching only what follows them): only the fp32 summation order differs,
# so bf16 gets fp32's bound. A state rounded to bf16 anywhere, or an input read a bf16 step (2^-8) off, exceeds it.
STATE_TOLERANCE = 1e-5
GDN_CASES = [  # (B, Hk, Hv, Dk, Dv, dtype)
    (1, 16, 16, 128, 128, torch.bfloat16), (1, 16, 16, 128, 128, torch.float32),
    (3, 2, 4, 32, 48, torch.float32), (2, 2, 4, 32, 48, torch.bfloat16),
]  # fmt: skip


@two_threads
@needs_kernels
@pytest.mark.parametrize("B,Hk,Hv,Dk,Dv,dtype", GDN_CASES, ids=str)
def test_gdn_decode_matches_the_layer(B, Hk, Hv, Dk, Dv, dtype):
    """Several decode steps through a Gated DeltaNet layer, fused vs its torch path: outputs, conv state and
    recurrent state agree; grouped value heads (Hv = 2 Hk) and batched rows included."""
    config = layer_config(linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=Dk,
                          linear_value_head_dim=Dv)  # fmt: skip
    gen = torch.Generator().manual_seed(B * Hv + Dk)
    layer = GatedDeltaNet(config)
    randomize(layer, gen)
    layer = layer.to(dtype)
    fast_cache, ref_cache = (make_cache(config, B, 8, dtype).layers[0] for _ in range(2))  # layer 0: linear
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(B, 1, config.hidden_size, generator=gen).to(dtype)
            layer.fast = True
            assert kernels.gdn_decode_ok(layer.in_proj_qkv(x), fast_cache.state, layer.conv1d.weight, layer.A_log)
            fast = layer(x, fast_cache)
            layer.fast = False
            ref = layer(x, ref_cache)
            assert relative_error(fast, ref) <= TOLERANCE[dtype], step
            assert relative_error(fast_cache.state, ref_cache.state) <= STATE_TOLERANCE, step
            assert torch.equal(fast_cache.conv, ref_cache.conv)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_silu_matches_reference(dtype):
    """A prompt in three pieces through the causal conv + SiLU, carrying the state: the fused kernel's outputs and
    state equal causal_conv1d's followed by SiLU."""
    gen = torch.Generator().manual_seed(4)
    B, C, K = 2, 96, 4
    weight = (torch.randn(C, 1, K, generator=gen) * 0.5).to(dtype)
    state = torch.zeros(B, K - 1, C, dtype=dtype)
    ref_state = state.clone()
    for T in (5, 1, 70):
        x = torch.randn(B, T, C, generator=gen).to(dtype)
        assert kernels.conv_silu_ok(x, state, weight)
        fast = kernels.conv_silu(x, weight, state)
        ref, ref_state = causal_conv1d(x, weight, ref_state)
        assert relative_error(fast, F.silu(ref)) <= 1e-5, T
        assert torch.equal(state, ref_state), T


@needs_kernels
@pytest.mark.parametrize("B,T,Hk,Hv,Dk,Dv", [(1, 70, 2, 2, 128, 128), (2, 9, 1, 3, 16, 48)], ids=str)
def test_delta_rule_matches_the_recurrence(B, T, Hk, Hv, Dk, Dv):
    """A prompt's delta rule in C against the token-by-token spec, in two pieces carrying the state: outputs and the
    final state within fp32's summation-order error (1e-5 relative); grouped value heads, and columns (48) no
    multiple of a pass's 32 or 64, included. The state given is advanced in place; with none it starts at zero."""
    gen = torch.Generator().manual_seed(T)
    state = torch.randn(B, Hv, Dk, Dv, generator=gen) * 0.1
    ref_state = state.clone()
    for piece in (T, 3):
        q = F.normalize(torch.randn(B, piece, Hk, Dk, generator=gen), dim=-1) * Dk**-0.5
        k = F.normalize(torch.randn(B, piece, Hk, Dk, generator=gen), dim=-1)
        v = torch.randn(B, piece, Hv, Dv, generator=gen)
        g, beta = -torch.rand(B, piece, Hv, generator=gen), torch.rand(B, piece, Hv, generator=gen)
        assert kernels.delta_rule_ok(v, state)
        o, same = kernels.delta_rule(q, k, v, g, beta, state)
        ref, ref_state = gated_delta_rule_recurrent(q, k, v, g, beta, ref_state)
        assert same is state
        assert relative_error(o, ref) <= 1e-5, piece
        assert relative_error(state, ref_state) <= 1e-5, piece
    o, fresh = kernels.delta_rule(q, k, v, g, beta)
    assert relative_error(o, gated_delta_rule_recurrent(q, k, v, g, beta)[0]) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(256, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen) * 0.3)
    norm = norm.to(dtype)
    x = torch.randn(2, 3, 4, 512, generator=gen).to(dtype)
    for view in (x[..., :256], x[..., 256:], x.reshape(-1, 256)):  # a slice of rows (q of [q | gate]), plain rows
        assert kernels.rmsnorm_ok(view, norm.weight)  # else both sides would be torch's
        with torch.no_grad():
            norm.fast = True
            fast = norm(view)
            norm.fast = False
            assert relative_error(fast, norm(view)) <= TOLERANCE[dtype]


@two_threads
@needs_kernels
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attn_decode_matches_the_layer(dtype, gated):
    """Decode steps through an attention layer (0.8B shapes: 8 query heads on 2 kv heads, head dim 256, rotary on
    64 dims), fused vs its torch path, with rows at different positions: outputs and the written caches agree."""
    config = layer_config(attn_output_gate=gated)
    gen = torch.Generator().manual_seed(int(gated))
    layer = Attention(config)
    randomize(layer, gen)
    layer = layer.to(dtype)
    B, Tmax = 3, 40
    inv_freq = rope_inv_freq(config.rotary_dim, config.rope_theta)
    fast_cache, ref_cache = (make_cache(config, B, Tmax, dtype).layers[3] for _ in range(2))  # layer 3: full
    for c in (fast_cache, ref_cache):  # the same random prefix in both
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(2)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(3)))
    starts = [0, 17, 35]
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(B, 1, config.hidden_size, generator=gen).to(dtype)
            start = [s + step for s in starts]
            cos, sin = rope_cos_sin(torch.tensor(start)[:, None, None], inv_freq, dtype)  # (B, 1, 1, R)
            layer.fast = True
            assert kernels.attn_decode_ok(layer.q_proj(x), fast_cache.k, layer.q_norm.weight, layer.k_norm.weight)
            fast = layer(x, cos, sin, fast_cache, start)
            layer.fast = False
            ref = layer(x, cos, sin, ref_cache, start)
            assert relative_error(fast, ref) <= TOLERANCE[dtype], step
            assert relative_error(fast_cache.k, ref_cache.k) <= TOLERANCE[dtype]
            assert torch.equal(fast_cache.v, ref_cache.v)


def logits_over_steps(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    cache = make_cache(model.config, 1, len(prompt) + steps, model.dtype)
    with torch.inference_mode():
        logits = run_model(model, torch.tensor([prompt]), cache, logits_to_keep=1)[0, -1]
        out, rows = [], []
        for _ in range(steps):
            out.append(int(logits.argmax()))
            rows.append(logits)
            logits = run_model(model, torch.tensor([[out[-1]]]), cache)[0, -1]
    return out, torch.stack(rows)


@needs_kernels
def test_model_with_kernels_equals_reference(tmp_path_factory):
    """fp32: greedy decode with the fused delta-rule step equals the pure-torch path token for token; bf16: the
    GEMVs and the step give the reference's logits within bf16 rounding, fed the same tokens."""
    from qwenlite.model.qwen3_5 import set_fast

    path = tiny_checkpoint(tmp_path_factory)
    prompt = random_ids(1, 12, vocab=248000, seed=5)[0].tolist()
    model = load_checkpoint(path, "float32").model
    fast, _ = logits_over_steps(model, prompt, 16)
    set_fast(model, False)
    assert logits_over_steps(model, prompt, 16)[0] == fast

    model = load_checkpoint(path, "bfloat16").model
    tokens, fast_logits = logits_over_steps(model, prompt, 8)
    set_fast(model, False)
    cache = make_cache(model.config, 1, 32, model.dtype)
    with torch.inference_mode():
        ref = [model(torch.tensor([prompt]), cache, logits_to_keep=1)[0, -1]]
        ref += [model(torch.tensor([[t]]), cache)[0, -1] for t in tokens[:-1]]
    assert relative_error(fast_logits, torch.stack(ref)) <= 3e-2  # bf16 activations through 4 layers


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_with_kernels_equals_reference(tmp_path_factory, bits):
    """bf16 activations, int8 / int4 weights: the one-call decode step (avx2: int8 weights times activations as int16
    blocks, int4 weights times activations as int8 blocks of 16, in integer dot products; avx512: fp32 FMA / bf16 dot
    products) gives the pure-torch reference's logits (dequantize to fp32, fp32 matmul) within bounds through 4
    layers, fed the same tokens.

    This random model amplifies every difference: a GEMV off by a bf16 rounding flips later roundings the reference
    and the fp32-activation path share. Measured (8 steps, 2-core AMD EPYC, avx2): logits max relative error int8
    3.3e-2 (fp32-activation path 6.3e-3), int4 1.2e-1 (1.1e-2); mean KL(reference || fast) int8 1.2e-3 (1.2e-4),
    int4 1.0e-2 (2.0e-4). The bounds below are under twice those; a kernel that reads a wrong lane is off by 1e0.
    What the activations cost on a model with real predictions: the next test."""
    from qwenlite.model.quantized import quantize_model
    from qwenlite.model.qwen3_5 import set_fast

    prompt = random_ids(1, 12, vocab=248000, seed=11)[0].tolist()
    model = quantize_model(load_checkpoint(tiny_checkpoint(tmp_path_factory), "bfloat16").model, bits)
    tokens, fast_logits = logits_over_steps(model, prompt, 8)
    assert model.__dict__["_decode_plan"].layers is not None  # the one-call path ran
    set_fast(model, False)
    cache = make_cache(model.config, 1, 32, model.dtype)
    with torch.inference_mode():
        ref = [model(torch.tensor([prompt]), cache, logits_to_keep=1)[0, -1]]
        ref += [model(torch.tensor([[t]]), cache)[0, -1] for t in tokens[:-1]]
    bound, kl_bound = (5e-2, 2e-3) if bits == 8 else (2e-1, 2e-2)
    assert relative_error(fast_logits, torch.stack(ref)) <= bound
    kl, _ = kl_and_top1(torch.stack(ref), fast_logits)
    assert kl <= kl_bound, kl


@needs_kernels
@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32), (4, 128)])
def test_quantized_decode_costs_little_on_real_predictions(trained, bits, group_size):
    """The accuracy cost of how the GEMVs treat bf16 activations (avx2: int16 blocks for int8 weights, int8 blocks of
    16 for int4 weights), on a model with real predictions (conftest's `trained`: a tiny Qwen3.5 trained on a Markov
    chain, mean top probability 0.69), 128 held-out tokens decoded one by one in bf16 with the one-call step, against
    the pure-torch reference (dequantize to fp32, fp32 matmul). Measured on the 2-core AMD EPYC (avx2), 256 tokens:
    mean KL(reference || fast) int8 1.1e-5; int4 2.9e-5 (groups of 32) and 3.5e-5 (128) with int8 activations, where
    the int16 activations they replaced gave 1.0e-5 and 1.4e-5; top-1 agreement 100% in all. Quantizing the weights
    themselves costs this model far more: KL 3.4e-5 (int8), 9.8e-4 and 1.6e-3 (int4, groups of 32 and 128)."""
    from qwenlite.model.quantized import quantize_model
    from qwenlite.model.qwen3_5 import set_fast

    path, ids = trained
    tokens = ids.reshape(-1)[:128].tolist()

    def decode(model):
        cache = make_cache(model.config, 1, len(tokens), model.dtype)
        with torch.inference_mode():
            return torch.stack([run_model(model, torch.tensor([[t]]), cache)[0, -1] for t in tokens])

    model = quantize_model(load_checkpoint(path, "bfloat16").model, bits, group_size)
    fast = decode(model)
    assert model.__dict__["_decode_plan"].layers is not None  # the one-call path ran
    set_fast(model, False)
    kl, top1 = kl_and_top1(decode(model), fast)
    assert kl <= 1e-4 and top1 >= 0.99, (kl, top1)


@needs_kernels
def test_decode_plan_follows_the_model(tmp_path_factory, monkeypatch):
    """The one-call decode keeps a description of the weights (pointers) between steps and re-checks it only when
    the weights' version (model/versions.py) moved: decode steps alone never re-check it; `.to()`, quantization's
    module swaps and new storage behind the same Parameters announced with `weights_changed()` are seen, never read
    stale (without the version each of them would leave the step reading freed memory): the fast logits keep
    matching those of a copy running the pure-torch path."""
    from qwenlite.model import runner
    from qwenlite.model.quantized import quantize_model
    from qwenlite.model.qwen3_5 import set_fast
    from qwenlite.model.versions import weights_changed

    checks = []
    valid = runner.Plan.valid
    monkeypatch.setattr(runner.Plan, "valid", lambda plan: checks.append(plan) or valid(plan))

    def fast_logits(model, prompt):
        plan, checks[:] = model.__dict__.get("_decode_plan"), []
        out = logits_over_steps(model, prompt, 6)[1]
        assert model.__dict__["_decode_plan"].layers is not None  # the one-call path ran
        assert len(checks) == (plan is not None)  # a plan already built is checked once, a new one never
        return out

    def reference_logits(model, prompt):
        reference = copy.deepcopy(model)
        set_fast(reference, False)
        return logits_over_steps(reference, prompt, 6)[1]

    prompt = random_ids(1, 10, vocab=248000, seed=7)[0].tolist()
    model = load_checkpoint(tiny_checkpoint(tmp_path_factory), "float32").model
    before = fast_logits(model, prompt)
    assert relative_error(before, reference_logits(model, prompt)) <= 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 1.25  # same Parameter objects, new storage and values
    weights_changed()
    after = fast_logits(model, prompt)
    assert relative_error(after, reference_logits(model, prompt)) <= 1e-5 and relative_error(after, before) > 1e-2
    model.to(torch.float64).to(torch.float32)  # every tensor in new storage: the first copies are freed
    assert relative_error(fast_logits(model, prompt), after) <= 1e-6
    quantize_model(model, 8)
    assert relative_error(fast_logits(model, prompt), reference_logits(model, prompt)) <= 1e-4


def test_a_scratch_buffer_made_in_inference_mode_is_written_outside_it():
    """kernels.scratch's buffer, first made inside inference mode (a prompt under generate_tokens) and reused outside
    it (a no_grad forward in the same process): a normal tensor, so the in-place copy into it is allowed."""
    with torch.inference_mode():
        kernels.scratch((3,), torch.float64)  # a dtype no kernel uses: made here
    assert torch.equal(kernels.scratch((3,), torch.float64).copy_(torch.ones(3)), torch.ones(3, dtype=torch.float64))


@needs_kernels
def test_a_decode_step_that_cannot_allocate_is_a_memory_error():
    """The step's one buffer is checked: a size no allocator grants (a hidden size of 2^50) is a MemoryError before
    anything is read or written, not a crash."""
    model = kernels.QkModel(hidden=1 << 50, vocab=4, rows=1, tokens=1)  # no layers
    with pytest.raises(MemoryError, match="could not be allocated"):
        kernels.decode_step(model, torch.zeros(1, 16))


@needs_kernels
def test_the_plan_structs_mirror_plan_h():
    """kernels.py's ctypes structs have plan.h's layout, field for field, as the library reports it (checked at load
    too); a struct that disagrees is a KernelError naming the field, never a step reading the wrong bytes."""
    c = kernels.c_plan_layout(kernels.library())
    assert c == kernels.plan_layout() and len(c) == 91
    assert c["struct qk_linear.bias"] == (24, 8) and c["struct qk_model.eps"] == (12, 4)
    kernels.check_plan_layout(c)
    moved = {**c, "struct qk_attn.k_norm": (c["struct qk_attn.k_norm"][0] + 8, 8)}
    with pytest.raises(KernelError, match=r"^decode plan layout: struct qk_attn.k_norm is 8 bytes at 208 in C, 8 bytes "
                                          r"at 200 in kernels.py \(plan.h and kernels.py must agree\)$"):  # fmt: skip
        kernels.check_plan_layout(moved)
    with pytest.raises(KernelError, match=r"struct qk_model is 368 bytes in C, 360 bytes in kernels.py"):
        kernels.check_plan_layout({**c, "struct qk_model": (-1, 368)})
    with pytest.raises(KernelError, match=r"struct qk_layer.kind is absent in C, 4 bytes at 0 in kernels.py"):
        kernels.check_plan_layout({k: v for k, v in c.items() if k != "struct qk_layer.kind"})


# --- the fallbacks, on every CPU ---------------------------------------------------------------------------------

GREEDY_RUN = """
import json, sys, warnings
import torch
from qwenlite.generate import generate_tokens
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.ops.cpu import kernels
from qwenlite.sample import SamplingParams

path, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = load_checkpoint(path, "float32").model
    tokens = list(generate_tokens(model, prompt, SamplingParams(temperature=0), steps))
    available = kernels.available()
print(json.dumps({"tokens": tokens, "available": available, "warnings": [str(w.message) for w in caught]}))
"""


def greedy_in_a_fresh_process(path, prompt: list[int], steps: int, env: dict) -> dict:
    """Greedy tokens of the checkpoint at `path` from a new interpreter (the kernels decide once per process) running
    this checkout's qwenlite, with `env` as its whole environment."""
    env = {**env, "PYTHONPATH": str(Path(qwenlite.__file__).parents[1])}
    argv = [sys.executable, "-c", GREEDY_RUN, str(path), json.dumps(prompt), str(steps)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens: the full sequence through its forward at each step, no cache."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            next_id = hf(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A transformers tiny checkpoint, its greedy answer to a prompt (crossing a 64-token chunk) and that prompt."""
    path = tmp_path_factory.mktemp("hf-tiny")
    hf = make_hf_checkpoint(path)
    prompt = random_ids(1, 70, seed=9)[0].tolist()
    return path, prompt, transformers_greedy(hf, prompt, 12)


def test_build_failure_falls_back_to_torch(hf_tiny, tmp_path):
    """No working compiler: one warning, kernels unavailable, and the model still runs, on torch's kernels, and answers
    what transformers answers, token for token."""
    path, prompt, expected = hf_tiny
    env = {"PATH": "/usr/bin:/bin", "CC": "/nonexistent/cc", "QWENLITE_CACHE": str(tmp_path), "HOME": str(tmp_path)}
    got = greedy_in_a_fresh_process(path, prompt, len(expected), env)
    assert [w for w in got["warnings"] if "CPU kernels unavailable" in w] == got["warnings"]
    assert len(got["warnings"]) == 1, got["warnings"]
    assert got["available"] is False
    assert got["tokens"] == expected


def test_kernels_switched_off_run_the_model_on_torch(hf_tiny, tmp_path):
    """QWENLITE_KERNELS=0 (checked in kernels.library, once per process): no build, no warning, kernels unavailable,
    and greedy decoding (prefill in chunks, then run_model's decode steps) equals transformers token for token."""
    path, prompt, expected = hf_tiny
    env = {**os.environ, "QWENLITE_KERNELS": "0", "QWENLITE_CACHE": str(tmp_path)}
    got = greedy_in_a_fresh_process(path, prompt, len(expected), env)
    assert got["warnings"] == [] and got["available"] is False
    assert not any(tmp_path.iterdir())  # nothing was compiled
    assert got["tokens"] == expected


# --- choosing the instruction set, on every CPU ------------------------------------------------------------------


@pytest.fixture
def fake_cpu(monkeypatch):
    """Pretend to be a CPU (x86 unless `machine` says otherwise) with the given /proc/cpuinfo flags; the kernels
    choose again before and after."""

    def pretend(*flags: str, machine: str = "x86_64") -> None:
        monkeypatch.setattr(kernels, "_cpuinfo", lambda: ("Test CPU", frozenset(flags)))
        monkeypatch.setattr(kernels.platform, "machine", lambda: machine)
        kernels.library.cache_clear()

    yield pretend
    kernels.library.cache_clear()


AVX2_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")  # Sapphire Rapids, Zen 4 have more
ARM_FEATURES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "asimddp")  # Cortex-A76


def test_the_fastest_instruction_set_the_cpu_runs_is_chosen(fake_cpu, monkeypatch):
    monkeypatch.delenv("QWENLITE_ISA", raising=False)
    monkeypatch.delenv("QWENLITE_KERNELS", raising=False)
    fake_cpu(*AVX2_FLAGS, *AVX512_FLAGS)
    assert kernels.runnable_isas() == ["avx512", "avx2", "torch"]
    fake_cpu(*AVX2_FLAGS, "avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # without BF16 (Cascade Lake, Ice Lake)
    assert kernels.runnable_isas() == ["avx2", "torch"]
    fake_cpu(*AVX2_FLAGS, "avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # no such CPU; without VNNI all the same
    assert kernels.runnable_isas() == ["avx2", "torch"]
    fake_cpu("sse4_2", "avx", "avx2")  # AVX2 without FMA: no fast path, torch's kernels, no error
    assert kernels.runnable_isas() == ["torch"]
    assert not kernels.available() and kernels.isa() == "torch"
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.runnable_isas() == ["torch"]  # x86 flags on ARM: no x86 kernels there, and no asimd
    fake_cpu(*ARM_FEATURES, machine="aarch64")
    assert kernels.runnable_isas() == ["neon", "torch"]
    fake_cpu(*ARM_FEATURES, *AVX2_FLAGS, *AVX512_FLAGS, machine="aarch64")
    assert kernels.runnable_isas() == ["neon", "torch"]  # x86 sets only on x86, whatever the flags say
    fake_cpu(*ARM_FEATURES, *AVX2_FLAGS, machine="x86_64")
    assert kernels.runnable_isas() == ["avx2", "torch"]  # and neon only on ARM


def test_neon_is_built_for_dotprod_only_where_the_cpu_has_it(fake_cpu):
    """asimddp (ARMv8.2's sdot) raises the neon build's target; without it neon is still chosen (or can be forced),
    built for ARMv8.0. The flags are part of the library's cache key, so the two builds never share a file."""
    fake_cpu(*ARM_FEATURES, machine="aarch64")
    assert kernels.runnable_isas()[0] == "neon" and kernels.target_flags("neon") == ["-march=armv8.2-a+dotprod"]
    fake_cpu(*(f for f in ARM_FEATURES if f != "asimddp"), machine="aarch64")
    assert kernels.runnable_isas()[0] == "neon" and not kernels.missing_features("neon")
    assert kernels.target_flags("neon") == kernels.ISAS["neon"][2] == ["-march=armv8-a+simd"]
    assert kernels.target_flags("avx2", frozenset({"asimddp", *AVX2_FLAGS})) == ["-march=x86-64-v3"]
    assert kernels.target_flags("avx2", frozenset({"avx_vnni", *AVX2_FLAGS})) == ["-march=x86-64-v3", "-mavxvnni"]


@pytest.mark.skipif("avx2" not in KERNEL_ISAS, reason="avx2.c does not run on this CPU")
def test_an_upgrade_the_compiler_cannot_build_leaves_the_plain_build(monkeypatch, tmp_path):
    """UPGRADES' flags raise an instruction set's build where the CPU has their features (here a stand-in upgrade of
    avx2 on "avx2"), and `isa_label` names them; a compiler that cannot build them (gcc before 11 and -mavxvnni) gets
    the plain build of the same instruction set and a warning saying so, not torch's kernels."""
    monkeypatch.setenv("QWENLITE_CACHE", str(tmp_path))
    for flag, builds in (("-DQK_UPGRADED", True), ("-mno-such-option", False)):
        monkeypatch.setitem(kernels.UPGRADES, "avx2", (("avx2",), ["-march=x86-64-v3", flag]))
        force_isa(monkeypatch, "avx2")
        kernels._load.cache_clear()
        warning = f"the avx2 kernels did not build with -march=x86-64-v3 {flag}"
        with contextlib.nullcontext() if builds else pytest.warns(RuntimeWarning, match=warning):
            label = kernels.isa_label()
        assert label == ("avx2+avx2" if builds else "avx2") and kernels.isa() == "avx2"
    kernels._load.cache_clear()


ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""


def test_cpuinfo_features_are_read_on_x86_and_arm():
    """x86 lists a CPU's features as "flags", AArch64 Linux as "Features" (and names no model)."""
    name, features = kernels.parse_cpuinfo(ARM_CPUINFO)
    assert {"asimd", "asimddp"} <= features and "fp" in features and name
    x86 = "processor\t: 0\nmodel name\t: Test x86\nflags\t\t: fpu sse2 avx2 fma\n"
    assert kernels.parse_cpuinfo(x86) == ("Test x86", frozenset({"fpu", "sse2", "avx2", "fma"}))


def test_a_forced_instruction_set_the_cpu_cannot_run_is_a_one_line_error(fake_cpu, monkeypatch):
    fake_cpu(*AVX2_FLAGS)
    monkeypatch.setenv("QWENLITE_ISA", "avx512")
    with pytest.raises(KernelError, match=r"^QWENLITE_ISA=avx512: this CPU \(Test CPU\) lacks avx512f, avx512bw, "
                                          r"avx512vl, avx512_bf16, avx512_vnni; it can run avx2, torch$"):  # fmt: skip
        kernels.available()
    monkeypatch.setenv("QWENLITE_ISA", "neon")
    with pytest.raises(KernelError, match=r"^QWENLITE_ISA=neon: this CPU \(Test CPU\) lacks an AArch64 CPU \(this is "
                                          r"x86_64\); it can run avx2, torch$"):  # fmt: skip
        kernels.available()
    fake_cpu("fp", "evtstrm", machine="aarch64")  # ARM without Advanced SIMD (the Linux ABI allows it)
    with pytest.raises(KernelError, match=r"lacks asimd; it can run torch$"):
        kernels.available()
    monkeypatch.setenv("QWENLITE_ISA", "sse9")
    with pytest.raises(KernelError, match="QWENLITE_ISA=sse9: unknown; choose one of avx512, avx2, neon, torch"):
        kernels.isa()
    monkeypatch.setenv("QWENLITE_ISA", "torch")
    kernels.library.cache_clear()
    assert kernels.isa() == "torch" and not kernels.available()


def test_the_cli_reports_a_bad_isa_in_one_line(tmp_path):
    """Through the command line: no traceback, one line that names the variable."""
    env = {**os.environ, "QWENLITE_ISA": "sse9", "PYTHONPATH": str(Path(qwenlite.__file__).parents[1])}
    argv = [sys.executable, "-m", "qwenlite.cli", "init-random", "tiny", str(tmp_path / "m"), "--dtype", "float32"]
    assert subprocess.run(argv, env=env, capture_output=True, timeout=120).returncode == 0
    done = subprocess.run([*argv[:3], "run", str(tmp_path / "m"), "Hi", "--max-tokens", "2"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "qwenlite: error: QWENLITE_ISA=sse9: unknown; choose one of avx512, avx2, neon, torch"
    ]
