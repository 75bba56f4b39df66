"""qwenlite's vision tower against llama.cpp's reading the mmproj `qwenlite convert` wrote: the features of one
image from both, side by side. Run by hand, never in CI (it wants llama-cpp-python, which bench/compare.py's
docstring says how to build, in its own venv):

    qwenlite convert ./ckpt --to gguf /tmp/mm/model-f32.gguf --dtype f32    # writes /tmp/mm/mmproj-*-F32.gguf too
    python bench/mmproj_llamacpp.py /tmp/mm/model-f32.gguf [--mmproj FILE] [--size 128]

The image is a --size x --size square of gradients and noise: sides a multiple of 32 within both engines' pixel
bounds, so that neither resizes it and both see the same pixels (llama.cpp resizes with its own bilinear rule,
qwenlite as transformers' processor). llama.cpp runs under --llama-python (this file re-runs itself there with
--engine llama) through libmtmd: mtmd_tokenize on its media marker, mtmd_encode_chunk, mtmd_get_output_embd.
Expect differences of a few 1e-3: llama.cpp's merger takes GELU's tanh approximation where the reference's is exact.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

DEFAULT_LLAMA_PYTHON = "/work/llvenv/bin/python"


def picture(size: int) -> np.ndarray:
    """(size, size, 3) uint8: gradients plus noise, fixed seed."""
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) % 256], -1)
    return np.clip(base + np.random.default_rng(3).normal(0, 20, base.shape), 0, 255).astype(np.uint8)


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
    pixels = (ctypes.c_ubyte * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], pixels)
    chunks, text = mtmd.mtmd_input_chunks_init(), mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
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
    p.add_argument("--size", type=int, default=128, help="the square image's side, a multiple of 32 (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    p.add_argument("--engine", choices=["llama"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
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
