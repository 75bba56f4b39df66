"""GGUF import: llama.cpp qwen35 files written here (by our exporter, then requantized to Q8_0 / Q4_0 with gguf-py)
run with the original checkpoint's logits; the tokenizer rebuilt from tokenizer.ggml.* encodes as the original.

Tolerances (max |logit difference|, fp32 compute, logits of max ~6.5):
- F32 file vs the transformers model: 1e-4 (the conventions undone exactly; measured ~1e-5);
- F16 / BF16 / Q8_0 / Q4_0 file vs our model with its matrices put through that type (gguf-py quantize then
  dequantize, in llama.cpp's layout: the only change the file makes): 1e-4;
- vs the unrounded original, only a sanity bound: F16 0.15, BF16 0.6, Q8_0 2.0 (measured 0.06, 0.25, 1.05; mean KL
  1e-5, 5e-4, 5e-3); Q4_0 none (this random tiny model is chaotic, weights N(0, 0.2): Q4_0 gives KL 0.7 here;
  int4's accuracy is measured on a trained model in test_quant.py).

K-quants: gguf-py reads Q4_K / Q6_K but cannot write them (its quantize raises NotImplementedError), so `k_quantize`
below writes them: simple round-to-nearest per sub-block, packed in ggml's layout, checked against gguf-py's
dequantizer. A model of hidden 256 (K-quant rows are 256-value super-blocks) in llama.cpp's Q4_K_M mix then runs
with the logits of our model holding the same dequantized matrices (1e-4).
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
    read_gguf,
    tokenizer_from_gguf,
    unconvert_tensor,
)
from qwenlite.io.load import load_model, load_mtp
from qwenlite.io.quantized import quantize_checkpoint
from qwenlite.model.quantized import QuantLinear
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import write_tokenizer_files

from helpers import TINY_TEXT_CONFIG, max_abs_diff, random_ids, reference_logits
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


# --- K-quants, which gguf-py cannot write -------------------------------------------------------------------------


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b > 0)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) -> (n, 210) blocks: ql (128: low nibbles), qh (64: high 2 bits), 16 int8 scales, fp16 d; value
    = d * scale[sub-block of 16] * (q - 32). The nibble and bit order is gguf-py's Q6_K.dequantize_blocks read
    backwards."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    step = np.abs(sub).max(-1) / 31  # (n, 16)
    d = (step.max(-1) / 127).astype(np.float16).astype(np.float32)  # (n,)
    scales = _divide(step, d[:, None]).round().clip(-128, 127)
    q = _divide(sub, (d[:, None] * scales)[..., None]).round().clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(n, 256)
    low, high = (q & 0xF).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8), _f16(d)], axis=1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) -> (n, 144) blocks: fp16 d and dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles;
    value = d * scale[sub-block of 32] * q - dmin * min[sub-block] (gguf-py's Q4_K.dequantize_blocks backwards)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)  # (n, 8)
    step, offset = (sub.max(-1) - low) / 15, -low
    d = (step.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (offset.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = _divide(step, d[:, None]).round().clip(0, 63).astype(np.uint8)
    mn = _divide(offset, dmin[:, None]).round().clip(0, 63).astype(np.uint8)
    q = _divide(sub + (dmin[:, None] * mn)[..., None], (d[:, None] * sc)[..., None]).round().clip(0, 15)
    q = q.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    packed = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )
    return np.concatenate([_f16(d), _f16(dmin), packed, qs], axis=1)


def k_quantize(values: np.ndarray, qtype) -> np.ndarray:
    """(rows, K) fp32, K a multiple of 256 -> (rows, bytes per row) uint8 in `qtype` (Q4_K or Q6_K)."""
    blocks = values.astype(np.float32).reshape(-1, 256)
    packed = {T.Q4_K: _q4_k, T.Q6_K: _q6_k}[qtype](blocks)
    return packed.reshape(values.shape[0], -1)


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    return k_quantize(values, qtype) if qtype in (T.Q4_K, T.Q6_K) else gguf.quants.quantize(values, qtype)


# A 256-value super-block through k_quantize and gguf-py's dequantize is off by at most this fraction of its largest
# |value| (half a step of amax / 31, resp. of a range <= 2 amax over 15; plus the 6-bit and 8-bit scales' rounding).
K_BLOCK_ERROR = {T.Q6_K: 1 / 32, T.Q4_K: 1 / 8}


def within_block_error(got: torch.Tensor, want: torch.Tensor, block: int, fraction: float) -> bool:
    amax = want.reshape(-1, block).abs().amax(1, keepdim=True)
    return bool(((got - want).reshape(-1, block).abs() <= amax * fraction).all())


def rewrite_gguf(src: Path, dst: Path, qtype=None, fields=None, drop=(), add=None) -> Path:
    """Copy a GGUF with gguf-py: matrices quantized to `qtype` (as llama-quantize --pure would; or a function of the
    tensor's name, for a mix), metadata `fields` overridden, tensors in `drop` left out, tensors `add` (name -> fp32
    array) appended."""
    reader = gguf.GGUFReader(src)
    fields = dict(fields or {})
    qtype_of = qtype if callable(qtype) else lambda name: qtype
    if qtype is not None and not callable(qtype) and qtype.name.lower() in FILE_TYPES:
        fields["general.file_type"] = (int(FILE_TYPES[qtype.name.lower()]), gguf.GGUFValueType.UINT32)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=fields.pop("general.architecture", arch))
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
            kind = qtype_of(t.name)
            writer.add_tensor(t.name, quantize(np.asarray(t.data), kind), raw_dtype=kind)
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


def rounded_model(ckpt: Path, kind):
    """Our fp32 model with every matrix the file stores in `kind` (a name of QTYPES, or a function of the GGUF tensor
    name giving its type) put through it in llama.cpp's layout."""
    model = load_checkpoint(ckpt, "float32").model
    qtype_of = kind if callable(kind) else lambda name: QTYPES[kind]
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings or not is_matrix(gguf_name(name)):
                continue
            theirs = convert_tensor(name, p, model.config).numpy()
            qtype = qtype_of(gguf_name(name))
            back = torch.from_numpy(gguf.quants.dequantize(quantize(theirs, qtype), qtype).copy())
            p.copy_(unconvert_tensor(name, back.reshape(theirs.shape), model.config))
    return model


