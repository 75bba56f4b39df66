"""Image input speed, qwenlite against transformers and llama.cpp, each in one run. Run by hand, never in CI; it
wants a quiet machine:

    python bench/vision.py                                     # the tower against transformers', fp32 and bf16
    python bench/vision.py --model ./Qwen3.5-0.8B --dtypes bfloat16 --repeat 3
    python bench/vision.py --llama [--gguf f16,q8_0] [--sizes 448x448,1280x720]

The first times the encoding of one 448x448 and one 1280x720 image with Qwen3.5-0.8B's vision tower shapes (random
weights, the same in both); --model (a Qwen3.5 checkpoint directory with its vision tower, e.g. a downloaded
Qwen/Qwen3.5-0.8B) adds the time to first token of a one-image chat prompt against transformers.

--llama: the time to first token of a one-image chat prompt, qwenlite against llama.cpp, on a GGUF pair (text +
mmproj) that `qwenlite convert --to gguf` wrote of a Qwen3.5-0.8B-shaped checkpoint with random weights, its vision
tower and the real vocabulary (made once under --workdir, with one pair per --gguf type). Both start from the
image's RGB pixels and the chat prompt and end at the first token's argmax: qwenlite as `qwenlite run GGUF --image`
(load_model, which finds the mmproj beside the GGUF; the image processor its metadata gives; prefill), llama.cpp
through libmtmd in --llama-python (bench/mmproj_llamacpp.py's llama_first_token: mtmd_tokenize, mtmd_encode_chunk,
the chunks' prefill), their runs alternating (a load on a shared machine hits both alike), --threads each. Each
side's own preprocessing sizes the image (the token counts are printed: equal when both keep the picture's size).
Where the time goes: qwenlite's preprocessing, tower and text prefill (the rest); llama.cpp's tower
(mtmd_encode_chunk) and the rest.

The best of --repeat runs after one warm-up counts (--llama: a warm-up per image size, on both sides).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from mmproj_llamacpp import DEFAULT_LLAMA_PYTHON, picture

from qwenlite.bench import best_time
from qwenlite.config import VisionConfig
from qwenlite.model.vision import VisionModel

# Qwen3.5-0.8B's vision_config (2B's is the same tower).
VISION_0_8B = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072, out_hidden_size=1024,
                   num_position_embeddings=2304, patch_size=16)  # fmt: skip
# (width, height) -> the patch grid the published preprocessor gives it (sides rounded to multiples of 32)
IMAGES = {"448x448": (28, 28), "1280x720": (44, 80)}


def best_ms(fn, repeat: int) -> float:
    return best_time(fn, repeat) * 1000


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


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]}]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # what the chat template writes for an image
LLAMA_MARKER = "<__media__>"  # mtmd's default media marker: mtmd puts the vision start and end tokens around it


def make_checkpoint(out: Path) -> Path:
    """Qwen3.5-0.8B's shapes (its MTP head left out) with random weights (the documented initialisation; the tower
    torch's default), its vision tower and the real vocabulary, bf16, in the published multimodal layout; kept
    across runs."""
    from qwenlite.config import preset_config
    from qwenlite.io.checkpoint import expected_shapes, multimodal_name, write_checkpoint
    from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
    from qwenlite.text.tokenizer import Tokenizer
    from qwenlite.text.vocab import write_tokenizer_files

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out)
    tok = Tokenizer.from_dir(out)
    config = preset_config("qwen3.5-0.8b", mtp_num_hidden_layers=0, mrope_section=[11, 11, 10],
                           vision_config=VisionConfig(**VISION_0_8B), image_token_id=tok.token_to_id("<|image_pad|>"),
                           video_token_id=tok.token_to_id("<|video_pad|>"))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = expected_shapes(Qwen3_5ForCausalLM(config))
    torch.manual_seed(0)
    tower = VisionModel(config.vision_config).to(torch.bfloat16).state_dict()
    tensors = [(multimodal_name(n), lambda n=n, s=s: initial_value(n, s, generator)) for n, s in shapes.items()]
    tensors += [(multimodal_name("visual." + n), lambda t=t: t) for n, t in tower.items()]
    items = ((name, make().to(torch.bfloat16)) for name, make in tensors)
    write_checkpoint(config, out, items, torch.bfloat16, max_shard_bytes=2 << 30, multimodal=True)
    return out


def convert(checkpoint: Path, workdir: Path, dtype: str) -> Path:
    """`qwenlite convert CHECKPOINT --to gguf` with --dtype `dtype` into its own folder (the text GGUF and its mmproj,
    alone there); kept across runs."""
    from qwenlite.cli.main import main as qwenlite_main

    out = workdir / dtype / f"model-{dtype}.gguf"
    if not out.is_file() or not list(out.parent.glob("mmproj-*.gguf")):
        if qwenlite_main(["convert", str(checkpoint), "--to", "gguf", str(out), "--dtype", dtype]) != 0:
            raise SystemExit(f"qwenlite convert failed for {dtype}")
    return out


def qwenlite_first_token(gguf: Path):
    """(one run of `qwenlite run GGUF --image`'s path on a `picture` of a size "WxH" -> its ms (total, preprocess,
    tower), image and prompt tokens; the chat prompt as text, mtmd's marker where the image goes)."""
    from PIL import Image

    from qwenlite.generate import prefill
    from qwenlite.io.images import expand_image_tokens
    from qwenlite.io.load import load_model, processors
    from qwenlite.model.cache import make_cache

    model, tok = load_model(gguf)  # with the mmproj beside it
    pictures = processors(gguf, model)[0]
    prompt, pad = tok.encode_chat(MESSAGES), model.config.image_token_id
    text = tok.apply_chat_template(MESSAGES)
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise SystemExit(f"the chat template does not write {IMAGE_PLACEHOLDER} for an image")
    clock = {"tower": 0.0}
    model.visual.register_forward_pre_hook(lambda *_: clock.update(start=time.perf_counter()))
    model.visual.register_forward_hook(lambda *_: clock.update(tower=time.perf_counter() - clock["start"]))

    @torch.inference_mode()
    def once(size: str) -> dict:
        rgb = picture(*map(int, size.split("x")))
        start = time.perf_counter()
        image = pictures.preprocess(Image.fromarray(rgb))
        preprocessed = time.perf_counter()
        ids = expand_image_tokens(prompt, [image], pad)
        cache = make_cache(model.config, max_seq_len=len(ids) + 1, dtype=model.dtype)
        prefill(model, ids, cache, images=[image]).argmax()
        end = time.perf_counter()
        return {"ms": (end - start) * 1000, "preprocess_ms": (preprocessed - start) * 1000,
                "tower_ms": clock["tower"] * 1000, "image_tokens": image.tokens, "tokens": len(ids)}  # fmt: skip

    return once, text.replace(IMAGE_PLACEHOLDER, LLAMA_MARKER)


