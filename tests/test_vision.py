"""Image input against transformers: the PIL image processor's pixel values and grids to the bit, the vision
tower's features (fp32, 1e-4), and greedy ids equal to `Qwen3_5ForConditionalGeneration.generate` on prompts built
with the real vocabulary and chat template; then decoding's refusals, and prompt pieces that cut an image."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwenlite.errors import InvalidImage, QwenliteError
from qwenlite.generate import generate_tokens, prefill
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.images import MAX_DECODED_PIXELS, ImageProcessor, decode_image, expand_image_tokens
from qwenlite.model.cache import make_cache
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer

from helpers import TINY_TEXT_CONFIG, _randomize, max_abs_diff

GREEDY = SamplingParams(temperature=0)
NEW_TOKENS = 8
IMAGE_PAD = 248056
# patch 16 x merge 2: sides are multiples of 32; between 4 and 16 image tokens per image
PREPROCESSOR = {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor"}  # fmt: skip
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 16, "num_position_embeddings": 16, "initializer_range": 0.2}  # fmt: skip


@pytest.fixture(scope="module")
def mm(tmp_path_factory, qwen35_tokenizer_dir):
    """(transformers model, its PIL processor, qwenlite model, tokenizer, processor, dir): a tiny multimodal
    checkpoint on the real vocabulary, written by transformers' `save_pretrained`, with processor files."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp("multimodal")
    text = dict(TINY_TEXT_CONFIG, vocab_size=248320, initializer_range=0.2, tie_word_embeddings=False)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 1, 1], mrope_interleaved=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Qwen3_5Config(text_config=text, vision_config=VISION, tie_word_embeddings=False)
        config._attn_implementation = "eager"
        hf = Qwen3_5ForConditionalGeneration(config)
        _randomize(hf)
    hf = hf.float().eval()
    hf.save_pretrained(path)
    for file in qwen35_tokenizer_dir.iterdir():
        shutil.copy(file, path / file.name)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    model = load_checkpoint(path, vision=True).model
    reference = Qwen2VLImageProcessorPil.from_pretrained(path)
    return hf, reference, model, Tokenizer.from_dir(path), ImageProcessor.from_dir(path), path


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: resampling has something to do, and images differ by seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


# --- preprocessing -------------------------------------------------------------------------------------------

