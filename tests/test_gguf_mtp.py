"""The MTP head in GGUF, in llama.cpp's layout (the tail block that `--spec-type draft-mtp` reads): export writes
block_count N + 1, nextn_predict_layers 1, attention.recurrent_layers with block N a full-attention one,
`blk.N.nextn.*` and the head's layer as a main full-attention layer of block N (MoE for qwen35moe), each value
checked against the checkpoint's with the conventions written out here;
import reads the main model from the first N blocks and `load_mtp` the head from the tail, equal to the original's
(F32: to fp32 rounding of 1 + w - 1; Q8_0: gguf-py's own rounding of each matrix); greedy speculation from the GGUF is
plain decoding, through the library and `qwenlite run`; a GGUF without the head has none to draft with.

The checkpoints are written here by qwenlite's writer (no transformers: a few seconds saved), the documented
initialisation plus noise so that a norm stored as w instead of 1 + w, or a swapped tensor, shows in the values and
the logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qwenlite.cli import main
from qwenlite.config import ModelConfig
from qwenlite.errors import CheckpointError
from qwenlite.generate import generate_tokens
from qwenlite.io.checkpoint import expected_shapes, write_checkpoint
from qwenlite.io.gguf_export import GGUF_MTP_NAMES, convert_tensor, export_gguf
from qwenlite.io.load import load_model, load_mtp
from qwenlite.model.mtp import MTP, PREFIX
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.sample import SamplingParams
from qwenlite.speculative import MTPDraft, NgramDraft, Speculation, make_speculation

from helpers import TINY_TEXT_CONFIG, max_abs_diff, random_ids
from tiny_chat import write_tiny_tokenizer
from train_helpers import single_threaded

T = gguf.GGMLQuantizationType
N = TINY_TEXT_CONFIG["num_hidden_layers"]  # the head's block
MOE_TEXT_CONFIG = dict(TINY_TEXT_CONFIG, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48)  # fmt: skip
GREEDY = SamplingParams(temperature=0)
# The head's layer in block N: a main full-attention layer's tensors (our key -> llama.cpp's), dense or MoE.
ATTENTION = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "post_attention_norm",
             "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm"}  # fmt: skip
DENSE_MLP = {"mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
MOE_MLP = {"mlp.gate.weight": "ffn_gate_inp", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp",
           "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp", "mlp.shared_expert.up_proj.weight": "ffn_up_shexp",
           "mlp.shared_expert.down_proj.weight": "ffn_down_shexp"}  # fmt: skip
EXPERTS = {"gate_proj.weight": "ffn_gate_exps", "up_proj.weight": "ffn_up_exps", "down_proj.weight": "ffn_down_exps"}
NORMS = ("norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")  # zero-centred: 1 + w


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():  # see train_helpers: a neighbour on the other core stalls two-thread OpenMP
        yield


def write_checkpoint_with_head(path, text_config: dict, model_type: str, head: bool = True, drop: str = "") -> None:
    """A tiny checkpoint with (or without) an MTP head and the tiny tokenizer; tensor `drop` left out."""
    config = ModelConfig.from_dict({**text_config, "model_type": model_type, "dtype": "float32"})
    with torch.device("meta"):
        shapes = expected_shapes(Qwen3_5ForCausalLM(config))
        if head:
            shapes |= {PREFIX + name: tuple(t.shape) for name, t in MTP(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = [(name, initial_value(name, shape, gen) + torch.randn(shape, generator=gen) * 0.2)
               for name, shape in shapes.items() if name != drop]  # fmt: skip
    write_checkpoint(config, path, tensors, torch.float32)
    write_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """dense / moe checkpoints with a head, their F32 GGUFs, and the dense one's Q8_0 GGUF."""
    out = {}
    for kind, text_config, model_type in (("dense", TINY_TEXT_CONFIG, "qwen3_5_text"),
                                          ("moe", MOE_TEXT_CONFIG, "qwen3_5_moe_text")):  # fmt: skip
        path = tmp_path_factory.mktemp(kind)
        write_checkpoint_with_head(path / "ckpt", text_config, model_type)
        out[kind] = (path / "ckpt", export_gguf(path / "ckpt", path / "f32.gguf", "f32", progress=False))
    out["q8_0"] = export_gguf(out["dense"][0], out["dense"][1].with_name("q8_0.gguf"), "q8_0", progress=False)
    return out


def read(t) -> torch.Tensor:
    """A GGUF tensor as fp32 in our (rows, cols) order."""
    values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy()
    return torch.from_numpy(values).reshape(tuple(reversed(t.shape.tolist())))