def test_names_and_conventions_invert_the_exporter(models):
    ckpt, _hf, _ = models[False]
    model = load_checkpoint(ckpt, "float32").model
    c = model.config
    assert c.linear_num_value_heads > c.linear_num_key_heads  # the value-head reorder is exercised
    names = list(model.state_dict())
    assert len({gguf_name(name) for name in names}) == len(names)  # import finds each tensor by its GGUF name
    for name, t in model.state_dict().items():
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


@pytest.mark.parametrize("qwen3", [False, True], ids=["qwen35", "qwen3"])
def test_real_vocabulary_tokenizer(request, tmp_path, qwen3):
    """The full Qwen3.5 vocabulary (248077 ids), or Qwen3's (151669, pre-tokenizer "qwen2": the split regex without
    combining marks, which the Hindi below tells apart), through tokenizer.ggml.* and back: same ids as
    tokenizer.json."""
    if qwen3:
        root = tmp_path / "qwen3"
        write_tokenizer_files(root, qwen3=True)
    else:
        root = request.getfixturevalue("qwen35_tokenizer_dir")
    reference = Tokenizer.from_dir(root)
    writer = gguf.GGUFWriter(tmp_path / "tok.gguf", arch="qwen3" if qwen3 else "qwen35")
    qg.add_tokenizer_metadata(writer, root, 151936 if qwen3 else 248320)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, _ = read_gguf(tmp_path / "tok.gguf")
    assert meta["tokenizer.ggml.pre"] == ("qwen2" if qwen3 else "qwen35")
    tokenizer = tokenizer_from_gguf(meta, tmp_path)
    texts = [
        "Hello world! 12345 naïve café 😀🦙 e\u0301",
        "我想在apple工作1314151天～ нещо на Български हिन्दी भाषा",
        "<|im_start|>user\nHi<|im_end|>\n<think>\nx</think>\n<tool_call>",
        "  \n\n\t spaces   \r\n I'LL don't",
    ]
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.vocab_size == reference.vocab_size == (151669 if qwen3 else 248077)
    assert tokenizer.eos_token_ids == reference.eos_token_ids


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
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", arch="qwen35")
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


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K])
def test_k_quantize_writes_what_gguf_py_reads(kind):
    """The test's own K-quant writer against gguf-py's reader: values of very different sizes per row and per
    sub-block, a zero block and a negative-only one come back within K_BLOCK_ERROR of each super-block's largest."""
    gen = torch.Generator().manual_seed(int(kind))
    x = torch.randn(6, 512, generator=gen) * torch.logspace(-3, 1, 6)[:, None]
    x[:, :256] *= torch.rand(256, generator=gen) * 3  # sub-blocks of different ranges
    x[2, 256:] = 0
    x[3, :256] = -x[3, :256].abs()
    back = torch.from_numpy(gguf.quants.dequantize(k_quantize(x.numpy(), kind), kind).copy())
    assert back.shape == x.shape
    assert within_block_error(back, x, 256, K_BLOCK_ERROR[kind])
    assert torch.equal(back[2, 256:], torch.zeros(256))


K_TEXT_CONFIG = dict(  # every matrix row (hidden 256, MLP 512, 4 x 64 heads, 4 x 64 value heads) splits into 256s
    TINY_TEXT_CONFIG, hidden_size=256, intermediate_size=512, head_dim=64, linear_value_head_dim=64
)


