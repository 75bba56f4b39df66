"""The CUDA paths, checked on a machine with a GPU (run by bench/gpu_check.sh; the test suite runs on CPUs).

    python bench/gpu_check.py CHECKPOINT_DIR

Prints one PASS / FAIL line per check, and exits 1 if any failed:
- fp32 on CUDA computes the CPU's logits (full forward and cached decode), and greedy decoding gives the same ids;
- bf16 on CUDA stays close to fp32 on the CPU (top-1 agreement over the prompt's positions);
- int8 / int4 weights load and generate on CUDA (the torch reference matmuls: the C kernels are CPU-only);
- sampling with penalties runs on CUDA (the processors move the history to the logits' device).
"""

from __future__ import annotations

import sys

import torch

from qwenlite.generate import generate_tokens
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache
from qwenlite.sample import SamplingParams

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).float().cpu()[0]


def greedy_ids(model, ids: list[int], n: int = 24, **sampling) -> list[int]:
    params = SamplingParams(temperature=0.0, **sampling) if not sampling else SamplingParams(**sampling)
    with torch.inference_mode():
        return list(generate_tokens(model, ids, params, n))


def main(path: str) -> int:
    prompt = list(range(1000, 1040))
    cpu, _ = load_model(path, "float32", with_tokenizer=False)
    gpu, _ = load_model(path, "float32", device="cuda", with_tokenizer=False)
    check("model on cuda", gpu.device.type == "cuda", str(gpu.device))
    ref, got = logits_of(cpu, prompt), logits_of(gpu, prompt)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    check("fp32 logits cuda == cpu", err < 1e-4, f"(max error {err:.2e} of the largest logit; bound 1e-4)")

    # Cached decode on the GPU against its own full forward: the cache's tensors live on the GPU too.
    with torch.inference_mode():
        cache = make_cache(gpu.config, max_seq_len=64, dtype=gpu.dtype, device=gpu.device)
        gpu(torch.tensor([prompt[:-1]], device="cuda"), cache=cache)
        step = gpu(torch.tensor([prompt[-1:]], device="cuda"), cache=cache).float().cpu()[0, -1]
    err = ((step - got[-1]).abs().max() / got[-1].abs().max()).item()
    check("fp32 cached decode on cuda == full forward", err < 1e-4, f"(max error {err:.2e})")

    a, b = greedy_ids(cpu, prompt), greedy_ids(gpu, prompt)
    check("greedy ids cuda == cpu (fp32)", a == b, f"cpu {a[:8]}... cuda {b[:8]}...")

    bf16, _ = load_model(path, "bfloat16", device="cuda", with_tokenizer=False)
    low = logits_of(bf16, prompt)
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    check("bf16 on cuda close to fp32 cpu", agree >= 0.9, f"(top-1 agreement {agree:.0%} over {len(prompt)} positions)")

    for quant in ("int8", "int4"):
        try:
            q, _ = load_model(path, "bfloat16", quant, device="cuda", with_tokenizer=False)
            ids = greedy_ids(q, prompt)
            qcpu, _ = load_model(path, "bfloat16", quant, with_tokenizer=False)
            same = sum(x == y for x, y in zip(ids, greedy_ids(qcpu, prompt), strict=True))
            check(f"{quant} generates on cuda", len(ids) == 24, f"({same}/24 ids equal to the CPU's {quant} run)")
        except Exception as e:  # noqa: BLE001 - a report, not a program: name what broke and go on
            check(f"{quant} generates on cuda", False, f"{type(e).__name__}: {e}")

    try:
        ids = greedy_ids(gpu, prompt, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1,
                         presence_penalty=0.5, frequency_penalty=0.2, seed=1)  # fmt: skip
        check("sampling with penalties on cuda", len(ids) == 24)
    except Exception as e:  # noqa: BLE001
        check("sampling with penalties on cuda", False, f"{type(e).__name__}: {e}")
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
