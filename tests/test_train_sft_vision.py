"""SFT on rows with images and videos (OpenAI image_url parts, vLLM's video_url parts): the loss equals transformers'
Qwen3_5ForConditionalGeneration loss on the same rows, the tower frozen unless --train-vision, the result (full, LoRA,
merged, and `train mtp`'s) loads and reads images, and bad image and video rows fail in one line naming the row."""

import base64

import pytest
import torch
from safetensors.torch import load_file
from test_video import write_video

from qwenlite.cli.main import main as cli_main
from qwenlite.config import load_config
from qwenlite.errors import QwenliteError
from qwenlite.generate import generate_tokens
from qwenlite.io.images import ImageProcessor, expand_image_tokens
from qwenlite.io.load import load_model, load_mtp
from qwenlite.io.video import VideoProcessor, expand_video_tokens
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.common import TrainSettings
from qwenlite.train.dpo import load_dpo_data
from qwenlite.train.lora import load_adapter
from qwenlite.train.mtp import new_head
from qwenlite.train.posttrain import IGNORE, LoRASettings, load_for_training, token_logprobs
from qwenlite.train.sft import VisionReader, load_sft_data, train_sft

from helpers import encoded, picture
from tiny_chat import make_chat_checkpoint, make_multimodal_chat_checkpoint, write_jsonl
from train_helpers import single_threaded

IMAGE_ROW = {"messages": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "pictures/a.png"}},
                                 {"type": "text", "text": "What is in this picture?"}]},
    {"role": "assistant", "content": "A gradient."},
]}  # fmt: skip
TEXT_ROW = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]}
VIDEO_ROW = {"messages": [
    {"role": "user", "content": [{"type": "text", "text": "What happens in"},
                                 {"type": "video_url", "video_url": {"url": "clips/a.mp4"}}]},
    {"role": "assistant", "content": "It moves."},
]}  # fmt: skip
STEPS = 8
IMAGE_PAD, VIDEO_PAD = 417, 418  # <|image_pad|>, <|video_pad|> of the tiny tokenizer (the fixture checks)
CLIP = (8, 64, 48, 4)  # frames, width, height, frame rate: 4 frames sampled, 2 temporal patches of 64 x 64


