"""GGUF import: llama.cpp qwen35 files written here (by our exporter, then requantized to Q8_0 / Q4_0 with gguf-py)
run with the original checkpoint's logits; the tokenizer rebuilt from tokenizer.ggml.* encodes as the original.

Tolerances (max |logit difference|, fp32 compute, logits of max ~6.5):
- F32 file vs the transformers model: 1e-4 (the conventions undone exactly; measured ~1e-5);
- F16 / BF16 / Q8_0 / Q4_0 file vs our model with its matrices put through that type (gguf-py quantize then
  dequantize, in llama.cpp's layout: the only change the file makes): 1e-4;
- vs the unrounded original, only a sanity bound: F16 0.15, BF16 0.6, Q8_0 2.0 (measured 0.06, 0.25, 1.05; mean KL
  1e-5, 5e-4, 5e-3); Q4_0 none (this random tiny model is chaotic, weights N(0, 0.2): Q4_0 gives KL 0.7 here;
  int4's accuracy is measured on a trained model in test_quant.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import qwenlite.io.gguf_export as qg
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.gguf_export import convert_tensor, export_gguf, gguf_name
from qwenlite.io.gguf_import import (
    dequantize_rows,
    load_gguf,
    our_name,
    read_gguf,
    tokenizer_from_gguf,
    unconvert_tensor,
)
from qwenlite.io.load import load_model
from qwenlite.io.quantized import quantize_checkpoint
from qwenlite.model.quantized import QuantLinear
from qwenlite.text.tokenizer import Tokenizer

from helpers import max_abs_diff, random_ids, reference_logits
from tiny_chat import make_chat_checkpoint
from train_helpers import single_threaded


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():  # see train_helpers: a neighbour on the other core stalls two-thread OpenMP
        yield


T = gguf.GGMLQuantizationType
QTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
VS_ORIGINAL = {"f32": 1e-4, "f16": 0.15, "bf16": 0.6, "q8_0": 2.0}


def is_matrix(gguf_tensor_name: str) -> bool:
    """Whether the exporter stores this tensor in the file's matrix type (the rest stay F32)."""
    return qg.tensor_type(gguf_tensor_name, 2, T.F16) != T.F32


def rewrite_gguf(src: Path, dst: Path, qtype=None, fields=None, drop=(), add=None) -> Path:
    """Copy a GGUF with gguf-py: matrices quantized to `qtype` (as llama-quantize --pure would), metadata `fields`
    overridden, tensors in `drop` left out, tensors `add` (name -> fp32 array) appended."""
    reader = gguf.GGUFReader(src)
    fields = dict(fields or {})
    if qtype is not None and qtype.name.lower() in FILE_TYPES:
        fields["general.file_type"] = (int(FILE_TYPES[qtype.name.lower()]), gguf.GGUFValueType.UINT32)
    writer = gguf.GGUFWriter(dst, arch=fields.pop("general.architecture", qg.ARCH))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value, kind = fields.pop(field.name, (field.contents(), field.types[0]))
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for name, (value, kind) in fields.items():
        writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if qtype is not None and t.tensor_type == T.F32 and is_matrix(t.name):
            writer.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, value in (add or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tied / untied tiny checkpoints (4 value heads on 2 key heads), their transformers models and F32 GGUFs."""
    out = {}
    for tied in (True, False):
        path = tmp_path_factory.mktemp("tied" if tied else "untied")
        hf = make_chat_checkpoint(path / "ckpt", tied=tied)
        out[tied] = (path / "ckpt", hf, export_gguf(path / "ckpt", path / "f32.gguf", "f32", progress=False))
    return out


def gguf_file(models, tied: bool, kind: str, tmp_path: Path) -> Path:
    ckpt, _hf, f32 = models[tied]
    if kind in ("f16", "bf16"):
        return export_gguf(ckpt, tmp_path / f"{kind}.gguf", kind, progress=False)
    return f32 if kind == "f32" else rewrite_gguf(f32, tmp_path / f"{kind}.gguf", QTYPES[kind])


def rounded_model(ckpt: Path, kind: str):
    """Our fp32 model with every matrix the file stores in `kind` put through it in llama.cpp's layout."""
    model = load_checkpoint(ckpt, "float32").model
    qtype = QTYPES[kind]
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings or not is_matrix(gguf_name(name)):
                continue
            theirs = convert_tensor(name, p, model.config).numpy()
            back = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(theirs, qtype), qtype).copy())
            p.copy_(unconvert_tensor(name, back.reshape(theirs.shape), model.config))
    return model