def q4_k_m(name: str):
    """llama.cpp's Q4_K_M mix, simplified: Q6_K for the head, the embedding and the MLP's down projection."""
    return T.Q6_K if name in ("output.weight", "token_embd.weight") or name.endswith("ffn_down.weight") else T.Q4_K


def test_a_k_quant_model_imports(tmp_path):
    """A whole model in Q4_K / Q6_K: imported, its matrices are those blocks dequantized (within the formats' error of
    the originals) and its logits are those of our model holding the same dequantized matrices."""
    ckpt = tmp_path / "ckpt"
    make_chat_checkpoint(ckpt, tied=False, text_config=K_TEXT_CONFIG)
    f32 = export_gguf(ckpt, tmp_path / "f32.gguf", "f32", progress=False)
    file_type = {"general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q4_K_M), gguf.GGUFValueType.UINT32)}
    path = rewrite_gguf(f32, tmp_path / "q4_k_m.gguf", q4_k_m, fields=file_type)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {types[n] for n in types if is_matrix(n)} == {T.Q4_K, T.Q6_K}

    model, config, _ = load_gguf(path, "float32", progress=False)
    assert config.hidden_size == 256 and not config.tie_word_embeddings
    original = load_checkpoint(ckpt, "float32").model
    loaded = model.state_dict()
    for name, want in original.state_dict().items():
        if is_matrix(gguf_name(name)):
            got = convert_tensor(name, loaded[name], config)
            kind = types[gguf_name(name)]
            assert within_block_error(got, convert_tensor(name, want, config), 256, K_BLOCK_ERROR[kind]), name
    ids = random_ids(2, 40, seed=1)
    with torch.no_grad():
        logits, want = model(ids), rounded_model(ckpt, q4_k_m)(ids)
    assert max_abs_diff(logits, want) < 1e-4 and want.abs().max() > 1


def test_nextn_blocks_are_left_to_load_mtp(models, tmp_path):
    """The model comes from the first block_count - nextn_predict_layers blocks whatever the tail holds; load_mtp reads
    the tail strictly (a whole head: test_gguf_mtp); more than one MTP layer is refused."""
    _ckpt, hf, f32 = models[True]
    extra = {"blk.4.nextn.eh_proj.weight": np.ones((64, 128)), "blk.4.attn_norm.weight": np.ones(64)}
    fields = {"qwen35.block_count": (5, gguf.GGUFValueType.UINT32),
              "qwen35.nextn_predict_layers": (1, gguf.GGUFValueType.UINT32)}  # fmt: skip
    path = rewrite_gguf(f32, tmp_path / "mtp.gguf", fields=fields, add=extra)
    model, config, _ = load_gguf(path, "float32", progress=False)
    assert config.num_hidden_layers == 4
    ids = random_ids(1, 12)
    assert max_abs_diff(model(ids), reference_logits(hf, ids)) < 1e-4
    with pytest.raises(QwenliteError, match=r"mtp\.gguf is missing tensor blk\.4\.attn_k\.weight"):
        load_mtp(path, model)
    extra["blk.5.nextn.eh_proj.weight"] = extra["blk.4.nextn.eh_proj.weight"]
    path = rewrite_gguf(f32, tmp_path / "odd.gguf", fields=fields, add=extra)
    with pytest.raises(QwenliteError, match=r"unexpected tensor blk\.5\.nextn\.eh_proj\.weight in .*odd\.gguf"):
        load_mtp(path, model)
    fields = {"qwen35.block_count": (6, gguf.GGUFValueType.UINT32),
              "qwen35.nextn_predict_layers": (2, gguf.GGUFValueType.UINT32)}  # fmt: skip
    path = rewrite_gguf(f32, tmp_path / "two.gguf", fields=fields, add=extra)
    with pytest.raises(QwenliteError, match=r"two\.gguf has 2 multi-token-prediction layers .*; qwenlite runs one$"):
        load_gguf(path, progress=False)


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
    with pytest.raises(
        QwenliteError, match="architecture 'llama' is not one qwenlite reads .'qwen35', 'qwen35moe', 'qwen3', 'qwen2'.$"
    ):
        load_gguf(path, progress=False)
    path = rewrite_gguf(f32, tmp_path / "missing.gguf", drop={"blk.1.ssm_a"})
    with pytest.raises(QwenliteError, match=r"missing tensor blk\.1\.ssm_a"):
        load_gguf(path, progress=False)
    path = rewrite_gguf(f32, tmp_path / "extra.gguf", add={"blk.2.surprise.weight": np.ones(4)})
    with pytest.raises(QwenliteError, match=r"unexpected tensor blk\.2\.surprise\.weight"):
        load_gguf(path, progress=False)
    fields = {"qwen35.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}
    path = rewrite_gguf(f32, tmp_path / "yarn.gguf", fields=fields)
    with pytest.raises(QwenliteError, match="uses 'yarn' rotary scaling; qwenlite has only the default"):
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
