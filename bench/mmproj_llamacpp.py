"""qwenlite's vision tower against llama.cpp's reading the mmproj `qwenlite convert` wrote: the features of one
image from both, side by side. Run by hand, never in CI (it wants llama-cpp-python, which bench/compare.py's
docstring says how to build, in its own venv):

    qwenlite convert ./ckpt --to gguf /tmp/mm/model-f32.gguf --dtype f32    # writes /tmp/mm/mmproj-*-F32.gguf too
    python bench/mmproj_llamacpp.py /tmp/mm/model-f32.gguf [--mmproj FILE] [--size 448]

bench/vision.py's --llama also runs llama.cpp's time to first token through this file (`llama_first_token`).

The image is a --size x --size square of gradients and noise: sides a multiple of 32 within both engines' pixel
bounds, so that neither resizes it and both see the same pixels (llama.cpp resizes with its own bilinear rule,
qwenlite as transformers' processor). llama.cpp runs under --llama-python (this file re-runs itself there with
--engine llama) through libmtmd: mtmd_tokenize on its media marker, mtmd_encode_chunk, mtmd_get_output_embd.
Expect differences of a few 1e-3 (F32 pair): llama.cpp's merger takes GELU's tanh approximation where the reference's
is exact; about 1% with a Q8_0 mmproj, whose matrix products llama.cpp takes with 8-bit activations.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_LLAMA_PYTHON = "/work/llvenv/bin/python"


def picture(size: int, height: int | None = None) -> np.ndarray:
    """(height, size, 3) uint8 (a square without `height`): gradients plus noise, fixed seed."""
    height = height or size
    y, x = np.mgrid[0:height, 0:size]
    base = np.stack([x * 255 / size, y * 255 / height, (x + y) % 256], -1)
    return np.clip(base + np.random.default_rng(3).normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def mtmd_chunks(mtmd, ctx, rgb: np.ndarray, prompt: bytes):  # noqa: ANN001, ANN201 (llama_cpp's ctypes objects)
    """mtmd_tokenize: `prompt`'s text and image chunks, the picture `rgb` at mtmd's media marker; and the bitmap,
    which the caller frees with the chunks."""
    pixels = (ctypes.c_ubyte * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], pixels)
    chunks, text = mtmd.mtmd_input_chunks_init(), mtmd.mtmd_input_text()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), False, True
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    return chunks, bitmap


def llama_first_token(model: str, mmproj: str, prompt: str, threads: int) -> None:
    """llama.cpp's time to first token of `prompt` (a chat prompt with mtmd's media marker where the image goes),
    served over stdin / stdout so that a caller can alternate it with its own runs: each line in is an image size
    (WxH) of `picture`, each line out that run's JSON (ms: from the RGB pixels through mtmd_tokenize (its
    preprocessing), mtmd_encode_chunk (the tower, encode_ms) and the prefill of the text and image chunks to the
    argmax of the last logits; image_tokens, tokens); the KV cache cleared after each run."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=model, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)  # fmt: skip
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads = False, threads
    ctx = mtmd.mtmd_init_from_file(mmproj.encode(), llm._model.model, params)
    if not ctx:
        raise SystemExit(f"llama.cpp cannot load {mmproj} for {model}")
    NO_CALLBACK = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer: decode as usual
    lctx, n_vocab, memory = llm._ctx.ctx, llm.n_vocab(), llama_cpp.llama_get_memory(llm._ctx.ctx)

    def once(rgb: np.ndarray) -> tuple[float, float, int, int]:
        start = time.perf_counter()
        chunks, bitmap = mtmd_chunks(mtmd, ctx, rgb, prompt.encode())
        n_past, new_n_past, encode, image_tokens = 0, llama_cpp.llama_pos(0), 0.0, 0
        n = mtmd.mtmd_input_chunks_size(chunks)
        for i in range(n):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                t = time.perf_counter()
                if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise SystemExit("mtmd_encode_chunk failed")
                encode += time.perf_counter() - t
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                embd = mtmd.mtmd_get_output_embd(ctx)
                status = mtmd.mtmd_helper_decode_image_chunk(ctx, lctx, chunk, embd, n_past, 0, 512,
                                                             ctypes.byref(new_n_past), NO_CALLBACK, None)  # fmt: skip
            else:
                status = mtmd.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, 0, 512, i == n - 1,
                                                            ctypes.byref(new_n_past))  # fmt: skip
            if status != 0:
                raise SystemExit(f"llama.cpp failed to decode chunk {i} ({status})")
            n_past = new_n_past.value
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))
        int(logits.argmax())
        total = time.perf_counter() - start
        tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        llama_cpp.llama_memory_clear(memory, True)
        return {"ms": total * 1000, "encode_ms": encode * 1000, "image_tokens": image_tokens, "tokens": tokens}

    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(once(picture(*map(int, line.split("x"))))), flush=True)
    mtmd.mtmd_free(ctx)