def test_names_and_conventions_invert_the_exporter(models):
    ckpt, _hf, _ = models[False]
    model = load_checkpoint(ckpt, "float32").model
    c = model.config
    assert c.linear_num_value_heads > c.linear_num_key_heads  # the value-head reorder is exercised
    for name, t in model.state_dict().items():
        assert our_name(gguf_name(name)) == name
        back = unconvert_tensor(name, convert_tensor(name, t, c), c)
        assert back.shape == t.shape, name
        # log(-(-exp(x))) and (1 + w) - 1 round (the multiplier 1 + w itself comes back exactly); the rest is exact.
        tol = 1e-6 if name.endswith("A_log") else 2**-23 if name.endswith("norm.weight") else 0
        assert max_abs_diff(back, t) <= tol, name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_logits_match_the_checkpoint(models, tmp_path, tied, kind):
    ckpt, hf, _ = models[tied]
    model, config, tokenizer = load_gguf(gguf_file(models, tied, kind, tmp_path), "float32", progress=False)
    assert config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    ids = random_ids(2, 40, seed=1)
    with torch.no_grad():
        logits = model(ids)
        if kind == "f32":
            assert max_abs_diff(logits, reference_logits(hf, ids)) < 1e-4
        else:
            assert max_abs_diff(logits, rounded_model(ckpt, kind)(ids)) < 1e-4
            if kind in VS_ORIGINAL:
                assert max_abs_diff(logits, reference_logits(hf, ids)) < VS_ORIGINAL[kind]


def test_config_and_tokenizer(models, tmp_path):
    ckpt, _hf, f32 = models[True]
    model, config, tokenizer = load_gguf(f32, progress=False)
    want = load_checkpoint(ckpt).config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "layer_types",
                  "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                  "linear_num_value_heads", "rope_theta", "partial_rotary_factor", "attn_output_gate"):  # fmt: skip
        assert getattr(config, field) == pytest.approx(getattr(want, field)), field
    assert config.dtype == "float32" and next(model.parameters()).dtype == torch.float32  # an F32 file
    original = Tokenizer.from_dir(ckpt)
    text = "<|im_start|>user\nWhat is two plus two? Paris is sunny.<|im_end|>\n<think>\n\n</think>\n\n1234 ünïcode"
    assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.decode(original.encode(text)) == text
    assert tokenizer.eos_token_ids == original.eos_token_ids
    assert tokenizer.chat_template == original.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == original.apply_chat_template(messages)
    _, bf16_config, _ = load_gguf(gguf_file(models, True, "q8_0", tmp_path), progress=False)
    assert bf16_config.dtype == "bfloat16"  # the default for anything but an all-F32 file


def test_real_vocabulary_tokenizer(qwen35_tokenizer_dir, qwen35_tokenizer, tmp_path):
    """The full Qwen3.5 vocabulary (248077 ids) through tokenizer.ggml.* and back: same ids as tokenizer.json."""
    writer = gguf.GGUFWriter(tmp_path / "tok.gguf", arch=qg.ARCH)
    qg.add_tokenizer_metadata(writer, qwen35_tokenizer_dir, 248320)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, _ = read_gguf(tmp_path / "tok.gguf")
    tokenizer = tokenizer_from_gguf(meta, tmp_path)
    texts = [
        "Hello world! 12345 naïve café 😀🦙 e\u0301",
        "我想在apple工作1314151天～ нещо на Български",
        "<|im_start|>user\nHi<|im_end|>\n<think>\nx</think>\n<tool_call>",
        "  \n\n\t spaces   \r\n I'LL don't",
    ]
    for text in texts:
        assert tokenizer.encode(text) == qwen35_tokenizer.encode(text), text
    assert tokenizer.vocab_size == qwen35_tokenizer.vocab_size == 248077
    assert tokenizer.eos_token_ids == qwen35_tokenizer.eos_token_ids


