"""Video input against transformers: clips written here with PyAV; the frames the reference's PyAV reader samples,
`Qwen3VLVideoProcessor`'s pixel values and grids to the bit and `Qwen3VLProcessor`'s prompt ids (timestamps and
all), computed by tests/video_reference.py in a process of its own (it needs torchvision, see there); then fp32
logits within 1e-4 of `Qwen3_5ForConditionalGeneration` and greedy ids equal to its `generate`; then decoding's
refusals."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from qwenlite.cli.main import main as cli_main
from qwenlite.errors import InvalidVideo, QwenliteError
from qwenlite.generate import generate_tokens, prefill, stream
from qwenlite.io import video as video_io
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.images import ImageProcessor, expand_image_tokens
from qwenlite.io.video import VideoProcessor, expand_video_tokens
from qwenlite.model.cache import make_cache
from qwenlite.model.vision import embed_prompt
from qwenlite.sample import SamplingParams
from qwenlite.serve import image_urls
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import Tokenizer

from helpers import IMAGE_PAD, VIDEO_PAD, LiveServer, make_multimodal_checkpoint, max_abs_diff

GREEDY = SamplingParams(temperature=0)
NEW_TOKENS = 8
REFERENCE = Path(__file__).with_name("video_reference.py")


def write_video(path: Path, frames: int, width: int, height: int, rate: int, seed: int = 0, codec: str = "libx264"):
    """Moving colour gradients plus noise: every frame differs, and so do clips of different seeds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            shift = k * 40 + seed * 70
            base = np.stack([(x * 4 + shift) % 256, (y * 5 + k * 25) % 256, ((x + y) * 3 + shift) % 256], -1)
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
        container.start_encoding()  # a header even without frames
    return path


def write_audio(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


VIDEO = {"type": "video"}
# (frames, width, height, frames per second, seed): sampled at 2 per second from the stream's length
CLIPS = {
    "16 frames, 8 sampled": (16, 64, 48, 4, 0),
    "10 frames, 5 sampled (the last repeated)": (10, 64, 48, 4, 1),
    "larger than max pixels": (10, 160, 96, 4, 2),
    "3 frames, fewer than min_frames": (3, 48, 64, 1, 3),
}
CHATS = {
    "16 frames, 8 sampled": [user(VIDEO, "What happens in this video?")],
    "10 frames, 5 sampled (the last repeated)": [user("Watch", VIDEO, "and tell me.")],
    "larger than max pixels": [user(VIDEO, "Describe it.")],
    "3 frames, fewer than min_frames": [
        user(VIDEO, "What is this?"),
        {"role": "assistant", "content": "A clip."},
        user("And its colours?"),
    ],
}


@pytest.fixture(scope="module")
def mm(tmp_path_factory, qwen35_tokenizer_dir):
    """(transformers model, qwenlite model, tokenizer, video processor, dir, {clip: path}, {clip: reference})."""
    path = tmp_path_factory.mktemp("multimodal")
    hf = make_multimodal_checkpoint(path, qwen35_tokenizer_dir)
    clips = {name: write_video(path / f"clip-{k}.mp4", *CLIPS[name]) for k, name in enumerate(CLIPS)}
    spec = {"checkpoint": str(path), "cases": [{"video": str(clips[n]), "messages": CHATS[n]} for n in CLIPS]}
    (path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, str(REFERENCE), str(path / "spec.json"), str(path / "reference.pt")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    reference = torch.load(path / "reference.pt", weights_only=False)
    assert (reference["processor"], reference["video_processor"]) == ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")
    model = load_checkpoint(path, vision=True).model
    tok, processor = Tokenizer.from_dir(path), VideoProcessor.from_dir(path)
    return hf, model, tok, processor, path, clips, dict(zip(CLIPS, reference["cases"], strict=True))


def prompt(mm, name: str) -> tuple[list[int], object]:
    _, _, tok, processor, _, clips, _ = mm
    video = processor.load(clips[name])
    return expand_video_tokens(tok.encode_chat(CHATS[name]), [video], tok, VIDEO_PAD), video


# --- sampling and preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_pixels_and_grid_equal_the_reference(mm, name):
    processor, clips, reference = mm[3], mm[5], mm[6][name]
    frames, indices, fps = processor.decode(clips[name].read_bytes())
    assert indices.tolist() == reference["indices"] and fps == reference["fps"]
    got = processor.preprocess(frames, indices, fps)
    assert [list(got.grid_thw)] == reference["video_grid_thw"].tolist()
    assert got.grid_thw[0] > 1  # temporal patches: the tower sees a video, not a still
    assert got.pixel_values.dtype == torch.float32
    torch.testing.assert_close(got.pixel_values, reference["pixel_values_videos"], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CLIPS))
def test_prompt_ids_equal_the_reference_processor(mm, name):
    ids, video = prompt(mm, name)
    reference = mm[6][name]
    assert ids == reference["input_ids"], reference["text"]
    assert ids.count(VIDEO_PAD) == video.tokens
    assert reference["text"].count(" seconds>") == video.grid_thw[0]


def test_equal_videos_share_a_digest_and_different_ones_do_not(mm, tmp_path):
    processor, clips = mm[3], mm[5]
    a = processor.load(clips["16 frames, 8 sampled"])
    assert processor.load(clips["16 frames, 8 sampled"].read_bytes()).digest == a.digest
    other = write_video(tmp_path / "other.mp4", *CLIPS["16 frames, 8 sampled"][:4], seed=9)
    assert processor.load(other).digest != a.digest


# --- the model -----------------------------------------------------------------------------------------------


def reference_inputs(reference: dict) -> dict:
    return {k: reference[k] for k in ("pixel_values_videos", "video_grid_thw", "mm_token_type_ids")}


@pytest.mark.parametrize("name", ["16 frames, 8 sampled", "larger than max pixels"])
def test_logits_equal_transformers(mm, name):
    hf, model, *_ = mm
    ids, video = prompt(mm, name)
    reference = mm[6][name]
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids]), **reference_inputs(reference)).logits
        embeds, positions, delta = embed_prompt(model, ids, [video])
        cache = make_cache(model.config, max_seq_len=len(ids), dtype=model.dtype)
        got = model(torch.tensor([ids]), cache, 0, embeds, positions)
    assert delta == int(hf.model.rope_deltas)
    assert got.shape == expected.shape
    assert max_abs_diff(got, expected) <= 1e-4


