"""Quantized prefill: GEMV per 4 rows of the prompt, or dequantize W and run torch's GEMM. Times the prefill of a
`--prompt`-token prompt of random ids with each choice forced (kernels.INT8_GEMV_ROWS / INT4_GEMV_ROWS set to the
prompt's length, or to 0 with `integer_gemv` off), alternating, the best of `--repeat` each. Run by hand on a
quantized checkpoint (`qwenlite init-random` then `qwenlite quantize`), never in CI:

    python bench/gemv_rows.py /tmp/qwcmp/0.8b/int4 --prompt 256 --threads 1

Results and the thresholds chosen from them: bench/results/gemv_rows.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwenlite.generate import prefill
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache
from qwenlite.ops.cpu import kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a quantized checkpoint")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="passes over both choices, alternating")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, with_tokenizer=False)
    ids = torch.randint(1000, 100_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    integer_gemv = kernels.integer_gemv
    choices = {"GEMV for every row": (args.prompt, integer_gemv), "dequantize + GEMM": (0, lambda x: False)}

    def timed() -> float:
        cache = make_cache(model.config, 1, args.prompt + 1, model.dtype)
        t = time.perf_counter()
        with torch.inference_mode():
            prefill(model, ids, cache)
        return time.perf_counter() - t

    best = dict.fromkeys(choices, float("inf"))
    for _ in range(args.rounds):
        for name, (rows, integer) in choices.items():
            kernels.INT8_GEMV_ROWS = kernels.INT4_GEMV_ROWS = rows
            kernels.integer_gemv = integer
            best[name] = min(best[name], *(timed() for _ in range(args.repeat)))
    print(f"{args.model}: prefill of {args.prompt} tokens, {args.threads} threads, {kernels.isa()} kernels "
          f"({kernels.cpu_name()})")  # fmt: skip
    for name, seconds in best.items():
        print(f"  {name:<20} {args.prompt / seconds:7.1f} tok/s")


if __name__ == "__main__":
    main()