def expected_tail(head: dict[str, torch.Tensor], moe: bool) -> dict[str, torch.Tensor]:
    """blk.N.* -> the values llama.cpp expects, from the head's `mtp.*` tensors, the conventions written out."""
    own = {"fc.weight": "nextn.eh_proj", "pre_fc_norm_embedding.weight": "nextn.enorm",
           "pre_fc_norm_hidden.weight": "nextn.hnorm", "norm.weight": "nextn.shared_head_norm"}  # fmt: skip
    layer = ATTENTION | (MOE_MLP if moe else DENSE_MLP)
    out, experts = {}, {}
    for name, t in head.items():
        key = name.removeprefix(PREFIX)
        t = t + 1 if key.endswith(NORMS) else t  # every norm of the head, the layer's q/k norms included
        if key in own:
            out[f"blk.{N}.{own[key]}.weight"] = t
        elif key.removeprefix("layers.0.") in layer:
            out[f"blk.{N}.{layer[key.removeprefix('layers.0.')]}.weight"] = t
        else:  # layers.0.mlp.experts.{e}.<projection>
            e, projection = key.removeprefix("layers.0.mlp.experts.").split(".", 1)
            experts.setdefault(f"blk.{N}.{EXPERTS[projection]}.weight", {})[int(e)] = t
    out |= {name: torch.stack([by_e[e] for e in sorted(by_e)]) for name, by_e in experts.items()}
    return out


def head_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(PREFIX)}


def test_gguf_py_names_the_head_tensors_so():
    """Our nextn names are gguf-py's NEXTN_* names (its tables list them for other architectures, not qwen35)."""
    nextn = {gguf.MODEL_TENSOR.NEXTN_EH_PROJ: "fc.weight",
             gguf.MODEL_TENSOR.NEXTN_ENORM: "pre_fc_norm_embedding.weight",
             gguf.MODEL_TENSOR.NEXTN_HNORM: "pre_fc_norm_hidden.weight",
             gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM: "norm.weight"}  # fmt: skip
    for tensor, ours in nextn.items():
        assert gguf.TENSOR_NAMES[tensor].format(bid=N) + ".weight" == f"blk.{N}.{GGUF_MTP_NAMES[ours]}"
    assert set(GGUF_MTP_NAMES) == set(nextn.values())


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_writes_the_head_as_the_tail_block(checkpoints, kind):
    ckpt, f32 = checkpoints[kind]
    reader = gguf.GGUFReader(f32)
    arch = "qwen35moe" if kind == "moe" else "qwen35"
    assert reader.fields[f"{arch}.block_count"].contents() == N + 1
    assert reader.fields[f"{arch}.nextn_predict_layers"].contents() == 1
    # Each block's kind, as the converter writes it (llama.cpp #28208): the head's block is full attention, where
    # full_attention_interval alone, without the loader's guard for nextn blocks, says linear (N + 1 = 5).
    linear = [kind == "linear_attention" for kind in TINY_TEXT_CONFIG["layer_types"]]
    assert reader.fields[f"{arch}.attention.recurrent_layers"].contents() == [*linear, False]
    got = {t.name: t for t in reader.tensors}
    want = expected_tail(head_tensors(ckpt), moe=kind == "moe")
    assert {n for n in got if n.startswith(f"blk.{N}.")} == set(want)
    assert not any(n.startswith(f"blk.{N + 1}.") for n in got)
    for name, w in want.items():
        assert tuple(reversed(got[name].shape.tolist())) == tuple(w.shape), name
        assert got[name].tensor_type == T.F32, name
        assert torch.equal(read(got[name]), w), name
    # every name but the nextn ones is one llama.cpp's architecture declares for its blocks
    declared = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35MOE if kind == "moe" else
                                                                   gguf.MODEL_ARCH.QWEN35]}  # fmt: skip
    layer = {n.removesuffix(".weight").replace(f"blk.{N}.", "blk.{bid}.") for n in want if ".nextn." not in n}
    assert layer <= declared