def reference_generate(hf, ids: list[int], inputs: dict) -> list[int]:
    prompt_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, **inputs,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["10 frames, 5 sampled (the last repeated)", "3 frames, fewer than min_frames"])
def test_greedy_ids_equal_transformers_generate(mm, name):
    hf, model, *_ = mm
    ids, video = prompt(mm, name)
    expected = reference_generate(hf, ids, reference_inputs(mm[6][name]))
    assert list(generate_tokens(model, ids, GREEDY, NEW_TOKENS, images=[video])) == expected


def test_an_image_and_a_video_in_one_prompt(mm):
    """Images and videos fill their runs in prompt order, and the positions step over both as the reference's."""
    hf, model, tok, processor, path, clips, references = mm
    name = "10 frames, 5 sampled (the last repeated)"
    image = ImageProcessor.from_dir(path).preprocess(Image.new("RGB", (96, 64), (200, 30, 90)))
    video = processor.load(clips[name])
    ids = tok.encode_chat([user(VIDEO, "then", {"type": "image"}, "?")])
    ids = expand_video_tokens(expand_image_tokens(ids, [image], IMAGE_PAD), [video], tok, VIDEO_PAD)
    types = torch.tensor([[2 if i == VIDEO_PAD else int(i == IMAGE_PAD) for i in ids]])
    inputs = {**reference_inputs(references[name]), "mm_token_type_ids": types,
              "pixel_values": image.pixel_values, "image_grid_thw": torch.tensor([image.grid_thw])}  # fmt: skip
    expected = reference_generate(hf, ids, inputs)
    assert list(generate_tokens(model, ids, GREEDY, NEW_TOKENS, images=[video, image])) == expected
    with pytest.raises(QwenliteError, match="image 1 needs"):  # the order is the prompt's
        list(generate_tokens(model, ids, GREEDY, 1, images=[image, video]))


def test_the_answer_depends_on_the_video(mm, tmp_path):
    _, model, tok, processor, *_ = mm
    answers = set()
    for seed in range(3):
        video = processor.load(write_video(tmp_path / f"{seed}.mp4", 8, 64, 48, 4, seed=seed))
        ids = expand_video_tokens(tok.encode_chat([user(VIDEO, "What is it?")]), [video], tok, VIDEO_PAD)
        answers.add(tuple(generate_tokens(model, ids, GREEDY, NEW_TOKENS, images=[video])))
    assert len(answers) == 3


