"""The vision tower as llama.cpp's mmproj GGUF: `convert --to gguf` writes it beside the text GGUF, with the keys
and tensors llama.cpp's clip loader requires for the `qwen3vl_merger` projector; a GGUF read back with its mmproj
has the checkpoint's tower (F32: to the bit; F16: each weight rounded once) and answers an image prompt as the
Hugging Face directory does; an mmproj that does not fit the model is refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qwenlite.cli.main import main as cli_main
from qwenlite.errors import CheckpointError, InvalidArgument
from qwenlite.generate import generate_tokens, stream
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.gguf_import import read_gguf
from qwenlite.io.gguf_mmproj import MMPROJ_BLOCK_NAMES, export_mmproj, load_mmproj, mmproj_path, mmproj_tensor_type
from qwenlite.io.images import ImageProcessor, expand_image_tokens
from qwenlite.io.load import find_mmproj, load_model, processors
from qwenlite.sample import SamplingParams

from helpers import MULTIMODAL_VISION_CONFIG, TINY_TEXT_CONFIG, picture
from tiny_chat import make_multimodal_chat_checkpoint

T = gguf.GGMLQuantizationType
GREEDY = SamplingParams(temperature=0)
NEW_TOKENS = 8

# What llama.cpp's clip loader requires of a qwen3vl_merger mmproj (tools/mtmd/clip.cpp and clip-impl.h: the keys
# load_hparams reads as required, or asserts, and the tensors load_tensors requires or models/qwen3vl.cpp's graph
# uses), with their ggml shapes (ne order) for a tower of width D, MLP width F, N positions, patch P, text width E.
REQUIRED_KEYS = ("clip.projector_type", "clip.has_vision_encoder", "clip.vision.embedding_length",
                 "clip.vision.attention.head_count", "clip.vision.feed_forward_length", "clip.vision.block_count",
                 "clip.vision.projection_dim", "clip.vision.attention.layer_norm_epsilon", "clip.vision.image_size",
                 "clip.vision.patch_size", "clip.vision.image_mean", "clip.vision.image_std")  # fmt: skip


def required_tensors(D: int, F: int, N: int, P: int, E: int, depth: int) -> dict[str, tuple[int, ...]]:
    out = {"v.patch_embd.weight": (P, P, 3, D), "v.patch_embd.weight.1": (P, P, 3, D), "v.patch_embd.bias": (D,),
           "v.position_embd.weight": (D, N), "v.post_ln.weight": (D,), "v.post_ln.bias": (D,),
           "mm.0.weight": (4 * D, 4 * D), "mm.0.bias": (4 * D,), "mm.2.weight": (4 * D, E),
           "mm.2.bias": (E,)}  # fmt: skip
    for i in range(depth):
        out |= {f"v.blk.{i}.ln1.weight": (D,), f"v.blk.{i}.ln1.bias": (D,), f"v.blk.{i}.ln2.weight": (D,),
                f"v.blk.{i}.ln2.bias": (D,), f"v.blk.{i}.attn_qkv.weight": (D, 3 * D),
                f"v.blk.{i}.attn_qkv.bias": (3 * D,), f"v.blk.{i}.attn_out.weight": (D, D),
                f"v.blk.{i}.attn_out.bias": (D,), f"v.blk.{i}.ffn_up.weight": (D, F), f"v.blk.{i}.ffn_up.bias": (F,),
                f"v.blk.{i}.ffn_down.weight": (F, D), f"v.blk.{i}.ffn_down.bias": (D,)}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(checkpoint dir, its qwenlite model with the tower, text GGUF (F32), its mmproj) by `qwenlite convert`, of a
    multimodal checkpoint on the tiny tokenizer (a 248K-token vocabulary would make it a minute of conversion)."""
    path = tmp_path_factory.mktemp("multimodal")
    make_multimodal_chat_checkpoint(path)
    out = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    assert cli_main(["convert", str(path), "--to", "gguf", str(out), "--dtype", "f32"]) == 0
    (mmproj,) = out.parent.glob("mmproj-*.gguf")
    return path, load_checkpoint(path, vision=True).model, out, mmproj


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_the_mmproj_has_what_llamacpps_clip_loader_requires(converted):
    _, model, out, mmproj = converted
    text, text_tensors = read_gguf(out)
    name = text["general.name"]
    assert mmproj.name == f"mmproj-{'-'.join(name.split())}-F32.gguf"  # beside the text GGUF
    reader = gguf.GGUFReader(mmproj)
    assert field(reader, "general.architecture") == "clip" and field(reader, "general.type") == "mmproj"
    assert set(REQUIRED_KEYS) <= set(reader.fields)
    assert field(reader, "clip.projector_type") == "qwen3vl_merger"
    assert field(reader, "clip.has_vision_encoder") is True and field(reader, "clip.use_gelu") is True
    v = MULTIMODAL_VISION_CONFIG
    D, F, P, E = v["hidden_size"], v["intermediate_size"], v["patch_size"], TINY_TEXT_CONFIG["hidden_size"]
    N, depth = v["num_position_embeddings"], v["depth"]
    expected = {"clip.vision.embedding_length": D, "clip.vision.feed_forward_length": F,
                "clip.vision.block_count": depth, "clip.vision.attention.head_count": v["num_heads"],
                "clip.vision.projection_dim": E,
                "clip.vision.patch_size": P, "clip.vision.image_size": 4 * P, "clip.vision.spatial_merge_size": 2,
                "clip.vision.image_min_pixels": 64 * 64, "clip.vision.image_max_pixels": 128 * 128}  # fmt: skip
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert field(reader, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # The text GGUF's width is what the projector must produce (mtmd refuses a mismatch).
    assert text["qwen35.embedding_length"] == E
    got = {t.name: tuple(t.shape.tolist()) for t in reader.tensors}
    assert got == required_tensors(D, F, N, P, E, depth)  # and nothing else
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(types[n] == T.F32 for n in got)  # an F32 file
    assert not any(n.startswith(("v.", "mm.")) for n in text_tensors)  # the text GGUF has none


def test_block_names_match_gguf_pys_tensor_map():
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 2)
    for ours, theirs in MMPROJ_BLOCK_NAMES.items():
        assert name_map.get_name(f"visual.blocks.1.{ours}.bias", try_suffixes=(".bias",)) == f"v.blk.1.{theirs}.bias"
    assert name_map.get_name("visual.pos_embed.weight", try_suffixes=(".weight",)) == "v.position_embd.weight"


