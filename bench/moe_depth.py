"""A shallow copy of a deep model (`qwenlite init-random PRESET --layers N`) projected to its full depth: one decode
step's time split into the head (timed alone: its GEMV is most of what is not a layer) and the layers, then the
step at the full depth. Run by hand on a quiet machine, e.g. the 35B-A3B's first 4 of 40 layers at int4:

    python bench/moe_depth.py /tmp/qwcmp/35b-a3b-4l/int4 --depth 40
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qwenlite.generate import decode_step, prefill
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache


def median_time(f: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a checkpoint directory (quantized or not)")
    parser.add_argument("--depth", type=int, required=True, help="the full model's number of layers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="decode steps timed (the median counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, with_tokenizer=False)
    cache = make_cache(model.config, 1, 128 + args.runs, model.dtype)
    with torch.inference_mode():
        prefill(model, list(range(1, 65)), cache)
        for _ in range(3):
            decode_step(model, 5, cache)
        step = median_time(lambda: decode_step(model, 5, cache), args.runs)
        x = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
        head = median_time(lambda: model.lm_head(x), args.runs)
    layers = model.config.num_hidden_layers
    layer = (step - head) / layers
    full = head + args.depth * layer
    print(
        f"{args.model}: {layers} layers, step {step * 1e3:.2f} ms = head {head * 1e3:.2f} ms + {layer * 1e3:.2f} ms "
        f"a layer; at {args.depth} layers {full * 1e3:.1f} ms a token, {1 / full:.1f} tok/s"
    )


if __name__ == "__main__":
    main()