def test_quantized_export_quantizes_the_heads_matrices_as_the_main_layers(checkpoints):
    """Q8_0: eh_proj and the layer's matrices Q8_0 (as the main layers' and as the converter's --outtype q8_0), the
    norms F32; load_mtp gives each matrix as gguf-py's quantize -> dequantize of the original leaves it."""
    ckpt, _ = checkpoints["dense"]
    reader = gguf.GGUFReader(checkpoints["q8_0"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types[f"blk.{N}.nextn.eh_proj.weight"] == types["blk.3.attn_q.weight"] == T.Q8_0
    assert types[f"blk.{N}.attn_q.weight"] == types[f"blk.{N}.ffn_down.weight"] == T.Q8_0
    assert types[f"blk.{N}.nextn.enorm.weight"] == types[f"blk.{N}.attn_q_norm.weight"] == T.F32
    model, _ = load_model(checkpoints["q8_0"], "float32")
    head = load_mtp(checkpoints["q8_0"], model)
    config = model.config
    for name, t in head.state_dict().items():
        original = head_tensors(ckpt)[PREFIX + name]
        if t.dim() == 2:
            theirs = convert_tensor(PREFIX + name, original, config).numpy()
            original = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(theirs, T.Q8_0), T.Q8_0).copy())
            assert not torch.equal(original, head_tensors(ckpt)[PREFIX + name])  # the rounding is exercised
        assert max_abs_diff(t, original) <= 2**-22, name


@pytest.mark.parametrize("kind", ["dense", "moe"])
@torch.no_grad()
def test_import_reads_the_model_from_the_first_blocks_and_the_head_from_the_tail(checkpoints, kind):
    ckpt, f32 = checkpoints[kind]
    model, _ = load_model(f32, "float32")
    want_model, _ = load_model(ckpt, "float32", with_tokenizer=False)
    assert model.config.num_hidden_layers == N and model.config.mtp_num_hidden_layers == 1
    ids = random_ids(1, 20, seed=3)
    logits, want = model(ids), want_model(ids)
    assert max_abs_diff(logits, want) < 1e-5 and want.std() > 0.5  # lively logits, the same

    head, want_head = load_mtp(f32, model), load_mtp(ckpt, want_model)
    state, want_state = head.state_dict(), want_head.state_dict()
    assert state.keys() == want_state.keys()
    for name in state:  # the norms come back as (1 + w) - 1 in fp32; the rest exactly
        assert max_abs_diff(state[name], want_state[name]) <= (2**-22 if name.endswith(NORMS) else 0), name
    hidden, next_ids = model.model(ids), random_ids(1, 20, seed=4)
    got = model.lm_head(head(model, next_ids, hidden))
    assert max_abs_diff(got, want_model.lm_head(want_head(want_model, next_ids, hidden))) < 1e-5


def test_greedy_speculation_from_the_gguf_is_plain_decoding(checkpoints, capsys):
    _, f32 = checkpoints["dense"]
    model, _ = load_model(f32, "float32")
    prompt = random_ids(1, 13, seed=7)[0].tolist()
    plain = list(generate_tokens(model, prompt, GREEDY, 24))
    speculation = make_speculation(f32, model, 3)
    assert isinstance(speculation.draft, MTPDraft)
    for k in (1, 3):
        draft = Speculation(MTPDraft(model, speculation.draft.head), k)
        assert list(generate_tokens(model, prompt, GREEDY, 24, speculation=draft)) == plain

    argv = ["run", str(f32), "one two three", "--raw", "--temperature", "0", "--max-tokens", "16"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--speculate", "2", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out == want and "speculation: acceptance" in err


def test_without_a_head_the_gguf_has_none(tmp_path):
    """No mtp.* in the checkpoint: no tail block, no nextn key, load_mtp None, and --speculate names the ngram
    draft."""
    write_checkpoint_with_head(tmp_path / "ckpt", TINY_TEXT_CONFIG, "qwen3_5_text", head=False)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "plain.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.fields["qwen35.block_count"].contents() == N
    assert "qwen35.nextn_predict_layers" not in reader.fields
    assert reader.fields["qwen35.attention.recurrent_layers"].contents() == [True, True, True, False]
    assert not any(t.name.startswith(f"blk.{N}.") for t in reader.tensors)
    model, _ = load_model(out, "float32")
    assert load_mtp(out, model) is None
    with pytest.raises(CheckpointError, match="no multi-token-prediction head .* use --draft ngram"):
        make_speculation(out, model, 2)
    assert make_speculation(out, model, 0) is None
    assert isinstance(make_speculation(out, model, 2, "ngram").draft, NgramDraft)


def test_an_incomplete_head_is_not_exported(tmp_path):
    drop = "mtp.pre_fc_norm_hidden.weight"
    write_checkpoint_with_head(tmp_path / "ckpt", TINY_TEXT_CONFIG, "qwen3_5_text", drop=drop)
    with pytest.raises(CheckpointError, match=r"missing tensor mtp\.pre_fc_norm_hidden\.weight"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32", progress=False)
    assert not (tmp_path / "m.gguf").exists()