def test_our_reader_agrees_with_gguf_py(models):
    _ckpt, _hf, f32 = models[False]
    meta, tensors = read_gguf(f32)
    reader = gguf.GGUFReader(f32)
    assert meta == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for t in reader.tensors:
        ours = dequantize_rows(tensors[t.name])
        assert torch.equal(ours, torch.from_numpy(np.array(t.data)).reshape(ours.shape)), t.name


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K])
def test_k_quants_dequantize_by_rows(tmp_path, kind):
    """Q4_K / Q6_K (gguf-py cannot write them): random blocks with valid fp16 scales, read whole and by rows."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (6, 2 * size), dtype=np.uint8)  # 6 rows of 2 super-blocks (512 values)
    blocks = raw.reshape(6, 2, size)
    scale = np.full((6, 2), 0.01, np.float16).view(np.uint8).reshape(6, 2, 2)
    if kind == T.Q4_K:
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale  # d, dmin at the front
    else:
        blocks[..., -2:] = scale  # d at the back
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", arch=qg.ARCH)
    writer.add_tensor("w", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, tensors = read_gguf(tmp_path / "k.gguf")
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind))
    assert tensors["w"].shape == (6, 2 * block)
    assert torch.equal(dequantize_rows(tensors["w"]), want)
    assert torch.equal(dequantize_rows(tensors["w"], slice(2, 5)), want[2:5])
    assert torch.isfinite(want).all() and want.abs().max() > 0


def test_nextn_blocks_are_skipped(models, tmp_path):
    _ckpt, hf, f32 = models[True]
    extra = {"blk.4.nextn.eh_proj.weight": np.ones((64, 128)), "blk.4.attn_norm.weight": np.ones(64)}
    fields = {"qwen35.block_count": (5, gguf.GGUFValueType.UINT32),
              "qwen35.nextn_predict_layers": (1, gguf.GGUFValueType.UINT32)}  # fmt: skip
    path = rewrite_gguf(f32, tmp_path / "mtp.gguf", fields=fields, add=extra)
    model, config, _ = load_gguf(path, "float32", progress=False)
    assert config.num_hidden_layers == 4
    ids = random_ids(1, 12)
    assert max_abs_diff(model(ids), reference_logits(hf, ids)) < 1e-4


def test_errors(models, tmp_path):
    _ckpt, _hf, f32 = models[True]
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QwenliteError, match="not a valid GGUF"):
        load_gguf(tmp_path / "junk.gguf", progress=False)
    data = f32.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(QwenliteError, match="truncated"):
        load_gguf(tmp_path / "cut.gguf", progress=False)
    (tmp_path / "cut2.gguf").write_bytes(data[:2000])  # inside the metadata
    with pytest.raises(QwenliteError, match="not a valid GGUF"):
        load_gguf(tmp_path / "cut2.gguf", progress=False)
    path = rewrite_gguf(f32, tmp_path / "llama.gguf", fields={"general.architecture": "llama"})
    with pytest.raises(QwenliteError, match="architecture 'llama'"):
        load_gguf(path, progress=False)
    path = rewrite_gguf(f32, tmp_path / "missing.gguf", drop={"blk.1.ssm_a"})
    with pytest.raises(QwenliteError, match=r"missing tensor blk\.1\.ssm_a"):
        load_gguf(path, progress=False)
    path = rewrite_gguf(f32, tmp_path / "extra.gguf", add={"blk.2.surprise.weight": np.ones(4)})
    with pytest.raises(QwenliteError, match=r"unexpected tensor blk\.2\.surprise\.weight"):
        load_gguf(path, progress=False)
    fields = {"tokenizer.ggml.pre": ("llama-bpe", gguf.GGUFValueType.STRING)}
    path = rewrite_gguf(f32, tmp_path / "pre.gguf", fields=fields)
    with pytest.raises(QwenliteError, match="pre-tokenizer 'llama-bpe'"):
        load_gguf(path, progress=False)


def test_load_any(models, tmp_path):
    """One entry point: a .gguf file, a checkpoint directory (quantized on load or not), a quantized checkpoint."""
    ckpt, hf, f32 = models[False]
    ids = random_ids(1, 16)
    want = reference_logits(hf, ids)
    model, tokenizer = load_model(f32, "float32")
    assert max_abs_diff(model(ids), want) < 1e-4 and tokenizer.chat_template
    model, _ = load_model(ckpt, "float32")
    assert max_abs_diff(model(ids), want) < 1e-4
    model, _ = load_model(ckpt, "float32", quant="int8")
    assert isinstance(model.lm_head, QuantLinear)
    quantized = quantize_checkpoint(ckpt, tmp_path / "int8", 8, progress=False)
    loaded, tokenizer = load_model(quantized)
    assert torch.equal(loaded(ids), model(ids)) and tokenizer.encode("Paris") == Tokenizer.from_dir(ckpt).encode(
        "Paris"
    )
    with pytest.raises(QwenliteError, match="already quantized"):
        load_model(quantized, quant="int4")
    shutil.rmtree(quantized)
