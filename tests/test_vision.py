"""Image input against transformers: the PIL image processor's pixel values and grids to the bit, the vision
tower's features (fp32, 1e-4), and greedy ids equal to `Qwen3_5ForConditionalGeneration.generate` on prompts built
with the real vocabulary and chat template; then decoding's refusals, and prompt pieces that cut an image."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from qwenlite.cli.main import main as cli_main
from qwenlite.config import ModelConfig
from qwenlite.errors import CheckpointError, InvalidImage, QwenliteError
from qwenlite.generate import generate_tokens, prefill, stream
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.images import MAX_DECODED_PIXELS, ImageProcessor, decode_image, expand_image_tokens
from qwenlite.io.load import load_model
from qwenlite.model.cache import make_cache
from qwenlite.sample import SamplingParams
from qwenlite.serve import image_urls
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import Tokenizer

from helpers import IMAGE_PAD, LiveServer, encoded, max_abs_diff, picture

GREEDY = SamplingParams(temperature=0)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def mm(multimodal_checkpoint):
    """(transformers model, its PIL processor, qwenlite model, tokenizer, processor, dir)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf, path = multimodal_checkpoint
    model = load_checkpoint(path, vision=True).model
    reference = Qwen2VLImageProcessorPil.from_pretrained(path)
    return hf, reference, model, Tokenizer.from_dir(path), ImageProcessor.from_dir(path), path


