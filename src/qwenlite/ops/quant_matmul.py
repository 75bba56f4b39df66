"""Weight-only quantized matmul: y = x @ W^T with W stored as low-bit integers and scales. Pure functions.

Two formats, each with a pure-torch reference (dequantize to fp32, fp32 matmul, round to x's dtype) that is the
spec, and a fast path through torch's own CPU kernels where they apply:

int8, symmetric: `qweight` (N, K) int8 in [-127, 127], `scales` (N, K/G) in the compute dtype; W = q * s.
    G = K (one scale per output channel) is the default and the only layout `aten._weight_int8pack_mm` takes.
    Its bf16 kernel reads K in steps of 16: for other K it crashes or returns garbage; and with 4 or more rows
    of x it crashes on a qweight not 16-byte aligned (torch 2.13, measured). So the fast path also needs
    K % 16 == 0 and a 64-byte aligned qweight (torch's allocations are; quant.save_aligned files are).
int4, asymmetric: `qweight` uint8 in the "tiled64" layout below, `scales_and_zeros` (K/G, Np, 2) in the compute
    dtype, Np = N rounded up to 64; W = (q - 8) * s + z with q in [0, 15], the form
    `aten._weight_int4pack_mm_for_cpu` computes (s = (max - min) / 15, z = min + 8 s per group). Asymmetric
    because at 4 bits an unused half of the range costs a bit of precision; the zero costs 2 bytes per group.
    G must be 32, 64, 128 or 256 (the kernel's) and divide K; anything else is an error at quantization time.

The tiled64 layout: rows padded with zeros to Np, then byte [b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4,
shape (Np/64, K, 32). It is what `aten._convert_weight_to_int4pack_for_cpu` produces on AVX-512 CPUs for N % 64 == 0,
so a checkpoint in this layout feeds the kernel straight from the memory map; other CPUs (torch packs differently
for AVX2 and plain builds) get a one-time repack, `int4_kernel_weight`. Padded rows have s = z = 0, so they are 0.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qwenlite.errors import InvalidArgument

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
TILE = 64  # rows per int4 tile
ACT_BLOCK = 16  # activation values per scale where the GEMVs quantize activations to int8
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_CHUNK = 16384  # rows dequantized at a time by the references: bounds their fp32 temporaries (64 MB at K 1024)
# Weights quantized at a time (at least), in one fp32 scratch tensor per call worked on in place: 32 MiB or more,
# the size from which glibc's malloc always maps an allocation of its own (touched only where used, returned when
# freed). Smaller scratch tensors come from the heap, between the quantized tensors being kept, and fragment it:
# +0.8 GiB peak quantizing a 2B model to int8.
QUANT_CHUNK = 1 << 23


def padded_rows(n: int) -> int:
    return -(-n // TILE) * TILE


def _quant_rows(K: int) -> int:
    """Rows quantized at a time: whole int4 tiles, at least QUANT_CHUNK weights."""
    return TILE * -(-QUANT_CHUNK // (K * TILE))


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    if K % group_size:
        raise InvalidArgument(f"K = {K} is not a multiple of the group size {group_size}")
    return w.reshape(N, K // group_size, group_size)


# ---------------------------------------------------------------------------------------------
# int8 activations: what the integer-dot-product GEMVs multiply the weights with


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), K % ACT_BLOCK == 0 -> q (M, K) int8, scales (M, K / ACT_BLOCK) fp32, x ~ q * s per block of
    ACT_BLOCK values: s = max |x| / 127, q = round(x * (127 / max |x|)) in fp32, ties to even. The twin of the C
    kernels' activation quantization (ops/cpu, `kernels.integer_gemv`); an inf or NaN makes its block's
    scale NaN."""
    M, K = x.shape
    blocks = x.float().reshape(M, K // ACT_BLOCK, ACT_BLOCK)
    top = blocks.abs().amax(-1, keepdim=True)
    finite = top.isfinite()
    inv = torch.where(finite & (top > 0), 127.0 / top, torch.zeros_like(top))
    q = torch.round(blocks * inv).to(torch.int8).reshape(M, K)
    return q, torch.where(finite, top / 127.0, torch.full_like(top, float("nan"))).reshape(M, -1)


def dequantize_activations(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) int8, (M, K / ACT_BLOCK) -> (M, K) fp32."""
    M, K = q.shape
    return (q.float().reshape(M, -1, ACT_BLOCK) * scales.unsqueeze(-1)).reshape(M, K)


# ---------------------------------------------------------------------------------------------
# int8


def quantize_int8(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> qweight (N, K) int8, scales (N, K/G) `dtype`, a few rows at a time: the temporaries stay small
    whatever the size of w. The stored (rounded) scale is the one q is computed with, so dequantization
    reproduces round(w / s) * s exactly."""
    N, K = w.shape
    qweight = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, K // group_size, dtype=dtype, device=w.device)
    step = _quant_rows(K)
    scratch = torch.empty(step, K, device=w.device)  # see QUANT_CHUNK
    for r in range(0, N, step):
        x = scratch[: min(step, N - r)]  # (n, K)
        x.copy_(w[r : r + step])
        g = _groups(x, group_size)  # (n, K/G, G)
        s = (torch.maximum(g.amax(-1), -g.amin(-1)) / 127).to(dtype)  # max |w|, without an |w| temporary
        s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group: any scale, q = 0
        g.div_(s.float().unsqueeze(-1)).round_().clamp_(-127, 127)
        qweight[r : r + step] = x
        scales[r : r + step] = s
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(n, K) int8, (n, K/G) -> (n, K) fp32."""
    n, K = qweight.shape
    return (qweight.float().reshape(n, scales.shape[1], -1) * scales.float().unsqueeze(-1)).reshape(n, K)


def int8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype, through fp32."""
    xf = x.float()
    out = [F.linear(xf, dequantize_int8(qweight[r : r + ROW_CHUNK], scales[r : r + ROW_CHUNK]))
           for r in range(0, qweight.shape[0], ROW_CHUNK)]  # fmt: skip
    return torch.cat(out, dim=-1).to(x.dtype)


def int8_fast_ok(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    K = qweight.shape[1]
    return (x.device.type == "cpu" and scales.shape[1] == 1 and K % 16 == 0 and scales.dtype in FAST_DTYPES
            and qweight.data_ptr() % 64 == 0)  # fmt: skip


def int8_matmul_fast(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) through aten._weight_int8pack_mm; needs `int8_fast_ok`."""
    xs = x.to(scales.dtype).contiguous()
    return torch.ops.aten._weight_int8pack_mm(xs, qweight, scales.reshape(-1)).to(x.dtype)


def int8_rows(qweight: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Embedding lookup: the rows `ids` (any shape) dequantized, (*ids.shape, K) `dtype`; only those rows are read."""
    flat = ids.reshape(-1)
    return dequantize_int8(qweight[flat], scales[flat]).to(dtype).reshape(*ids.shape, -1)


# ---------------------------------------------------------------------------------------------
# int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> tiled64 bytes (Np/64, K, 32) uint8, rows padded with zeros."""
    N, K = q.shape
    q = F.pad(q.to(torch.uint8), (0, 0, 0, padded_rows(N) - N))
    tiles = q.reshape(-1, 2, TILE // 2, K)  # (Np/64, half, j, K)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).transpose(1, 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """tiled64 bytes (Np/64, K, 32) -> q (Np, K) uint8 in [0, 15]."""
    nt, K, _ = packed.shape
    halves = torch.stack([packed & 15, packed >> 4], dim=1)  # (Np/64, half, K, j)
    return halves.transpose(2, 3).reshape(nt * TILE, K)


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> qweight tiled64 (Np/64, K, 32) uint8, scales_and_zeros (K/G, Np, 2) `dtype`; q is computed
    with the stored (rounded) s and z. A few whole tiles of rows at a time, quantized and packed in place: the
    temporaries stay small whatever the size of w."""
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidArgument(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    N, K = w.shape
    Np = padded_rows(N)
    packed = torch.empty(Np // TILE, K, TILE // 2, dtype=torch.uint8, device=w.device)
    sz = torch.zeros(K // group_size, Np, 2, dtype=dtype, device=w.device)
    step = _quant_rows(K)
    scratch = torch.empty(step, K, device=w.device)  # see QUANT_CHUNK
    for r in range(0, N, step):
        n = min(step, N - r)
        x = scratch[: padded_rows(n)]  # (n64, K); zero rows quantize to q = 0
        x[:n] = w[r : r + n]
        x[n:] = 0
        g = _groups(x, group_size)  # (n64, K/G, G)
        lo, hi = g.amin(-1), g.amax(-1)
        # A constant group gets s = |lo| / 8 (or 1 at 0), so that q = 0 gives z - 8 s = lo exactly.
        flat = torch.where(lo == 0, torch.ones_like(lo), lo.abs() / 8)
        s = torch.where(hi == lo, flat, (hi - lo) / 15).to(dtype)
        z = (lo + 8 * s.float()).to(dtype)
        g.sub_(z.float().unsqueeze(-1)).div_(s.float().unsqueeze(-1)).add_(8).round_().clamp_(0, 15)
        tiles = x.view(-1, 2, TILE // 2, K)  # (n64/64, half, j, K)
        byte = tiles[:, 0].add_(tiles[:, 1], alpha=16)  # q[64b + j] | q[64b + 32 + j] << 4, exact in fp32
        packed[r // TILE : r // TILE + len(tiles)] = byte.transpose(1, 2)
        sz[:, r : r + n] = torch.stack([s[:n], z[:n]], dim=-1).transpose(0, 1)
    return packed, sz


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """tiled64 bytes and (K/G, Np, 2) -> (Np, K) fp32, or only `rows` (a slice of whole 64-row tiles)."""
    rows = rows or slice(0, packed.shape[0] * TILE)
    q = unpack_int4(packed[rows.start // TILE : -(-rows.stop // TILE)])  # (n, K)
    n, K = q.shape
    sz = scales_and_zeros[:, rows.start : rows.start + n].float()  # (K/G, n, 2)
    s, z = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # (n, K/G, 1)
    return ((q.float().reshape(n, sz.shape[0], -1) - 8) * s + z).reshape(n, K)


def int4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) -> (M, n) in x's dtype, through fp32; `n` is the unpadded number of output rows."""
    xf = x.float()
    Np = packed.shape[0] * TILE
    out = [F.linear(xf, dequantize_int4(packed, scales_and_zeros, slice(r, min(r + ROW_CHUNK, Np))))
           for r in range(0, Np, ROW_CHUNK)]  # fmt: skip
    return torch.cat(out, dim=-1)[:, :n].to(x.dtype)


def int4_fast_ok(x: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> bool:
    return x.device.type == "cpu" and group_size in INT4_GROUP_SIZES and scales_and_zeros.dtype in FAST_DTYPES


@functools.cache
def kernel_packs_tiled64() -> bool:
    """Whether this CPU's aten._convert_weight_to_int4pack_for_cpu produces the tiled64 layout (AVX-512 does)."""
    q = torch.randint(0, 16, (2 * TILE, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch.equal(packed.reshape(-1), pack_int4(q).reshape(-1))


def int4_kernel_weight(packed: torch.Tensor) -> torch.Tensor:
    """The (Np, K/2) uint8 tensor _weight_int4pack_mm_for_cpu takes: a view of `packed` where the kernel's layout
    is tiled64, else repacked by torch's own converter (a copy)."""
    nt, K, _ = packed.shape
    if kernel_packs_tiled64():
        return packed.view(nt * TILE, K // 2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)


def int4_matmul_fast(
    x: torch.Tensor, kernel_weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, n: int
) -> torch.Tensor:
    """x (M, K) -> (M, n) through aten._weight_int4pack_mm_for_cpu; needs `int4_fast_ok`."""
    xs = x.to(scales_and_zeros.dtype).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs, kernel_weight, group_size, scales_and_zeros)
    return y[:, :n].to(x.dtype)


def int4_rows(
    packed: torch.Tensor, scales_and_zeros: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup from the tiled64 layout: the rows `ids` (any shape) dequantized, (*ids.shape, K) `dtype`."""
    flat = ids.reshape(-1)
    tile, r = flat // TILE, flat % TILE
    shift = ((r >= TILE // 2).to(torch.uint8) * 4).unsqueeze(-1)  # high nibble for the tile's second half
    q = (packed[tile, :, r % (TILE // 2)] >> shift) & 15  # (T, K)
    sz = scales_and_zeros[:, flat].float()  # (K/G, T, 2)
    s, z = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # (T, K/G, 1)
    T, K = q.shape
    w = (q.float().reshape(T, sz.shape[0], -1) - 8) * s + z
    return w.reshape(*ids.shape, K).to(dtype)