CASES = {
    "rgb": (64, 96, "RGB"),
    "tiny": (3, 5, "RGB"),  # scaled up to min pixels
    "very wide": (1200, 31, "RGB"),
    "larger than max pixels": (640, 480, "RGB"),
    "rgba": (70, 50, "RGBA"),  # composited onto white
    "palette": (90, 60, "P"),
    "greyscale": (100, 41, "L"),
    "greyscale with alpha": (33, 65, "LA"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pixel_values_and_grid_equal_the_pil_processor(mm, case):
    _, reference, _, _, processor, _ = mm
    w, h, mode = CASES[case]
    data = encoded(picture(w, h, mode))
    expected = reference(images=[Image.open(io.BytesIO(data))], return_tensors="np")
    got = processor.load(data)
    assert [list(got.grid_thw)] == expected["image_grid_thw"].tolist()
    assert got.pixel_values.dtype == torch.float32
    np.testing.assert_array_equal(got.pixel_values.numpy(), expected["pixel_values"])
    assert got.tokens == len(got.pixel_values) // 4


def test_exif_orientation_is_applied(mm):
    _, reference, _, _, processor, _ = mm
    image = picture(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    data = encoded(image, "JPEG", exif=exif.tobytes(), quality=95)
    upright = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)
    expected = reference(images=[upright], return_tensors="np")
    got = processor.load(data)
    assert got.grid_thw == (1, 6, 4)  # taller than wide once upright
    np.testing.assert_array_equal(got.pixel_values.numpy(), expected["pixel_values"])


def test_sixteen_bit_greyscale_is_scaled_not_clipped(mm):
    _, reference, _, _, processor, _ = mm
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    data = encoded(Image.fromarray(deep))
    eight = Image.fromarray(np.rint(deep / 257.0).astype(np.uint8), "L")
    expected = reference(images=[eight], return_tensors="np")
    np.testing.assert_array_equal(processor.load(data).pixel_values.numpy(), expected["pixel_values"])


def test_equal_images_share_a_digest_and_different_ones_do_not(mm):
    processor = mm[4]
    a = processor.load(encoded(picture(64, 64, seed=1)))
    assert processor.load(encoded(picture(64, 64, seed=1), "BMP")).digest == a.digest  # same pixels, other format
    assert processor.load(encoded(picture(64, 64, seed=2))).digest != a.digest


def test_bad_images_are_refused_in_one_line(mm, tmp_path):
    processor = mm[4]
    png = encoded(picture(64, 64))
    with pytest.raises(InvalidImage, match="not an image"):
        processor.load(b"just some text, not a picture")
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        processor.load(png[: len(png) // 2])
    jpeg = encoded(picture(64, 64), "JPEG")
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(InvalidImage, match="corrupt or truncated"):  # zeroed compressed data
        decode_image(png[:100] + bytes(200) + png[300:])
    with pytest.raises(InvalidImage, match="more than"):  # a decompression bomb: 100 Mpx of one colour, 100 KB
        decode_image(encoded(Image.new("L", (10_000, 10_000))))
    assert 10_000 * 10_000 > MAX_DECODED_PIXELS
    with pytest.raises(InvalidImage, match="longer than 200 times"):
        processor.load(encoded(picture(1000, 4)))
    with pytest.raises(InvalidImage, match="cannot read image"):
        processor.load(tmp_path / "missing.png")


# --- the tower and the model ---------------------------------------------------------------------------------


def reference_inputs(reference, images: list[Image.Image]) -> dict:
    out = reference(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def test_vision_features_match_transformers(mm):
    hf, reference, model, _, processor, _ = mm
    images = [picture(64, 96, seed=1), picture(1200, 31, seed=2), picture(3, 5, seed=3)]
    inputs = reference_inputs(reference, images)
    with torch.no_grad():
        expected = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        ours = [processor.preprocess(i) for i in images]
        got = model.visual(torch.cat([i.pixel_values for i in ours]), [i.grid_thw for i in ours])
    assert got.shape == expected.shape == (sum(i.tokens for i in ours), 64)
    assert max_abs_diff(got, expected) <= 1e-4


def chat_prompt(tok: Tokenizer, images: list, messages: list[dict]) -> list[int]:
    return expand_image_tokens(tok.encode_chat(messages), images, IMAGE_PAD)


def reference_generate(hf, reference, ids: list[int], images: list[Image.Image]) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          **reference_inputs(reference, images), mm_token_type_ids=(prompt == IMAGE_PAD).int(),
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # fmt: skip
    return out[0, len(ids) :].tolist()


def image_part() -> dict:
    return {"type": "image"}


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


CHATS = {
    "one image": ([(64, 96)], [user(image_part(), "What is in this picture?")]),
    "two images in one turn": ([(64, 64), (96, 64)], [user("Compare", image_part(), "with", image_part())]),
    "tiny": ([(3, 5)], [user(image_part(), "Describe it.")]),
    "very wide": ([(1200, 31)], [user(image_part(), "Read the banner.")]),
    "larger than max pixels": ([(640, 480)], [user(image_part(), "Describe it.")]),
    "image in an earlier turn": (
        [(64, 96)],
        [
            user(image_part(), "What is this?"),
            {"role": "assistant", "content": "A gradient."},
            user("And what colour is its top left corner?"),
        ],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CHATS))
def test_greedy_ids_equal_transformers_generate(mm, case):
    hf, reference, model, tok, processor, _ = mm
    sizes, messages = CHATS[case]
    pictures = [picture(w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    images = [processor.load(encoded(p)) for p in pictures]
    ids = chat_prompt(tok, images, messages)
    assert ids.count(IMAGE_PAD) == sum(i.tokens for i in images)
    expected = reference_generate(hf, reference, ids, pictures)
    got = list(generate_tokens(model, ids, GREEDY, NEW_TOKENS, images=images))
    assert got == expected
    assert model.__dict__["_decode_plan"].layers is not None  # decode steps after the image took the C step


def test_the_answer_depends_on_the_image(mm):
    _, _, model, tok, processor, _ = mm
    messages = [user(image_part(), "What is in this picture?")]
    answers = set()
    for seed in range(3):
        image = processor.load(encoded(picture(64, 96, seed=seed)))
        answers.add(
            tuple(generate_tokens(model, chat_prompt(tok, [image], messages), GREEDY, NEW_TOKENS, images=[image]))
        )
    assert len(answers) == 3


def test_the_template_writes_one_placeholder_per_image_part(mm):
    tok = mm[3]
    text = tok.apply_chat_template([user(image_part(), "a", {"type": "image_url", "image_url": {"url": "x"}})])
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    ids = tok.encode_chat([user("a <|image_pad|> spelled by the user")])  # text, not a placeholder
    assert IMAGE_PAD not in ids
    with pytest.raises(QwenliteError, match="1 image placeholders for 2 images"):
        expand_image_tokens(tok.encode_chat([user(image_part(), "a")]), [None, None], IMAGE_PAD)


@pytest.mark.parametrize("chunk", [5, 13])
def test_prefill_pieces_that_cut_an_image_compute_the_same(mm, chunk):
    _, _, model, tok, processor, _ = mm
    images = [processor.load(encoded(picture(64, 96, seed=s))) for s in (4, 5)]
    ids = chat_prompt(tok, images, [user(image_part(), "and", image_part(), "?")])
    logits = []
    for size in (len(ids), chunk):
        cache = make_cache(model.config, max_seq_len=len(ids) + 1, dtype=model.dtype)
        logits.append(prefill(model, ids, cache, chunk=size, images=images))
        assert int(cache.rope_deltas[0]) < 0  # the images advanced the positions less than their token counts
    assert max_abs_diff(*logits) <= 1e-4


def test_a_text_only_load_keeps_no_tower(mm):
    hf, _, _, tok, processor, path = mm
    model = load_checkpoint(path).model
    assert model.visual is None and not any(k.startswith("visual.") for k in model.state_dict())
    image = processor.load(encoded(picture(64, 64)))
    with pytest.raises(QwenliteError, match="no vision tower"):
        list(generate_tokens(model, chat_prompt(tok, [image], [user(image_part(), "?")]), GREEDY, 2, images=[image]))
