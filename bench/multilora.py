"""What per-row LoRA adapters cost a decode step (model/adapters.py), run by hand on a quiet machine:

    python bench/multilora.py                           # Qwen3.5-0.8B's shapes, its first 6 layers, bf16, rank 16
    python bench/multilora.py --layers 24 --rank 64 --rows 4 --adapters 4

A random-weight model at a preset's real shapes (speed does not depend on weight values), and `--adapters`
random adapters of rank `--rank` on every default target (train/lora.py's DEFAULT_TARGETS). Decode steps of
`--rows` rows, tokens/s (rows x steps / s, best of `--repeat`) for: the base model (the runner's one-call C step);
the same model carrying adapters with every row on the base; every row on one adapter; the rows spread over all
adapters (row b on adapter b % n + 1).
"""

from __future__ import annotations

import argparse
import time

import torch

from qwenlite.config import preset_config
from qwenlite.model.adapters import Adapter, attach_adapters
from qwenlite.model.cache import make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.model.runner import run_model
from qwenlite.train.lora import DEFAULT_TARGETS


def random_model(preset: str, layers: int, dtype: torch.dtype) -> Qwen3_5ForCausalLM:
    config = preset_config(preset, layers)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, p.shape, gen))
    model.model.init_rope()
    return model.to(dtype).eval()


def random_adapter(model: torch.nn.Module, name: str, rank: int, seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and path.rpartition(".")[2] in DEFAULT_TARGETS:
            A = torch.randn(rank, m.in_features, generator=gen) * 0.01
            B = torch.randn(m.out_features, rank, generator=gen) * 0.01
            weights[path] = (A, B)
    return Adapter(name, rank, 2.0 * rank, 2.0, weights)


@torch.no_grad()
def decode_speed(model, rows: int, steps: int) -> float:
    """tokens/s of `steps` decode steps of `rows` rows."""
    cache = make_cache(model.config, rows, steps + 2, model.dtype)
    tokens = torch.randint(0, 1000, (rows, 1))
    run_model(model, tokens, cache)  # warm-up: the plan, first-touch of the cache
    start = time.perf_counter()
    for _ in range(steps):
        tokens = run_model(model, tokens, cache)[:, -1].argmax(-1, keepdim=True)
    return rows * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="rounds over the four cases; the best of each counts")
    parser.add_argument("--threads", type=int, help="torch's threads (default: its own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = random_model(args.preset, args.layers, getattr(torch, args.dtype))
    model = random_model(args.preset, args.layers, getattr(torch, args.dtype))
    selection = attach_adapters(model, [random_adapter(model, f"a{i}", args.rank, i) for i in range(args.adapters)])
    spread = [b % args.adapters + 1 for b in range(args.rows)]
    cases = {"base model": (base, []),
             "adapters attached, rows on the base": (model, [0] * args.rows),
             "every row on adapter 1": (model, [1] * args.rows),
             f"rows spread over {args.adapters} adapters": (model, spread)}  # fmt: skip
    results = dict.fromkeys(cases, 0.0)
    for _ in range(args.repeat):  # rounds, so that a busy moment of the machine hits every case alike
        for label, (m, rows) in cases.items():
            if m is model:
                selection.select(rows)
            results[label] = max(results[label], decode_speed(m, args.rows, args.steps))
    print(f"{args.preset}, first {args.layers} layers, {args.dtype}, {args.rows} rows, rank {args.rank}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for label, speed in results.items():
        print(f"  {label:<40} {speed:8.1f} tok/s  ({speed / results['base model']:.2f}x)")


if __name__ == "__main__":
    main()
