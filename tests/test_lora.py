"""LoRA as a module swap: identity at init, merge == base + adapter, and the saved adapter is PEFT's format
(peft.PeftModel.from_pretrained on the transformers model of the same checkpoint gives our logits).

The merge is checked at 1e-5 on a checkpoint drawn at scale 0.05 (logits up to ~2), whose fp32 forward is within
~3e-6 of a float64 one; at helpers' default scale 0.2 (logits up to ~7) fp32 rounding alone moves logits by
2-3e-5, so a 1e-5 bound there would measure rounding, not the merge."""

import json

import pytest
import torch
from safetensors import safe_open

from qwenlite.cli.main import main
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import load_checkpoint, save_checkpoint
from qwenlite.train.common import TrainSettings
from qwenlite.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_modules,
    merge_lora,
    save_adapter,
)
from qwenlite.train.posttrain import LoRASettings, is_language_model_layout
from qwenlite.train.sft import train_sft

from helpers import make_hf_checkpoint, max_abs_diff, random_ids, reference_logits
from tiny_chat import make_chat_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")  # every test builds its checkpoint with transformers

IDS = random_ids(2, 40, seed=3)
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Two plus two is four."}]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris.", "reasoning_content": "The capital of France is Paris."}]},
]  # fmt: skip


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids)


def base_model(path):
    return load_checkpoint(path, dtype="float32").model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained by `train_sft` (so B != 0) on the tiny chat checkpoint, merged copy included."""
    root = tmp_path_factory.mktemp("lora")
    make_chat_checkpoint(root / "base", scale=0.05)
    data = write_jsonl(root / "chat.jsonl", CONVERSATIONS)
    settings = TrainSettings(lr=1e-2, max_steps=6, batch_size=2, log_every=100)
    train_sft(
        root / "base", data, root / "adapter", settings, LoRASettings(r=4, alpha=8, merge=True), log=lambda r: None
    )
    return root


def test_lora_at_init_equals_base(tmp_path):
    make_hf_checkpoint(tmp_path)
    model = base_model(tmp_path)
    before = logits(model)
    paths = apply_lora(model, r=4)
    # 3 linear-attention layers x (in_proj_qkv, in_proj_z, out_proj, gate, up, down) + 1 attention layer x 7
    assert len(paths) == 3 * 6 + 7
    assert all(isinstance(model.get_submodule(p), LoRALinear) for p in paths)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert torch.equal(logits(model), before)  # B = 0: exactly the base


def test_lora_targets_are_checked(tmp_path):
    make_hf_checkpoint(tmp_path)
    model = base_model(tmp_path)
    with pytest.raises(QwenliteError, match="q_prj"):
        apply_lora(model, r=2, targets=["q_proj", "q_prj"])
    apply_lora(model, r=2, targets=["model.layers.3.self_attn.q_proj"])  # a full path selects one layer
    assert list(lora_modules(model)) == ["model.layers.3.self_attn.q_proj"]
    with pytest.raises(QwenliteError, match="already"):
        apply_lora(model, r=2)


def test_merged_equals_base_plus_adapter(trained):
    model = base_model(trained / "base")
    base = logits(model)
    load_adapter(model, trained / "adapter")
    adapted = logits(model)
    assert max_abs_diff(adapted, base) > 1e-2  # the adapter learned something, so the checks below mean something
    with lora_disabled(model):
        assert torch.equal(logits(model), base)
    merge_lora(model)
    assert not lora_modules(model)
    assert max_abs_diff(logits(model), adapted) < 1e-5
    # The merged checkpoint train_sft wrote (--merge) is the same model.
    assert max_abs_diff(logits(base_model(trained / "adapter" / "merged")), adapted) < 1e-5


def test_merging_into_a_tied_head_unties_it(tmp_path):
    """A LoRA on lm_head of a model whose head is its embedding: the merge changes the head alone (the embedding,
    and so every input, stays the base's), the config says the head is untied, and the saved checkpoint is the
    adapted model."""
    make_hf_checkpoint(tmp_path / "base", tied=True, scale=0.05)
    model = base_model(tmp_path / "base")
    assert model.config.tie_word_embeddings
    embedding = model.model.embed_tokens.weight.detach().clone()
    apply_lora(model, r=2, targets=["lm_head"])
    with torch.no_grad():
        lora_modules(model)["lm_head"].lora_B.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    adapted = logits(model)
    merge_lora(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert max_abs_diff(logits(model), adapted) < 1e-5
    save_checkpoint(model, tmp_path / "merged")
    assert max_abs_diff(logits(base_model(tmp_path / "merged")), adapted) < 1e-5


def test_adapter_loads_in_peft(trained):
    peft = pytest.importorskip("peft")
    config = json.loads((trained / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    ours = base_model(trained / "base")
    load_adapter(ours, trained / "adapter")

    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(trained / "base", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, trained / "adapter").eval()
    adapted = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(adapted) == len(lora_modules(ours))
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted)  # every adapter's weights were read
    assert max_abs_diff(reference_logits(peft_model, IDS), logits(ours)) < 1e-4


def test_adapter_for_the_published_layout(tmp_path):
    """Official checkpoints are Qwen3_5ForConditionalGeneration (text under model.language_model): the adapter
    names those modules, so PEFT applies it to the model that checkpoint loads as."""
    peft = pytest.importorskip("peft")
    hf = make_hf_checkpoint(tmp_path / "base", layout="conditional_generation")
    assert is_language_model_layout(tmp_path / "base")
    ours = base_model(tmp_path / "base")
    apply_lora(ours, r=2, targets=["q_proj", "in_proj_qkv", "down_proj"])
    gen = torch.Generator().manual_seed(0)
    for m in lora_modules(ours).values():
        m.lora_B.weight.data.normal_(0, 0.2, generator=gen)
    save_adapter(ours, tmp_path / "adapter", "base", language_model_prefix=True)
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS, "pt") as f:
        assert all(k.startswith("base_model.model.model.language_model.layers.") for k in f.keys())
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert max_abs_diff(reference_logits(peft_model, IDS), logits(ours)) < 1e-4
    # and it reads back into our flat model
    again = base_model(tmp_path / "base")
    load_adapter(again, tmp_path / "adapter")
    assert max_abs_diff(logits(again), logits(ours)) < 1e-6


def test_bad_adapter_errors(tmp_path, trained):
    model = base_model(trained / "base")
    with pytest.raises(QwenliteError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path)
    with pytest.raises(QwenliteError, match="no LoRA adapters"):
        save_adapter(model, tmp_path)


def test_merge_lora_command(trained, tmp_path):
    argv = ["train", "merge-lora", "--model", str(trained / "base"), "--adapter", str(trained / "adapter"),
            "--out", str(tmp_path / "merged")]  # fmt: skip
    assert main(argv) == 0
    merged = logits(base_model(tmp_path / "merged"))
    assert max_abs_diff(merged, logits(base_model(trained / "adapter" / "merged"))) < 1e-6
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
