"""transformers' video pipeline for tests/test_video.py, run in a process of its own: `python video_reference.py
SPEC.json OUT.pt`. SPEC names a checkpoint directory and cases (a video file and the chat messages about it, video
parts as {"type": "video"}); OUT gets, per case, what the reference makes of them: the frames its PyAV reader samples,
the pixel values and grid of `Qwen3VLVideoProcessor`, and the prompt ids and token types of `Qwen3VLProcessor`.

The video processor needs torchvision, whose PyPI wheel is built against CUDA torch: its C++ ops do not load beside
torch's CPU build, and the import then fails where torchvision registers those ops (nms, roi_align...). It is
installed apart (.ci/run: `pip install --no-deps --target $VENV/torchvision-reference torchvision==0.28.0`) and loaded
here only, without those registrations: the video processor uses its Python transforms (resize, normalize), which run
on torch alone. In the test's own process torchvision stays unimportable, as everywhere else in the suite."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

TORCHVISION_DIR = Path(sys.prefix) / "torchvision-reference"


def import_torchvision() -> None:
    if not (TORCHVISION_DIR / "torchvision").is_dir():
        raise SystemExit(
            f"the reference video processor needs torchvision in {TORCHVISION_DIR}: "
            f"pip install --no-deps --target {TORCHVISION_DIR} torchvision==0.28.0"
        )
    sys.path.insert(0, str(TORCHVISION_DIR))
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)  # fake-tensor and autograd rules for the ops that did not load
    import torchvision.transforms.v2.functional  # noqa: F401


def main(spec_file: str, out_file: str) -> None:
    import_torchvision()
    import torch
    from transformers import AutoProcessor
    from transformers.video_utils import load_video

    spec = json.loads(Path(spec_file).read_text())
    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    video_processor = processor.video_processor
    out = {"processor": type(processor).__name__, "video_processor": type(video_processor).__name__, "cases": []}
    for case in spec["cases"]:
        # The processor's own path for a file: its reader (PyAV here) samples with the processor's sample_frames.
        frames, metadata = load_video(case["video"], backend="pyav", sample_indices_fn=video_processor.sample_frames)
        text = processor.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                           return_tensors="pt")  # fmt: skip
        out["cases"].append(
            {
                "indices": [int(i) for i in metadata.frames_indices],
                "fps": metadata.fps,
                "text": processor.tokenizer.decode(inputs["input_ids"][0]),
                "input_ids": inputs["input_ids"][0].tolist(),
                "mm_token_type_ids": inputs["mm_token_type_ids"],
                "pixel_values_videos": inputs["pixel_values_videos"],
                "video_grid_thw": inputs["video_grid_thw"],
            }
        )
    torch.save(out, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