@pytest.mark.parametrize("chunk", [13])
def test_prefill_pieces_that_cut_a_video_compute_the_same(mm, chunk):
    model = mm[1]
    ids, video = prompt(mm, "16 frames, 8 sampled")
    logits = []
    for size in (len(ids), chunk):
        cache = make_cache(model.config, max_seq_len=len(ids) + 1, dtype=model.dtype)
        logits.append(prefill(model, ids, cache, chunk=size, images=[video]))
    assert max_abs_diff(*logits) <= 1e-4


# --- refusals ------------------------------------------------------------------------------------------------


def test_bad_videos_are_refused_in_one_line(mm, tmp_path, monkeypatch):
    processor, clips = mm[3], mm[5]
    good = clips["16 frames, 8 sampled"].read_bytes()
    cases = [
        (b"just some text, not a video", "not a video PyAV can read"),
        (good[: len(good) // 2], "not a video PyAV can read"),  # cut before its index (the moov atom, at the end)
        (write_video(tmp_path / "empty.mp4", 0, 64, 48, 4).read_bytes(), "has no video stream"),  # no frames
        (write_audio(tmp_path / "sound.m4a").read_bytes(), "has no video stream"),
        (write_video(tmp_path / "one.mp4", 1, 64, 48, 4).read_bytes(), "1 frame.*at least 2"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidVideo, match=message) as caught:
            processor.load(data)
        assert "\n" not in str(caught.value)
    image = tmp_path / "still.png"
    Image.new("RGB", (64, 48)).save(image)
    with pytest.raises(InvalidVideo, match="1 frame"):  # a still image is a one-frame video to FFmpeg
        processor.load(image)
    with pytest.raises(InvalidVideo, match="cannot read video"):
        processor.load(tmp_path / "missing.mp4")
    monkeypatch.setattr(video_io, "MAX_VIDEO_FRAMES", 12)
    with pytest.raises(InvalidVideo, match="16 frames, more than the 12 allowed"):
        processor.load(good)
    monkeypatch.setattr(video_io, "MAX_VIDEO_FRAMES", 16)
    monkeypatch.setattr(video_io, "MAX_FRAME_PIXELS", 64 * 47)
    with pytest.raises(InvalidVideo, match="64x48, more than"):
        processor.load(good)


def test_a_truncated_stream_is_refused(mm, tmp_path):
    """A stream whose index promises frames the data no longer holds (the index first, as a web video has it)."""
    processor = mm[3]
    source = write_video(tmp_path / "source.mp4", 16, 64, 48, 4)
    with (
        av.open(str(source)) as inp,
        av.open(str(tmp_path / "fast.mp4"), "w", options={"movflags": "faststart"}) as out,
    ):
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = (tmp_path / "fast.mp4").read_bytes()
    with av.open(io.BytesIO(data)) as container:
        starts = [p.pos for p in container.demux(container.streams.video[0]) if p.pos]
    with pytest.raises(InvalidVideo, match="truncated: 3 of the 8 frames sampled decode"):  # cut between packets
        processor.load(data[: starts[5]])
    with pytest.raises(InvalidVideo, match="is corrupt or truncated"):  # cut inside a packet
        processor.load(data[: (starts[5] + starts[6]) // 2])


def test_without_pyav_a_video_names_the_extra(mm, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(QwenliteError, match=r"pip install 'qwenlite\[video\]'"):
        mm[3].load(mm[5]["16 frames, 8 sampled"])


# --- the command line and the server -------------------------------------------------------------------------


def cold_answer(mm, messages: list[dict], inputs: list) -> str:
    """Greedy text for these messages (parts as {"type": "video"} / {"type": "image"}) through generate alone."""
    _, model, tok, *_ = mm
    ids = video_io.expand_vision_tokens(tok.encode_chat(messages), inputs, tok, model.config)
    return "".join(c.text for c in stream(model, tok, ids, GREEDY, NEW_TOKENS, images=inputs))


def test_run_with_a_video(mm, capsys):
    path, clip = mm[4], mm[5]["16 frames, 8 sampled"]
    argv = [
        "run",
        str(path),
        "What happens?",
        "--video",
        str(clip),
        "--max-tokens",
        str(NEW_TOKENS),
        "--temperature",
        "0",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out == cold_answer(mm, [user(VIDEO, "What happens?")], [mm[3].load(clip)]) + "\n"
    assert cli_main(["run", str(path), "x", "--raw", "--video", str(clip)]) != 0  # no template to place it in
    assert "--video need the chat template" in capsys.readouterr().err


def test_chat_attaches_a_video_to_the_next_message(mm, capsys, monkeypatch):
    path, clip = mm[4], mm[5]["3 frames, fewer than min_frames"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {clip}\nWhat is it?\n"))
    assert cli_main(["chat", str(path), "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == cold_answer(mm, [user(VIDEO, "What is it?")], [mm[3].load(clip)]) + "\n"


@pytest.fixture(scope="module")
def live(mm):
    _, model, tok, processor, path, *_ = mm
    engine = Engine(model, max_concurrency=2, max_queue=4, ctx=1024)
    app = create_app(engine, tok, "mm", images=ImageProcessor.from_dir(path), videos=processor)
    server = LiveServer(app, engine)
    yield server
    server.stop()


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


def test_openai_video_url_parts_equal_qwenlite_run(mm, live, capsys):
    path, clip = mm[4], mm[5]["10 frames, 5 sampled (the last repeated)"]
    assert cli_main(["run", str(path), "Describe it.", "--video", str(clip), "--max-tokens", str(NEW_TOKENS),
                     "--temperature", "0"]) == 0  # fmt: skip
    expected = capsys.readouterr().out.removesuffix("\n")
    messages = [user(video_part(clip.read_bytes()), "Describe it.")]
    reply = live.client().chat.completions.create(model="mm", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt_for(mm, [user(VIDEO, "Describe it.")], [mm[3].load(clip)]))


def prompt_for(mm, messages, inputs) -> list[int]:
    _, model, tok, *_ = mm
    return video_io.expand_vision_tokens(tok.encode_chat(messages), inputs, tok, model.config)


def test_a_follow_up_about_the_same_video_restores_its_state(mm, live):
    clips, client = mm[5], live.client()
    a, b = clips["16 frames, 8 sampled"].read_bytes(), clips["larger than max pixels"].read_bytes()
    first = [user(video_part(a), "What is it?")]
    reply = client.chat.completions.create(model="mm", messages=first, max_tokens=NEW_TOKENS, temperature=0)
    answer = reply.choices[0].message.content
    follow = [*first, {"role": "assistant", "content": answer}, user("And its colour?")]
    again = client.chat.completions.create(model="mm", messages=follow, max_tokens=NEW_TOKENS, temperature=0)
    video = mm[3].load(a)
    assert again.usage.prompt_tokens_details.cached_tokens > video.tokens  # the video was not encoded again
    plain = [user(VIDEO, "What is it?"), {"role": "assistant", "content": answer}, user("And its colour?")]
    assert again.choices[0].message.content == cold_answer(mm, plain, [video])
    # The same words about another video share no state past the text before its first frame.
    other = [user(video_part(b), "What is it?"), *follow[1:]]
    third = client.chat.completions.create(model="mm", messages=other, max_tokens=NEW_TOKENS, temperature=0)
    before_video = prompt_for(mm, [user(VIDEO)], [video]).index(VIDEO_PAD)
    assert third.usage.prompt_tokens_details.cached_tokens <= before_video
    assert third.choices[0].message.content == cold_answer(mm, plain, [mm[3].load(b)])


@pytest.mark.parametrize("kind", ["not a video", "truncated", "not base64", "http", "local path", "too many bytes"])
def test_bad_videos_are_400s_naming_their_part(mm, live, monkeypatch, kind):
    good = mm[5]["16 frames, 8 sampled"].read_bytes()
    data = {"not a video": b"hello, world", "truncated": good[: len(good) // 2], "too many bytes": good}
    url = video_part(data[kind])["video_url"]["url"] if kind in data else {
        "not base64": "data:video/mp4;base64,@@@@", "http": "http://example.com/clip.mp4", "local path": "/etc/passwd"
    }[kind]  # fmt: skip
    if kind == "too many bytes":
        monkeypatch.setattr(image_urls, "MAX_VIDEO_BYTES", 100)
        monkeypatch.setattr("qwenlite.serve.openai.MAX_VIDEO_BYTES", 100)
    body = {"model": "mm", "messages": [user("Look:", {"type": "video_url", "video_url": {"url": url}})]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages.0.content.1.video_url"
    assert "video" in error["message"] and "\n" not in error["message"]
    assert live.engine.active == 0
