"""A prompt's paths through the kernels, one against another in the same run: the prefill of a `--prompt`-token
prompt of random ids with each choice forced, alternating, the best of `--repeat` each. Run by hand, never in CI.

A quantized checkpoint (`qwenlite init-random` then `qwenlite quantize`): a GEMV per 4 rows of the prompt
(kernels.INT8_GEMV_ROWS / INT4_GEMV_ROWS set to the prompt's length), or W dequantized for torch's GEMM (0, with
`integer_gemv` off). Results and the thresholds chosen from them: bench/results/gemv_rows.md.

    python bench/prefill_paths.py /tmp/qwcmp/0.8b/int4 --prompt 256 --threads 1

A bf16 checkpoint: the projections through qwenlite's GEMM (kernels.gemm_bf16, where the instruction set has it)
or torch's fp32 GEMM on widened weights (kernels.linear_fp32), the Gated DeltaNet's delta rule in C token by token
(kernels.delta_rule) or in torch's chunked form (ops/delta_rule.gated_delta_rule_chunked), all four pairings.

    python bench/prefill_paths.py /tmp/qwcmp/0.8b/bf16 --prompt 214 --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qwenlite.generate import prefill
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache
from qwenlite.ops.cpu import kernels


def quantized_choices(prompt: int) -> dict[str, Callable[[], None]]:
    integer_gemv = kernels.integer_gemv

    def gemv() -> None:
        kernels.INT8_GEMV_ROWS = kernels.INT4_GEMV_ROWS = prompt
        kernels.integer_gemv = integer_gemv

    def dequantize() -> None:
        kernels.INT8_GEMV_ROWS = kernels.INT4_GEMV_ROWS = 0
        kernels.integer_gemv = lambda x: False

    return {"GEMV for every row": gemv, "dequantize + GEMM": dequantize}


def bf16_choices() -> dict[str, Callable[[], None]]:
    gemm_ok, delta_ok = kernels.gemm_bf16_ok, kernels.delta_rule_ok

    def choose(gemm: bool, delta: bool) -> Callable[[], None]:
        def apply() -> None:
            kernels.gemm_bf16_ok = gemm_ok if gemm else lambda x, w: False
            kernels.delta_rule_ok = delta_ok if delta else lambda v, s: False

        return apply

    return {f"{g} + {d}": choose(g == "qwenlite GEMM", d == "delta rule in C")
            for g in ("qwenlite GEMM", "torch GEMM") for d in ("delta rule in C", "chunked in torch")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a quantized or a bf16 checkpoint")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="passes over the choices, alternating")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, with_tokenizer=False)
    quantized = any(hasattr(m, "qweight") for m in model.modules())
    choices = quantized_choices(args.prompt) if quantized else bf16_choices()
    ids = torch.randint(1000, 100_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def timed() -> float:
        cache = make_cache(model.config, 1, args.prompt + 1, model.dtype)
        t = time.perf_counter()
        with torch.inference_mode():
            prefill(model, ids, cache)
        return time.perf_counter() - t

    best = dict.fromkeys(choices, float("inf"))
    for round_ in range(args.rounds):
        for name in list(choices)[:: 1 if round_ % 2 == 0 else -1]:
            choices[name]()
            best[name] = min(best[name], *(timed() for _ in range(args.repeat)))
    print(f"{args.model}: prefill of {args.prompt} tokens, {args.threads} threads, {kernels.isa_label()} kernels "
          f"({kernels.cpu_name()})")  # fmt: skip
    first = next(iter(best.values()))
    for name, seconds in best.items():
        print(f"  {name:<36} {args.prompt / seconds:7.1f} tok/s  {seconds * 1000:7.0f} ms  {first / seconds:5.2f}x")


if __name__ == "__main__":
    main()