def test_the_mmproj_is_named_as_llamacpps_published_ones():
    assert mmproj_path(Path("out/q-f16.gguf"), "Qwen3.5 0.8B", "q4_0") == Path("out/mmproj-Qwen3.5-0.8B-F16.gguf")
    assert mmproj_path(Path("q.gguf"), "Qwen3.5", "bf16").name == "mmproj-Qwen3.5-BF16.gguf"
    assert mmproj_path(Path("q.gguf"), "Qwen3.5", "q8_0").name == "mmproj-Qwen3.5-Q8_0.gguf"


def test_a_gguf_with_its_mmproj_answers_as_the_checkpoint(converted, tmp_path, capsys):
    """F32 round trip: the same tower weights (so the same features, exactly), the image preprocessing the
    checkpoint's preprocessor_config.json gives, and the same greedy ids; `run --image` finds the mmproj beside the
    GGUF."""
    path, model, out, _ = converted
    loaded, tok = load_model(out)
    for name, t in model.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[name], t), name
    assert loaded.config.mrope_section == model.config.mrope_section == [2, 1, 1]
    images, reference = processors(out, loaded)[0], ImageProcessor.from_dir(path)
    assert (images.min_pixels, images.max_pixels) == (reference.min_pixels, reference.max_pixels)
    file = tmp_path / "picture.png"
    picture(96, 64, seed=1).save(file)
    image = images.load(file)
    assert torch.equal(image.pixel_values, reference.load(file).pixel_values)  # mean and std as float32, as used
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ids = expand_image_tokens(tok.encode_chat([message]), [image], model.config.image_token_id)
    answer = list(generate_tokens(loaded, ids, GREEDY, NEW_TOKENS, images=[image]))
    assert answer == list(generate_tokens(model, ids, GREEDY, NEW_TOKENS, images=[image]))
    flags = ["--image", str(file), "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]
    assert cli_main(["run", str(out), "What is it?", *flags]) == 0
    text = "".join(c.text for c in stream(loaded, tok, ids, GREEDY, NEW_TOKENS, images=[image]))
    assert capsys.readouterr().out == text + "\n"


def test_quantizing_a_gguf_on_load_keeps_its_tower(converted):
    _, model, out, _ = converted
    quantized, _ = load_model(out, quant="int8")
    assert type(quantized.model.layers[0].mlp.up_proj) is not type(model.model.layers[0].mlp.up_proj)
    assert type(quantized.visual.blocks[0].attn.qkv) is type(model.visual.blocks[0].attn.qkv)  # not a QuantLinear
    for name, t in model.visual.state_dict().items():
        assert torch.equal(quantized.visual.state_dict()[name], t), name


def test_an_f16_mmproj_rounds_each_weight_once(converted, tmp_path):
    """F16: matrices rounded to f16 once, the patch kernels too (an F16 file), 1-D tensors and the position table
    F32; features within 0.2% of their largest magnitude of the F32 tower's (measured 0.07%: f16's 2^-11 relative
    rounding through two blocks)."""
    path, model, _, _ = converted
    mmproj = export_mmproj(path, tmp_path / "mmproj-f16.gguf", "f16", progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(mmproj).tensors}
    assert types["v.patch_embd.weight.1"] == types["mm.2.weight"] == T.F16
    assert types["v.position_embd.weight"] == types["v.blk.0.ln1.weight"] == types["mm.2.bias"] == T.F32
    tower = load_mmproj(mmproj, model.config, torch.float32)
    for name, t in model.visual.state_dict().items():
        rounded = t.half().float() if t.dim() > 1 and name != "pos_embed.weight" else t
        assert torch.equal(tower.state_dict()[name], rounded), name
    image = ImageProcessor.from_dir(path).preprocess(picture(128, 96, seed=2))
    with torch.no_grad():
        want, got = (m(image.pixel_values, [image.grid_thw]) for m in (model.visual, tower))
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


def test_a_q8_0_mmproj_rounds_each_matrix_to_its_blocks(converted, tmp_path):
    """Q8_0 (the converter's --outtype q8_0 --mmproj): the block and MLP matrices and the merger's in Q8_0, the patch
    kernels, the position table and every 1-D tensor F32 (the latter two to the bit), and a row that does not split
    into blocks of 32 in F16. Read back dequantized: each weight within Q8_0's bound, half a step of its block of 32
    (d = block max / 127) plus d's own f16 rounding (127 * 2^-11 d): |w - w'| <= 0.57 d; features within 2% of
    their largest magnitude of the F32 tower's (measured 0.8%; worst weight 0.55 d)."""
    path, model, _, _ = converted
    mmproj = export_mmproj(path, tmp_path / "mmproj-q8_0.gguf", "q8_0", progress=False)
    meta, stored = read_gguf(mmproj)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {name: t.tensor_type for name, t in stored.items()}
    assert types["v.blk.1.attn_qkv.weight"] == types["v.blk.0.ffn_down.weight"] == types["mm.2.weight"] == T.Q8_0
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == types["v.blk.0.ln1.weight"] == T.F32
    assert types["mm.0.bias"] == types["v.patch_embd.bias"] == T.F32
    assert mmproj_tensor_type("v.blk.0.ffn_down.weight", (32, 48), T.Q8_0) == T.F16  # 48 = one block and a half
    tower = load_mmproj(mmproj, model.config, torch.float32)
    for name, t in model.visual.state_dict().items():
        got = tower.state_dict()[name]
        if t.dim() == 1 or name in ("pos_embed.weight", "patch_embed.proj.weight"):
            assert torch.equal(got, t), name
            continue
        blocks, error = t.reshape(-1, 32), (got - t).reshape(-1, 32)
        d = blocks.abs().amax(1, keepdim=True) / 127
        assert (error.abs() <= 0.57 * d).all(), name
        assert error.abs().max() > 0, name  # rounded, not stored as it was
    image = ImageProcessor.from_dir(path).preprocess(picture(128, 96, seed=2))
    with torch.no_grad():
        want, got = (m(image.pixel_values, [image.grid_thw]) for m in (model.visual, tower))
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of a GGUF (F32 tensors) with some metadata values changed (keys with `__` for `.`)."""
    reader = gguf.GGUFReader(src)
    changes = {k.replace("__", "."): v for k, v in changes.items()}
    writer = gguf.GGUFWriter(dst, arch=field(reader, "general.architecture"))
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, changes.get(f.name, f.contents()), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_an_mmproj_that_does_not_fit_is_refused_in_one_line(converted, tmp_path, capsys):
    path, model, out, mmproj = converted
    c = model.config
    cases = {
        "projector type 'qwen2vl_merger'": with_metadata(mmproj, tmp_path / "a.gguf",
                                                         clip__projector_type="qwen2vl_merger"),
        "width 128, but the model's is 64": with_metadata(mmproj, tmp_path / "b.gguf",
                                                          clip__vision__projection_dim=128),
        r"v.blk.0.ffn_up.weight .* has shape \(64, 32\), expected \(96, 32\)": with_metadata(
            mmproj, tmp_path / "c.gguf", clip__vision__feed_forward_length=96),
        "not an mmproj": out,  # the text GGUF
    }  # fmt: skip
    for message, file in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_mmproj(file, c, torch.float32)
    with pytest.raises(CheckpointError, match="width 64, but the model's is 32"):
        load_mmproj(mmproj, dataclasses.replace(c, hidden_size=32), torch.float32)
    with pytest.raises(InvalidArgument, match="is for a .gguf model"):
        find_mmproj(path, mmproj)
    capsys.readouterr()
    assert cli_main(["run", str(out), "hi", "--mmproj", str(cases["not an mmproj"]), "--max-tokens", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()  # before the model loads
    assert "is not an mmproj" in line