def llama_features(model: str, mmproj: str, rgb: np.ndarray, threads: int) -> np.ndarray:
    """The image's features from llama.cpp's mtmd: (tokens, text width) fp32."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, threads, False
    ctx = mtmd.mtmd_init_from_file(mmproj.encode(), llm._model.model, params)
    if not ctx:
        raise SystemExit(f"llama.cpp cannot load {mmproj} for {model} (its log above says why)")
    chunks, _ = mtmd_chunks(mtmd, ctx, rgb, mtmd.mtmd_default_marker())
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise SystemExit("mtmd_encode_chunk failed")
            n, width = mtmd.mtmd_input_chunk_get_n_tokens(chunk), llm.n_embd()
            return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * width,)).reshape(n, width).copy()
    raise SystemExit("mtmd made no image chunk")


def qwenlite_features(model: str, mmproj: str | None, rgb: np.ndarray) -> np.ndarray:
    import torch
    from PIL import Image

    from qwenlite.io.load import load_model, processors

    loaded, _ = load_model(model, mmproj=mmproj)
    if loaded.visual is None:
        raise SystemExit(f"{model} has no mmproj beside it; give --mmproj")
    image = processors(model, loaded, mmproj)[0].preprocess(Image.fromarray(rgb))
    with torch.no_grad():
        return loaded.visual(image.pixel_values, [image.grid_thw]).float().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the text GGUF")
    p.add_argument("--mmproj", help="default: the only mmproj-*.gguf beside the model")
    p.add_argument(
        "--size",
        type=int,
        default=448,
        help="the square image's side, a multiple of 32 (default 448; below the checkpoint's min_pixels "
        "transformers and qwenlite scale the image up, llama.cpp does not: token counts differ)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    p.add_argument("--engine", choices=["llama", "llama-first-token"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)  # llama-first-token's chat prompt
    args = p.parse_args()
    if args.engine == "llama-first-token":
        return llama_first_token(args.model, args.mmproj, args.prompt, args.threads)
    rgb = picture(args.size)
    if args.engine == "llama":
        np.save(args.out, llama_features(args.model, args.mmproj, rgb, args.threads))
        return
    from qwenlite.io.load import find_mmproj

    mmproj = str(find_mmproj(args.model, args.mmproj) or "")
    ours = qwenlite_features(args.model, mmproj or None, rgb)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "llama.npy")
        cmd = [args.llama_python, __file__, args.model, "--mmproj", mmproj, "--size", str(args.size),
               "--threads", str(args.threads), "--engine", "llama", "--out", out]  # fmt: skip
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        theirs = np.load(out)
    diff = np.abs(ours - theirs).max()
    cosine = (ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs)
    print(f"{os.path.basename(mmproj)}: {ours.shape[0]} image tokens x {ours.shape[1]}; max |qwenlite| "
          f"{np.abs(ours).max():.4g}, max |qwenlite - llama.cpp| {diff:.3g} ({diff / np.abs(ours).max():.2%} of it), "
          f"cosine {cosine:.7f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
