"""Image input speed, qwenlite against transformers, in one run: the time to encode one 448x448 and one 1280x720
image with Qwen3.5-0.8B's vision tower shapes (random weights, the same in both), and with --model (a Qwen3.5
checkpoint directory with its vision tower, e.g. a downloaded Qwen/Qwen3.5-0.8B) the time to first token of a
one-image chat prompt. Run by hand, never in CI; it wants a quiet machine:

    python bench/vision.py                                     # the tower, fp32 and bf16
    python bench/vision.py --model ./Qwen3.5-0.8B --dtypes bfloat16 --repeat 3

The best of --repeat runs after one warm-up counts. Not here yet: llama.cpp (`llama-mtmd-cli` with an mmproj from
llama.cpp's converter), which qwenlite cannot write yet.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from qwenlite.config import VisionConfig
from qwenlite.model.vision import VisionModel

# Qwen3.5-0.8B's vision_config (2B's is the same tower).
VISION_0_8B = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072, out_hidden_size=1024,
                   num_position_embeddings=2304, patch_size=16)  # fmt: skip
# (width, height) -> the patch grid the published preprocessor gives it (sides rounded to multiples of 32)
IMAGES = {"448x448": (28, 28), "1280x720": (44, 80)}


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


@torch.inference_mode()
def tower(dtypes: list[str], repeat: int) -> None:
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    torch.manual_seed(0)
    config = Qwen3_5VisionConfig(**VISION_0_8B)
    config._attn_implementation = "sdpa"
    reference = Qwen3_5VisionModel(config).eval()
    ours = VisionModel(VisionConfig(**VISION_0_8B)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    print("| image | dtype | qwenlite ms | transformers ms | speedup |\n|---|---|---|---|---|")
    for dtype in dtypes:
        reference.to(getattr(torch, dtype))
        ours.to(getattr(torch, dtype))
        for name, (h, w) in IMAGES.items():
            pixels, grid = torch.randn(h * w, 3 * 2 * 16 * 16), torch.tensor([[1, h, w]])
            theirs = best_ms(functools.partial(reference, pixels, grid_thw=grid), repeat)
            mine = best_ms(functools.partial(ours, pixels, [(1, h, w)]), repeat)
            print(f"| {name} | {dtype} | {mine:.0f} | {theirs:.0f} | {theirs / mine:.2f}x |", flush=True)


def first_token(path: str, dtypes: list[str], repeat: int) -> None:
    print("| one 448x448 image | dtype | qwenlite ms | transformers ms | speedup |\n|---|---|---|---|---|")
    for dtype in dtypes:
        mine, other = time_first_token(path, dtype, repeat)
        print(f"| time to first token | {dtype} | {mine:.0f} | {other:.0f} | {other / mine:.2f}x |", flush=True)


@torch.inference_mode()
def time_first_token(path: str, dtype: str, repeat: int) -> tuple[float, float]:
    """(qwenlite, transformers) milliseconds from image and messages to the first token, preprocessing included."""
    from PIL import Image
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import qwenlite
    from qwenlite.generate import prefill
    from qwenlite.io.images import ImageProcessor, expand_image_tokens
    from qwenlite.model.cache import make_cache

    image = Image.radial_gradient("L").convert("RGB").resize((448, 448))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    model, tok = qwenlite.load(path, dtype=dtype)
    pictures = ImageProcessor.from_dir(path, model.config.vision_config)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    reference_pictures = Qwen2VLImageProcessorPil.from_pretrained(path)  # the PIL one: no torchvision needed
    prompt, pad = tok.encode_chat(messages), model.config.image_token_id

    def ours():
        images = [pictures.preprocess(image)]
        ids = expand_image_tokens(prompt, images, pad)
        cache = make_cache(model.config, max_seq_len=len(ids) + 1, dtype=model.dtype)
        prefill(model, ids, cache, images=images).argmax()

    def theirs():
        inputs = reference_pictures(images=[image], return_tensors="pt")
        tokens = inputs["image_grid_thw"].prod().item() // 4
        ids = torch.tensor([expand_image_tokens(prompt, [_Tokens(tokens)], pad)])
        reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad).int(),
                           max_new_tokens=1, do_sample=False, **inputs)  # fmt: skip

    return best_ms(ours, repeat), best_ms(theirs, repeat)


class _Tokens:
    """What expand_image_tokens asks of an image: its token count."""

    def __init__(self, tokens: int):
        self.tokens = tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after a warm-up; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--model", help="a checkpoint directory with a vision tower: also time to first token")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtypes = a.dtypes.split(",")
    tower(dtypes, a.repeat)
    if a.model:
        first_token(a.model, dtypes, a.repeat)


if __name__ == "__main__":
    main()