def placeholders(messages: list[dict]) -> list[dict]:
    """The messages as the template reads them: each image_url / video_url part its image / video placeholder."""
    parts = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
    return [{**m, "content": [parts.get(p["type"], p) for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in messages]  # fmt: skip


def reader(path, tok) -> VisionReader:
    return VisionReader.from_dir(path, tok, load_config(path))


def reference_row(tok, messages: list[dict], image_tokens: int, video=None) -> tuple[list[int], list[int]]:
    """(ids, labels) built apart from train/sft.py: each image placeholder expanded to `image_tokens` pads, a video's
    as the reference's processor does (`expand_video_tokens`, equal to Qwen3VLProcessor's ids in test_video.py),
    labels from after the last assistant header to its <|im_end|> inclusive."""
    ids = tok.encode_chat(placeholders(messages), add_generation_prompt=False)
    ids = [i for x in ids for i in ([x] * image_tokens if x == IMAGE_PAD else [x])]
    ids = expand_video_tokens(ids, [video], tok, VIDEO_PAD) if video else ids
    header = tok.encode("<|im_start|>assistant\n")
    start = max(t for t in range(len(ids)) if ids[t - len(header) : t] == header)
    end = max(t for t, i in enumerate(ids) if i == tok.token_to_id("<|im_end|>"))
    return ids, [i if start <= t <= end else IGNORE for t, i in enumerate(ids)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, directory, tokenizer) of a tiny checkpoint with a vision tower; tests only read it."""
    path = tmp_path_factory.mktemp("multimodal-chat")
    hf = make_multimodal_chat_checkpoint(path)
    tok = Tokenizer.from_dir(path)
    assert hf.config.image_token_id == IMAGE_PAD == tok.token_to_id("<|image_pad|>")
    assert hf.config.video_token_id == VIDEO_PAD == tok.token_to_id("<|video_pad|>")
    return hf, path, tok


@pytest.fixture(scope="module")
def sft(checkpoint, tmp_path_factory):
    """(base dir, data file, the image, {frozen: history, vision: history}, out root): one run with the tower frozen
    on an image row, a text row and a video row in one micro-batch, one with --train-vision."""
    _, base, _ = checkpoint
    root = tmp_path_factory.mktemp("sft-vision")
    (root / "pictures").mkdir()
    (root / "clips").mkdir()
    image = picture(64, 96, seed=1)
    (root / "pictures" / "a.png").write_bytes(encoded(image))
    write_video(root / "clips" / "a.mp4", *CLIP)
    data = write_jsonl(root / "data.jsonl", [IMAGE_ROW, TEXT_ROW, VIDEO_ROW])
    runs = {}
    with single_threaded():
        for name, train_vision, steps in (("frozen", False, STEPS), ("vision", True, 2)):
            settings = TrainSettings(lr=1e-2, max_steps=steps, batch_size=3, log_every=100)
            runs[name] = train_sft(base, data, root / name, settings, log=lambda r: None, train_vision=train_vision)
    return base, data, image, runs, root


def test_the_loss_equals_transformers_on_the_same_rows(sft, checkpoint):
    """Step 1's loss (base weights; an image row, a text row and a video row in one micro-batch) is the token-weighted
    mean of transformers' losses on the three rows, the image's pixel values from its own processor, the video's from
    io/video.py (equal to Qwen3VLVideoProcessor's to the bit: test_video.py; the reference needs torchvision, which
    runs only in a process of its own): fp32, within 1e-4."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf, base, tok = checkpoint
    _, data, image, runs, root = sft
    examples = load_sft_data(data, tok, 4096, reader(base, tok))
    video = VideoProcessor.from_dir(base).load(root / "clips" / "a.mp4")
    assert [len(e.images) for e in examples] == [1, 0, 1]
    total = trained = 0.0
    for example, row, media in zip(examples, (IMAGE_ROW, TEXT_ROW, VIDEO_ROW), (image, None, video), strict=True):
        inputs, tokens = {}, 0
        if media is image:
            pixels = Qwen2VLImageProcessorPil.from_pretrained(base)(images=[image], return_tensors="pt")
            inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            tokens = int(inputs["image_grid_thw"].prod()) // 4
        elif media is video:
            inputs = {"pixel_values_videos": video.pixel_values, "video_grid_thw": torch.tensor([video.grid_thw])}
        ids, labels = reference_row(tok, row["messages"], tokens, video if media is video else None)
        assert (example.ids, example.labels) == (ids, labels)  # pads expanded, never trained
        assert ids.count(IMAGE_PAD) == (6 if media is image else 0)
        assert ids.count(VIDEO_PAD) == (8 if media is video else 0)  # 2 temporal patches of 2 x 2 merged patches
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        types = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
        with torch.no_grad():
            loss = hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, mm_token_type_ids=types,
                      **inputs).loss.item()  # fmt: skip
        n = (labels[0, 1:] != IGNORE).sum().item()
        total, trained = total + loss * n, trained + n
    assert runs["frozen"][0]["trained_tokens"] == trained
    assert abs(runs["frozen"][0]["loss"] - total / trained) < 1e-4


def tower(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k.startswith("model.visual.")}


def test_the_tower_is_frozen_unless_train_vision(sft):
    base, _, _, runs, root = sft
    for train_vision in (False, True):
        model = load_for_training(base, TrainSettings(), None, train_vision).model
        assert all(p.requires_grad == train_vision for p in model.visual.parameters())
        assert all(p.requires_grad for p in model.model.parameters())
    losses = [r["loss"] for r in runs["frozen"]]
    assert losses[-1] < 0.2 * losses[0], losses
    before = tower(base)
    assert len(before) == 2 * 12 + 9  # every tower tensor saved: 12 per block, patch and position 3, merger 6
    for name, t in tower(root / "frozen").items():
        assert torch.equal(t, before[name]), name
    trained = tower(root / "vision")
    assert sum(not torch.equal(t, before[k]) for k, t in trained.items()) > len(before) // 2
    assert runs["vision"][0]["loss"] == runs["frozen"][0]["loss"]  # the same first step


def answer(model, tok, image, path) -> list[int]:
    ids = tok.encode_chat(placeholders(IMAGE_ROW["messages"][:1]))
    images = [ImageProcessor.from_dir(path).preprocess(image)]
    ids = expand_image_tokens(ids, images, IMAGE_PAD)
    return list(generate_tokens(model, ids, SamplingParams(temperature=0), 12, images=images))


def test_the_result_loads_with_its_tower_and_answers_with_an_image(sft):
    from transformers import Qwen3_5ForConditionalGeneration

    _, data, image, _, root = sft
    out = root / "frozen"
    model, tok = load_model(out)
    assert model.visual is not None
    trained = tok.encode("A gradient.<|im_end|>")
    assert answer(model, tok, image, out)[: len(trained)] == trained  # what it was taught, reading the image
    # transformers reads the multimodal layout back: the same loss on the image row as ours.
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    (example,) = load_sft_data(write_jsonl(data.parent / "one.jsonl", [IMAGE_ROW]), tok, 4096,
                               reader(out, tok))  # fmt: skip
    ids, labels = torch.tensor([example.ids]), torch.tensor([example.labels])
    pixels = example.images[0].pixel_values
    with torch.no_grad():
        ours = -token_logprobs(model, ids, labels, example.images).sum() / example.n_trained
        theirs = hf(input_ids=ids, labels=labels, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                    image_grid_thw=torch.tensor([example.images[0].grid_thw]),
                    mm_token_type_ids=(ids == IMAGE_PAD).int()).loss  # fmt: skip
    assert abs(ours.item() - theirs.item()) < 1e-4


def test_lora_keeps_the_tower_and_both_results_read_images(sft):
    base, data, image, _, root = sft
    out = root / "lora"
    with single_threaded():
        train_sft(base, data, out, TrainSettings(lr=1e-2, max_steps=3, batch_size=2), LoRASettings(r=4, merge=True),
                  log=lambda r: None)  # fmt: skip
    adapted_layers = load_file(str(out / "adapter_model.safetensors"))
    assert adapted_layers and not any("visual" in k for k in adapted_layers)  # the language model's layers only
    model, tok = load_model(base)
    before = answer(model, tok, image, base)
    load_adapter(model, out)  # the base with its tower, then the adapter
    adapted = answer(model, tok, image, base)
    assert adapted != before
    # --merge's result and `train merge-lora`'s keep the tower, and answer as the adapter does.
    argv = ["train", "merge-lora", "--model", str(base), "--adapter", str(out), "--out", str(root / "merged-cli")]
    assert cli_main(argv) == 0
    for merged_dir in (out / "merged", root / "merged-cli"):
        merged, _ = load_model(merged_dir, with_tokenizer=False)
        assert merged.visual is not None and tower(merged_dir).keys() == tower(base).keys()
        assert all(torch.equal(t, tower(base)[k]) for k, t in tower(merged_dir).items())
        assert answer(merged, tok, image, merged_dir) == adapted


def test_train_mtp_keeps_the_tower_and_the_result_answers_with_an_image(checkpoint, tmp_path, capsys):
    """`train mtp` of a model with a tower writes it back (posttrain.save_model, as SFT does): the same tensors in the
    published layout, the same answer to an image, and the fitted head beside them. Rows with images are refused."""
    _, base, tok = checkpoint
    out = tmp_path / "mtp"
    data = write_jsonl(tmp_path / "data.jsonl", [TEXT_ROW])
    argv = ["train", "mtp", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--log-every", "100"]  # fmt: skip
    image = picture(64, 96, seed=1)
    with single_threaded():
        assert cli_main(argv) == 0
        model, _ = load_model(out, with_tokenizer=False)
        ours, theirs = (
            answer(model, tok, image, out),
            answer(load_model(base, with_tokenizer=False)[0], tok, image, base),
        )
    assert ours == theirs
    assert tower(out).keys() == tower(base).keys()
    assert all(torch.equal(t, tower(base)[k]) for k, t in tower(out).items())
    head = load_mtp(out, model)
    assert model.visual is not None and head is not None
    assert not torch.equal(head.fc.weight, new_head(model, seed=0).fc.weight)  # fitted from the initialisation
    (tmp_path / "a.png").write_bytes(encoded(image))
    argv[5] = str(write_jsonl(tmp_path / "images.jsonl", [TEXT_ROW, image_row("a.png")]))
    capsys.readouterr()
    assert cli_main([*argv[:7], str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images.jsonl:2: message 0: an image, which this model or command" in err


# --- bad input -----------------------------------------------------------------------------------------------


def image_row(url: str, role: str = "user", kind: str = "image_url") -> dict:
    part = {"type": kind, kind: {"url": url}}
    user = {"role": "user", "content": [part, {"type": "text", "text": "?"}] if role == "user" else "?"}
    assistant = {"role": "assistant", "content": [part] if role == "assistant" else "A."}
    return {"messages": [user, assistant]}


def bad_rows(tmp_path) -> dict[str, tuple[dict, str]]:
    png = encoded(picture(64, 64))
    (tmp_path / "corrupt.png").write_bytes(png[:100] + bytes(200) + png[300:])
    (tmp_path / "text.png").write_bytes(b"hello, world")
    clip = write_video(tmp_path / "clip.mp4", *CLIP).read_bytes()
    (tmp_path / "half.mp4").write_bytes(clip[: len(clip) // 2])
    start, end = clip.index(b"mdat") + 4, clip.index(b"moov") - 4
    (tmp_path / "broken.mp4").write_bytes(clip[:start] + bytes(end - start) + clip[end:])  # frames zeroed, index kept
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
    return {
        "missing file": (image_row("nowhere.png"), "message 0: cannot read image .*nowhere.png"),
        "corrupt image": (image_row("corrupt.png"), "message 0: .*corrupt.png is corrupt or truncated"),
        "not an image": (image_row("text.png"), "message 0: .*text.png is not an image"),
        "bad data URL": (image_row("data:image/png;base64,@@@@"), "message 0: the image data URL is not valid base64"),
        "http URL": (image_row("https://example.com/a.png"), "message 0: image URLs are not fetched for training"),
        "image in an assistant message": (image_row("a.png", "assistant"), "message 1: an assistant message holds"),
        "truncated video": (image_row("half.mp4", kind="video_url"),
                            "message 0: .*half.mp4 is not a video PyAV can read"),
        "corrupt video": (image_row("broken.mp4", kind="video_url"), "message 0: .*broken.mp4 is corrupt or truncated"),
        "video URL": (image_row("http://example.com/a.mp4", kind="video_url"),
                      "message 0: video URLs are not fetched for training"),
        "bad video data URL": (image_row("data:video/mp4;base64,@@", kind="video_url"),
                               "message 0: the video data URL is not valid base64"),
        "video in an assistant message": (image_row("clip.mp4", "assistant", "video_url"),
                                          "message 1: an assistant message holds no video"),
        "audio part": ({"messages": [audio, {"role": "assistant", "content": "A."}]},
                       "message 0: content parts are text, image_url or video_url, got 'input_audio'"),
        "no url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "a.png"}]},
                                 {"role": "assistant", "content": "A."}]}, 'message 0: an image_url part needs'),
    }  # fmt: skip


@pytest.mark.parametrize("problem", ["missing file", "corrupt image", "not an image", "bad data URL", "http URL",
                                     "image in an assistant message", "no url", "truncated video", "corrupt video",
                                     "video URL", "bad video data URL", "video in an assistant message",
                                     "audio part"])  # fmt: skip
def test_bad_image_and_video_rows_name_the_row(problem, checkpoint, tmp_path):
    _, base, tok = checkpoint
    (tmp_path / "a.png").write_bytes(encoded(picture(64, 64)))
    row, message = bad_rows(tmp_path)[problem]
    data = write_jsonl(tmp_path / "data.jsonl", [image_row("a.png"), row])
    with pytest.raises(QwenliteError, match=f"data.jsonl:2: {message}") as e:
        load_sft_data(data, tok, 4096, reader(base, tok))
    assert "\n" not in str(e.value)


def test_data_urls_and_paths_read_the_same_image(checkpoint, tmp_path):
    _, base, tok = checkpoint
    png = encoded(picture(64, 96, seed=3))
    (tmp_path / "a.png").write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    rows = [image_row("a.png"), image_row(url), image_row(str(tmp_path / "a.png"))]  # relative, data:, absolute
    a, b, c = load_sft_data(write_jsonl(tmp_path / "data.jsonl", rows), tok, 4096,
                            reader(base, tok))  # fmt: skip
    assert a.ids == b.ids == c.ids and a.images[0].digest == b.images[0].digest == c.images[0].digest
    mp4 = write_video(tmp_path / "clip.mp4", *CLIP).read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    rows = [image_row(p, kind="video_url") for p in ("clip.mp4", url, str(tmp_path / "clip.mp4"))]
    a, b, c = load_sft_data(write_jsonl(tmp_path / "videos.jsonl", rows), tok, 4096, reader(base, tok))
    assert a.ids == b.ids == c.ids and a.images[0].digest == b.images[0].digest == c.images[0].digest
    assert a.ids.count(VIDEO_PAD) == a.images[0].tokens == 8


def test_max_len_keeps_whole_images_and_videos_only(checkpoint, tmp_path):
    _, base, tok = checkpoint
    (tmp_path / "a.png").write_bytes(encoded(picture(64, 96)))
    write_video(tmp_path / "a.mp4", *CLIP)
    data = write_jsonl(tmp_path / "data.jsonl", [image_row("a.png")])
    processor = reader(base, tok)
    (full,) = load_sft_data(data, tok, 4096, processor)
    first_pad = full.ids.index(IMAGE_PAD)
    with pytest.raises(QwenliteError, match=f"data.jsonl:1: --max-len {first_pad + 3} cuts an image's tokens"):
        load_sft_data(data, tok, first_pad + 3, processor)
    # An image after the cut goes with its tokens; the turns before it still train.
    later = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "A."},
                          *image_row("a.png")["messages"]]}  # fmt: skip
    data = write_jsonl(tmp_path / "later.jsonl", [later])
    (full,) = load_sft_data(data, tok, 4096, processor)
    (cut,) = load_sft_data(data, tok, full.ids.index(IMAGE_PAD), processor)
    assert (len(full.images), len(cut.images), cut.ids) == (1, 0, full.ids[: len(cut.ids)])
    assert IMAGE_PAD not in cut.ids and cut.n_trained > 0
    # A video: its first pad to its last is whole or not there (the cut may fall in its times or after its pads).
    later["messages"][2] = image_row("a.mp4", kind="video_url")["messages"][0]
    data = write_jsonl(tmp_path / "video.jsonl", [later])
    (full,) = load_sft_data(data, tok, 4096, processor)
    pads = [t for t, i in enumerate(full.ids) if i == VIDEO_PAD]
    assert len(pads) == 8 and pads[-1] - pads[0] > 7  # two runs, the second patch's time between them
    with pytest.raises(QwenliteError, match=f"video.jsonl:1: --max-len {pads[4]} cuts a video's tokens"):
        load_sft_data(data, tok, pads[4], processor)  # between the two temporal patches
    (before,) = load_sft_data(data, tok, pads[0], processor)
    (after,) = load_sft_data(data, tok, pads[-1] + 1, processor)
    assert (len(before.images), len(after.images), after.ids) == (0, 1, full.ids[: pads[-1] + 1])