def test_the_wrapper_config_gives_the_tower_and_the_rotary_sections():
    raw = {"model_type": "qwen3_5", "image_token_id": 248056, "video_token_id": 248057,
           "text_config": {"hidden_size": 64, "rope_parameters": {"rope_theta": 1e7, "mrope_section": [11, 11, 10]}},
           "vision_config": {"depth": 12, "hidden_size": 768, "num_heads": 12, "out_hidden_size": 1024,
                             "deepstack_visual_indexes": [], "rope_parameters": {"rope_theta": 10000.0}}}  # fmt: skip
    c = ModelConfig.from_dict(raw)
    assert (c.vision_config.depth, c.vision_config.hidden_size, c.vision_config.patch_size) == (12, 768, 16)
    assert (c.image_token_id, c.mrope_section) == (248056, [11, 11, 10])
    out = c.to_dict()  # the flat text config: the tower is not written
    assert "vision_config" not in out and "image_token_id" not in out and "video_token_id" not in out
    assert out["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert ModelConfig.from_dict({**raw, "vision_config": None}).vision_config is None
    with pytest.raises(CheckpointError, match="gelu_pytorch_tanh"):
        ModelConfig.from_dict({**raw, "vision_config": {"hidden_act": "quick_gelu"}})


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
    with pytest.raises(InvalidImage, match="more than"):  # a decompression bomb: 81 Mpx of one colour, 80 KB
        decode_image(encoded(Image.new("L", (9000, 9000))))
    assert 9000 * 9000 > MAX_DECODED_PIXELS
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


def test_bf16_features_are_as_close_to_fp32_as_the_references(mm):
    """In bf16 the tower rounds as the reference does: ours within twice transformers' own bf16 error of the fp32
    features (both ~1 bf16 step at the features' scale, measured)."""
    from transformers import Qwen3_5ForConditionalGeneration

    hf, reference, _, _, processor, path = mm
    hf16 = Qwen3_5ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    ours16 = load_checkpoint(path, dtype="bfloat16", vision=True).model
    images = [picture(640, 480, seed=6), picture(64, 96, seed=7)]
    inputs = reference_inputs(reference, images)
    with torch.no_grad():
        exact = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        theirs = hf16.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        ours = ours16.visual(inputs["pixel_values"], [tuple(g) for g in inputs["image_grid_thw"].tolist()])
    assert ours.dtype == torch.bfloat16
    assert max_abs_diff(ours, exact) <= 2 * max_abs_diff(theirs, exact)


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


def test_quantizing_keeps_the_tower_as_it_is(mm, tmp_path, capsys):
    """`--quant` on load and `qwenlite quantize` leave the tower unquantized in its dtype: the same features as the
    checkpoint's, to the bit; the quantized directory answers as `--quant int8` on the checkpoint (the same packed
    weights), and `run --image` on it reads its copy of the preprocessor file."""
    _, _, model, tok, processor, path = mm
    out = tmp_path / "int8"
    assert cli_main(["quantize", str(path), str(out), "--bits", "8"]) == 0
    on_load, _ = load_model(path, quant="int8", with_tokenizer=False)
    quantized, _ = load_model(out, with_tokenizer=False)
    (picture_path,) = write_pictures(tmp_path, 1)
    image = processor.load(picture_path)
    for m in (on_load, quantized):
        assert type(m.model.layers[0].mlp.up_proj) is not type(model.model.layers[0].mlp.up_proj)
        assert isinstance(m.visual.blocks[0].attn.qkv, torch.nn.Linear)  # not a QuantLinear
        with torch.no_grad():
            features = [t.visual(image.pixel_values, [image.grid_thw]) for t in (model, m)]
        torch.testing.assert_close(*features, rtol=0, atol=0)
    ids = chat_prompt(tok, [image], [user(image_part(), "What is it?")])
    answers = [list(generate_tokens(m, ids, GREEDY, NEW_TOKENS, images=[image])) for m in (quantized, on_load)]
    assert answers[0] == answers[1] and len(answers[0]) == NEW_TOKENS
    flags = ["--image", picture_path, "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]
    assert cli_main(["run", str(out), "What is it?", *flags]) == 0
    text = "".join(c.text for c in stream(quantized, tok, ids, GREEDY, NEW_TOKENS, images=[image]))
    assert capsys.readouterr().out == text + "\n"


def test_a_text_only_load_keeps_no_tower(mm):
    hf, _, _, tok, processor, path = mm
    model = load_checkpoint(path).model
    assert model.visual is None and not any(k.startswith("visual.") for k in model.state_dict())
    image = processor.load(encoded(picture(64, 64)))
    with pytest.raises(QwenliteError, match="no vision tower"):
        list(generate_tokens(model, chat_prompt(tok, [image], [user(image_part(), "?")]), GREEDY, 2, images=[image]))


# --- the command line and the server -------------------------------------------------------------------------


def write_pictures(tmp_path, *seeds: int) -> list[str]:
    paths = []
    for seed in seeds:
        path = tmp_path / f"picture-{seed}.png"
        path.write_bytes(encoded(picture(64 + 32 * seed, 64, seed=seed)))
        paths.append(str(path))
    return paths


def cold_answer(mm, messages: list[dict], paths: list[str]) -> str:
    """Greedy text for these messages (image parts as {"type": "image"}) through generate, no server, no CLI."""
    _, _, model, tok, processor, _ = mm
    images = [processor.load(p) for p in paths]
    ids = chat_prompt(tok, images, messages)
    return "".join(c.text for c in stream(model, tok, ids, GREEDY, NEW_TOKENS, images=images))


def test_run_with_images_in_order(mm, tmp_path, capsys):
    path = mm[5]
    a, b = write_pictures(tmp_path, 1, 2)
    answers = []
    for order in ([a, b], [b, a]):
        flags = [x for p in order for x in ("--image", p)]
        assert (
            cli_main(["run", str(path), "Compare them.", *flags, "--max-tokens", str(NEW_TOKENS), "--temperature", "0"])
            == 0
        )
        out = capsys.readouterr().out
        assert out == cold_answer(mm, [user(image_part(), image_part(), "Compare them.")], order) + "\n"
        answers.append(out)
    assert answers[0] != answers[1]  # the order reached the model


def test_chat_attaches_an_image_to_the_next_message(mm, tmp_path, capsys, monkeypatch):
    path = mm[5]
    (a,) = write_pictures(tmp_path, 3)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {a}\nWhat is it?\nAnd its colour?\n"))
    assert cli_main(["chat", str(path), "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    turn = [user(image_part(), "What is it?")]
    assert first == cold_answer(mm, turn, [a])
    history = [*turn, {"role": "assistant", "content": first}, user("And its colour?")]
    assert second == cold_answer(mm, history, [a])


@pytest.fixture(scope="module")
def live(mm):
    _, _, model, tok, processor, _ = mm
    engine = Engine(model, max_concurrency=2, max_queue=4, ctx=512)
    server = LiveServer(create_app(engine, tok, "mm", images=processor), engine)
    yield server
    server.stop()


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def url_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def test_openai_image_url_parts_equal_qwenlite_run(mm, live, tmp_path, capsys):
    path = mm[5]
    a, b = write_pictures(tmp_path, 1, 2)
    assert cli_main(["run", str(path), "Compare them.", "--image", a, "--image", b, "--max-tokens", str(NEW_TOKENS),
                     "--temperature", "0"]) == 0  # fmt: skip
    expected = capsys.readouterr().out.removesuffix("\n")
    reply = live.client().chat.completions.create(
        model="mm", messages=[user(url_part(a), url_part(b), "Compare them.")], max_tokens=NEW_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(
        chat_prompt(mm[3], [mm[4].load(a), mm[4].load(b)], [user(image_part(), image_part(), "Compare them.")])
    )


def test_a_follow_up_about_the_same_image_restores_its_state(mm, live, tmp_path):
    a, b = write_pictures(tmp_path, 4, 5)
    client = live.client()
    first = [user(url_part(a), "What is it?")]
    reply = client.chat.completions.create(model="mm", messages=first, max_tokens=NEW_TOKENS, temperature=0)
    answer = reply.choices[0].message.content
    follow = [*first, {"role": "assistant", "content": answer}, user("And its colour?")]
    again = client.chat.completions.create(model="mm", messages=follow, max_tokens=NEW_TOKENS, temperature=0)
    image_tokens = mm[4].load(a).tokens
    assert again.usage.prompt_tokens_details.cached_tokens > image_tokens  # the image was not encoded again
    plain = [user(image_part(), "What is it?"), {"role": "assistant", "content": answer}, user("And its colour?")]
    assert again.choices[0].message.content == cold_answer(mm, plain, [a])
    # The same words about another image share no state past the text before it.
    other = [user(url_part(b), "What is it?"), *follow[1:]]
    third = client.chat.completions.create(model="mm", messages=other, max_tokens=NEW_TOKENS, temperature=0)
    before_image = mm[3].encode_chat([user(image_part())]).index(IMAGE_PAD)
    assert third.usage.prompt_tokens_details.cached_tokens <= before_image
    assert third.choices[0].message.content == cold_answer(mm, [user(image_part(), "What is it?"), *plain[1:]], [b])


def bad_url(kind: str, tmp_path) -> str:
    png = encoded(picture(64, 64))
    data = {
        "truncated": png[: len(png) // 2],
        "corrupt": png[:100] + bytes(200) + png[300:],
        "not an image": b"hello, world",
        "decompression bomb": encoded(Image.new("L", (9000, 9000))),
    }
    if kind in data:
        return "data:image/png;base64," + base64.b64encode(data[kind]).decode()
    return {"not base64": "data:image/png;base64,@@@@", "http": "http://example.com/cat.png",
            "local path": "/etc/passwd", "file": "file:///etc/passwd"}[kind]  # fmt: skip


BAD = ["truncated", "corrupt", "not an image", "decompression bomb", "not base64", "http", "local path", "file",
       "too many bytes"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_images_are_400s_in_the_openai_error_shape(live, tmp_path, monkeypatch, kind):
    url = bad_url("truncated" if kind == "too many bytes" else kind, tmp_path)
    if kind == "too many bytes":
        monkeypatch.setattr(image_urls, "MAX_IMAGE_BYTES", 100)
    body = {"model": "mm", "messages": [user("Look:", {"type": "image_url", "image_url": {"url": url}})]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages.0.content.1.image_url"
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert live.engine.active == 0


def test_the_image_url_flag_reaches_the_server(monkeypatch):
    seen = []
    monkeypatch.setattr("qwenlite.cli.serve.serve", lambda *args, **kwargs: seen.append(kwargs))
    for argv, allowed in ((["serve", "m"], False), (["serve", "m", "--allow-image-urls"], True)):
        assert cli_main(argv) == 0
        assert seen.pop()["allow_image_urls"] is allowed


def test_image_urls_need_the_flag_and_a_public_address():
    with pytest.raises(InvalidImage, match="--allow-image-urls"):
        image_urls.image_bytes("https://example.com/a.png")
    for url in ("http://127.0.0.1/a.png", "http://localhost:8000/a.png", "http://10.0.0.1/a.png", "http://[::1]/a"):
        with pytest.raises(InvalidImage, match="private or local network"):
            image_urls.image_bytes(url, allow_urls=True)