class LlamaFirstToken:
    """bench/mmproj_llamacpp.py's llama_first_token on a GGUF pair, in `python` (llama-cpp-python's venv), one run
    per call: the model stays loaded between calls, and uses no CPU while qwenlite runs."""

    def __init__(self, gguf: Path, prompt: str, threads: int, python: str):
        (mmproj,) = gguf.parent.glob("mmproj-*.gguf")
        script = Path(__file__).with_name("mmproj_llamacpp.py")
        cmd = [python, str(script), str(gguf), "--mmproj", str(mmproj), "--engine", "llama-first-token",
               "--prompt", prompt, "--threads", str(threads)]  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._answer("ready")

    def _answer(self, expected: str | None = None):
        for line in self.process.stdout:  # llama.cpp may log to stdout too: skip what is not ours
            if expected and line.strip() == expected:
                return None
            if not expected and line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        raise SystemExit(f"llama.cpp's run failed:\n{self.log.read()[-3000:]}")

    def __call__(self, size: str) -> dict:
        self.process.stdin.write(size + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def against_llama(a: argparse.Namespace) -> None:
    workdir = Path(a.workdir)
    checkpoint = make_checkpoint(workdir / "checkpoint")
    sizes = a.sizes.split(",")
    print(f"threads {a.threads} each; per image size one warm-up each, then {a.repeat} runs alternating qwenlite and "
          "llama.cpp, the best of each; ms from the RGB pixels to the first token's argmax")  # fmt: skip
    print("| GGUF | image | image tokens (qwenlite / llama.cpp) | prompt tokens "
          "| qwenlite ms (preprocess + tower + text) | llama.cpp ms (tower + rest) | llama.cpp / qwenlite |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    for dtype in a.gguf.split(","):
        gguf = convert(checkpoint, workdir, dtype)
        ours, prompt = qwenlite_first_token(gguf)
        theirs = LlamaFirstToken(gguf, prompt, a.threads, a.llama_python)
        for size in sizes:
            ours(size), theirs(size)  # warm-ups: the first image of a size also builds llama.cpp's graphs
            runs = [(ours(size), theirs(size)) for _ in range(a.repeat)]
            o = min((r[0] for r in runs), key=lambda r: r["ms"])
            t = min((r[1] for r in runs), key=lambda r: r["ms"])
            text = o["ms"] - o["preprocess_ms"] - o["tower_ms"]
            print(f"| {gguf.name} | {size} | {o['image_tokens']} / {t['image_tokens']} | {o['tokens']} / {t['tokens']} "
                  f"| {o['ms']:.0f} ({o['preprocess_ms']:.0f} + {o['tower_ms']:.0f} + {text:.0f}) "
                  f"| {t['ms']:.0f} ({t['encode_ms']:.0f} + {t['ms'] - t['encode_ms']:.0f}) "
                  f"| {t['ms'] / o['ms']:.2f}x |", flush=True)  # fmt: skip
        theirs.close()
        del ours


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
    p.add_argument("--llama", action="store_true", help="time to first token against llama.cpp (only that)")
    p.add_argument("--gguf", default="f16,q8_0", help="--llama: the GGUF types, comma-separated (default f16,q8_0)")
    p.add_argument("--sizes", default=",".join(IMAGES), help="--llama: image sizes WxH (default 448x448,1280x720)")
    p.add_argument("--workdir", default="/tmp/qwenlite-vision-bench",
                   help="--llama: where the random checkpoint and its GGUF pairs are made and kept")  # fmt: skip
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="--llama: a Python with llama-cpp-python")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.llama:
        against_llama(a)
        return
    dtypes = a.dtypes.split(",")
    tower(dtypes, a.repeat)
    if a.model:
        first_token(a.model, dtypes, a.repeat)


if __name__ == "__main__":
    main()