def test_a_text_only_model_refuses_image_rows_in_one_line(tmp_path, capsys):
    base = tmp_path / "text-only"
    make_chat_checkpoint(base)
    (tmp_path / "a.png").write_bytes(encoded(picture(64, 64)))
    data = write_jsonl(tmp_path / "data.jsonl", [TEXT_ROW, image_row("a.png")])
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["train", "sft", "--model", str(base), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.jsonl:2: message 0: an image, which this model or command does not" in err
    assert not out.exists()
    argv = ["train", "sft", "--model", str(base), "--data", str(data), "--out", str(out), "--train-vision"]
    assert cli_main(argv) == 1 and "--train-vision: " in capsys.readouterr().err and not out.exists()


def test_dpo_data_with_images_is_refused_not_misread(checkpoint, tmp_path):
    """DPO reads no images: an image part there would leave a lone <|image_pad|> without its features."""
    tok = checkpoint[2]
    row = {"prompt": image_row("a.png")["messages"][:1], "chosen": "A.", "rejected": "B."}
    with pytest.raises(
        QwenliteError, match=r"data.jsonl:1 \(chosen\): image and video parts are read only by `train sft`"
    ):
        load_dpo_data(write_jsonl(tmp_path / "data.jsonl", [row]), tok, 4096)


def test_train_vision_and_lora_targets_stay_apart(checkpoint, tmp_path):
    _, base, _ = checkpoint
    with pytest.raises(QwenliteError, match="--train-vision trains the tower's own weights"):
        train_sft(base, tmp_path / "unused.jsonl", tmp_path / "out", lora=LoRASettings(r=2), train_vision=True)
    with pytest.raises(QwenliteError, match="LoRA targets match visual.blocks.0.mlp.linear_fc1, a layer of the vis"):
        load_for_training(base, TrainSettings(), LoRASettings(r=2, targets=("linear_fc1",)))
