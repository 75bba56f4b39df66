"""GGUF export read back with gguf-py's GGUFReader: llama.cpp's qwen35 tensor names, shapes, types and metadata,
and each conversion convention checked numerically against the source tensors, with the expected values built
here independently of the exporter (value-head permutation written out index by index)."""

import argparse
import hashlib
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qwenlite.io.gguf_export as qg
from qwenlite.cli.convert import add_convert_command
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import load_checkpoint, sanitize
from qwenlite.io.gguf_export import GGUF_LAYER_NAMES, GGUF_NAMES, export_gguf
from qwenlite.io.load import load_model
from qwenlite.text.vocab import QWEN3_PATTERN, build_qwen3_tokenizer

from helpers import TINY_TEXT_CONFIG, make_hf_checkpoint, max_abs_diff
from tiny_chat import make_chat_checkpoint, write_tiny_tokenizer

C = TINY_TEXT_CONFIG
HK, HV = C["linear_num_key_heads"], C["linear_num_value_heads"]
DK, DV = C["linear_key_head_dim"], C["linear_value_head_dim"]
F32, F16, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16
MATRIX_TYPE = {"f32": F32, "f16": F16, "bf16": BF16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for tied in (True, False):
        path = tmp_path_factory.mktemp("tied" if tied else "untied")
        make_chat_checkpoint(path, tied=tied)
        out[tied] = path
    return out


def value_head_permutation() -> list[int]:
    """llama.cpp's tiled order: new head v * Hk + k holds HF's head k * (Hv / Hk) + v (grouped by key head)."""
    r = HV // HK
    return [k * r + v for v in range(r) for k in range(HK)]


def permute_rows(t: torch.Tensor, head_dim: int, dim: int = 0) -> torch.Tensor:
    index = torch.tensor([h * head_dim + i for h in value_head_permutation() for i in range(head_dim)])
    return t.index_select(dim, index)


def expected_tensors(source: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """GGUF name -> fp32 values llama.cpp expects, from the saved transformers tensors."""
    out = {}
    for name, t in source.items():
        if tied and name == "lm_head.weight":
            continue
        t = t.float()
        layer, _, key = name.removeprefix("model.layers.").partition(".")
        if name in GGUF_NAMES:
            target = GGUF_NAMES[name]
        else:
            target = f"blk.{layer}.{GGUF_LAYER_NAMES[key]}"
        if key.endswith("norm.weight") and key != "linear_attn.norm.weight" or name == "model.norm.weight":
            t = 1 + t  # zero-centred RMSNorm stored as the multiplier
        elif key == "linear_attn.A_log":
            t = -torch.exp(t[value_head_permutation()])
        elif key in ("linear_attn.dt_bias", "linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight"):
            t = t[value_head_permutation()]
        elif key == "linear_attn.in_proj_z.weight":
            t = permute_rows(t, DV)
        elif key in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
            t = torch.cat([t[: 2 * HK * DK], permute_rows(t[2 * HK * DK :], DV)])
            t = t.squeeze(1) if key.endswith("conv1d.weight") else t
        elif key == "linear_attn.out_proj.weight":
            t = permute_rows(t, DV, dim=1)
        out[target] = t
    return out


def read_tensor(t) -> torch.Tensor:
    data = np.asarray(t.data)
    if t.tensor_type == BF16:  # the reader hands bf16 back as raw bytes
        bits = torch.from_numpy(data.view(np.uint16).astype(np.int32) << 16)
        return bits.view(torch.float32).reshape(tuple(reversed(t.shape.tolist())))
    return torch.from_numpy(data.astype(np.float32)).reshape(tuple(reversed(t.shape.tolist())))


def rounded(t: torch.Tensor, qtype) -> torch.Tensor:
    return t.to({F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[qtype]).float()


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(("tied", "dtype"), [(True, "f16"), (False, "bf16"), (False, "f32")])
def test_tensors_names_shapes_types_and_conventions(checkpoints, tmp_path, tied, dtype):
    path = checkpoints[tied]
    out = export_gguf(path, tmp_path / "model.gguf", dtype, progress=False)
    reader = gguf.GGUFReader(out)
    source = load_file(str(path / "model.safetensors"))
    expected = expected_tensors(source, tied)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    assert ("output.weight" in got) is (not tied)  # tied: llama.cpp reuses token_embd
    for name, want in expected.items():
        t = got[name]
        assert tuple(reversed(t.shape.tolist())) == tuple(want.shape), name
        small = want.ndim == 1 or name.endswith("_norm.weight") or ".ssm_conv1d." in name or name.endswith("ssm_a")
        assert t.tensor_type == (F32 if small else MATRIX_TYPE[dtype]), name
        assert torch.equal(read_tensor(t), rounded(want, t.tensor_type)), name


def test_table_matches_gguf_py_tensor_map():
    """Our explicit name table agrees with gguf-py's TensorNameMap for the qwen35 architecture."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, 4)
    names = dict(GGUF_NAMES) | {f"model.layers.2.{k}": f"blk.2.{v}" for k, v in GGUF_LAYER_NAMES.items()}
    for ours, theirs in names.items():
        hf = ours.replace(".dt_bias", ".dt_proj.bias")  # the converter renames dt_bias before the lookup
        assert name_map.get_name(hf, try_suffixes=(".weight", ".bias")) == theirs, ours
    qwen35 = {gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35]}
    stems = {n.removeprefix("blk.2.").removesuffix(".weight").removesuffix(".bias") for n in names.values()}
    assert stems <= qwen35  # every tensor we write is one llama.cpp's qwen35 architecture declares


def test_published_layout(tmp_path):
    """Qwen3_5ForConditionalGeneration checkpoints: text under model.language_model, a vision tower (not exported)
    and the MTP head (the tail block 4, test_gguf_mtp's), mrope_section in rope_parameters (written padded to 4)."""
    make_hf_checkpoint(tmp_path / "ckpt", layout="conditional_generation", add_mtp=True, shard_bytes=100_000)
    write_tiny_tokenizer(tmp_path / "ckpt")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32", progress=False))
    assert field(reader, "qwen35.rope.dimension_sections") == [2, 1, 1, 0]
    assert field(reader, "qwen35.block_count") == 5 and field(reader, "qwen35.nextn_predict_layers") == 1
    stored = {k: v for f in (tmp_path / "ckpt").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    text, _mtp = sanitize(stored)  # the text model's tensors under our flat names
    want = expected_tensors(text, tied=True)
    got = {t.name: read_tensor(t) for t in reader.tensors if not t.name.startswith("blk.4.")}
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


# A block of 32 values quantized and dequantized by gguf-py (llama.cpp's reference rounding) is off by at most this
# fraction of the block's largest |value|: half a step (Q8_0: amax / 127; Q4_0: amax / 8, but the value opposite the
# largest may round to 8 and clip to 7, a whole step), plus the scale's fp16 rounding (2^-11 relative, times up to
# 127 or 8 steps).
BLOCK_ERROR = {"q8_0": 1 / 254 + 2**-11, "q4_0": 1 / 8 + 2**-11}


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_export_loads_back_within_the_formats_error(checkpoints, tmp_path, dtype):
    """export_gguf's Q8_0 / Q4_0 files, loaded back by load_model: every matrix is quantized (no F16 fallback here,
    every row splits into blocks of 32) and comes back as gguf-py's quantize -> dequantize of the original, so within
    BLOCK_ERROR of it per block; the other tensors are F32 and come back as they were; and the model runs."""
    path = checkpoints[False]  # untied: the head is a quantized matrix too
    out = export_gguf(path, tmp_path / f"{dtype}.gguf", dtype, progress=False)
    qtype, file_type = qg.FILE_TYPES[dtype]
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == int(file_type)
    types = {t.name: t.tensor_type for t in reader.tensors}
    model, tokenizer = load_model(out, "float32")
    original = load_checkpoint(path, "float32").model
    c, loaded = original.config, model.state_dict()
    quantized = set()
    for name, want in original.state_dict().items():
        got, kind = loaded[name], types[qg.gguf_name(name)]
        if kind == F32:
            # log(-(-exp(x))) and (1 + w) - 1 round; the rest is exact (as test_gguf_import checks for F32 files)
            tol = 1e-6 if name.endswith("A_log") else 2**-23 if name.endswith("norm.weight") else 0
            assert (got - want).abs().max() <= tol, name
            continue
        assert kind == qtype, name
        quantized.add(name)
        theirs, back = qg.convert_tensor(name, want, c), qg.convert_tensor(name, got, c)  # llama.cpp's layout
        rounded = gguf.quants.dequantize(gguf.quants.quantize(theirs.numpy(), qtype), qtype)
        assert torch.equal(back, torch.from_numpy(rounded).reshape(back.shape)), name
        amax = theirs.reshape(-1, 32).abs().amax(1, keepdim=True)
        assert ((back - theirs).reshape(-1, 32).abs() <= amax * BLOCK_ERROR[dtype]).all(), name
    assert quantized == {n for n, t in original.state_dict().items() if t.dim() == 2}  # the conv is 3-D
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        logits, want = model(ids), original(ids)
    assert torch.isfinite(logits).all() and logits.shape == want.shape
    if dtype == "q8_0":  # Q4_0 on this random, chaotic model: see test_gguf_import's docstring
        assert max_abs_diff(logits, want) < 2.0


def test_metadata(checkpoints, tmp_path):
    path = checkpoints[True]
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "model.gguf", "f16", progress=False))
    want = {
        "general.architecture": "qwen35",
        "general.type": "model",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "qwen35.block_count": 4,
        "qwen35.context_length": C["max_position_embeddings"],
        "qwen35.embedding_length": C["hidden_size"],
        "qwen35.feed_forward_length": C["intermediate_size"],
        "qwen35.attention.head_count": C["num_attention_heads"],
        "qwen35.attention.head_count_kv": C["num_key_value_heads"],
        "qwen35.attention.key_length": C["head_dim"],
        "qwen35.attention.value_length": C["head_dim"],
        "qwen35.rope.dimension_count": int(C["head_dim"] * 0.25),
        "qwen35.rope.dimension_sections": [11, 11, 10, 0],
        "qwen35.full_attention_interval": 4,
        "qwen35.attention.recurrent_layers": [True, True, True, False],
        "qwen35.ssm.conv_kernel": C["linear_conv_kernel_dim"],
        "qwen35.ssm.state_size": DK,
        "qwen35.ssm.group_count": HK,
        "qwen35.ssm.time_step_rank": HV,
        "qwen35.ssm.inner_size": HV * DV,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen35",
    }
    assert {k: field(reader, k) for k in want} == want
    assert field(reader, "qwen35.rope.freq_base") == pytest.approx(C["rope_parameters"]["rope_theta"])
    assert field(reader, "qwen35.attention.layer_norm_rms_epsilon") == pytest.approx(C["rms_norm_eps"])

    # The tokenizer: every id up to vocab_size, unused ones padded, specials as control tokens.
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == C["vocab_size"]
    for i in range(C["vocab_size"]):
        if i not in by_id:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", gguf.TokenType.UNUSED)
        else:
            special = any(t["id"] == i for t in spec["added_tokens"])
            assert (tokens[i], types[i]) == (by_id[i], gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL)
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["<|im_end|>"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == vocab["<|endoftext|>"]
    assert field(reader, "tokenizer.chat_template") == (path / "chat_template.jinja").read_text()


# The text llama.cpp's converter tokenizes to name a pre-tokenizer by hashing the ids (conversion/base.py,
# get_vocab_base_pre).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def chkhsh(ids: list[int]) -> str:
    return hashlib.sha256(str(ids).encode()).hexdigest()


def test_qwen35_pre_tokenizer_is_llamacpps(qwen35_tokenizer):
    """The real Qwen3.5 vocabulary must hash to the converter's "qwen35" entry."""
    assert chkhsh(qwen35_tokenizer.encode(CHKTXT)) == "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4"


def test_qwen3_pre_tokenizer_is_llamacpps_qwen2():
    """Qwen3's vocabulary (Qwen2's ranks and split regex) hashes to the converter's "qwen2" entry (its reference:
    Qwen/Qwen1.5-7B), the name a qwen3 / qwen2 export writes for that regex."""
    ids = build_qwen3_tokenizer().encode(CHKTXT).ids
    assert chkhsh(ids) == "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"
    assert qg.PRE_TOKENIZERS["qwen2"] == QWEN3_PATTERN


def test_a_failed_export_leaves_the_previous_file(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    convert, calls = qg.convert_tensor, []

    def failing(name, t, c):  # fails half way through writing the tensors
        calls.append(name)
        if len(calls) == 10:
            raise RuntimeError("disk full")
        return convert(name, t, c)

    monkeypatch.setattr(qg, "convert_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(checkpoints[True], out, progress=False)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind


def test_errors(checkpoints, tmp_path):
    src = shutil.copytree(checkpoints[True], tmp_path / "ckpt")
    with pytest.raises(QwenliteError, match="unknown GGUF dtype"):
        export_gguf(src, tmp_path / "a.gguf", "q4")
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["linear_attention", "full_attention"] * 2
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenliteError, match="full_attention_interval"):
        export_gguf(src, tmp_path / "a.gguf")
    shutil.copy(checkpoints[True] / "config.json", src / "config.json")
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"  # neither Qwen3.5's nor Qwen3's
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QwenliteError, match="with Qwen3.5's or Qwen2 / Qwen3's pre-tokenizer regex"):
        export_gguf(src, tmp_path / "a.gguf")
    (src / "tokenizer.json").unlink()
    with pytest.raises(QwenliteError, match="no tokenizer.json"):
        export_gguf(src, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_convert_command(checkpoints, tmp_path):
    parser = argparse.ArgumentParser()
    add_convert_command(parser.add_subparsers())
    args = parser.parse_args(["convert", str(checkpoints[False]), "--to", "gguf", str(tmp_path / "m.gguf")])
    assert args.func(args) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
