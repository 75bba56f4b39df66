"""The training commands on the families beside Qwen3.5: Qwen3.5 MoE (`qwen3_5_moe_text`, its checkpoint with one
tensor per expert and with transformers' fused experts), Qwen3 and Qwen2, against transformers' classes.

Per family: SFT's first logged loss is transformers' loss on the same batch (fp32, within 1e-4; observed ~1e-6),
three steps lower it, and the checkpoint it writes loads in transformers with qwenlite's logits (within 1e-4); a
LoRA adapter trained on it applies as PEFT applies it to transformers' model (within 1e-4), and the server's per-row
adapters read it. For the MoE the objective includes the router's load-balancing loss where the config sets
`output_router_logits` (train/moe.py), weighted by `router_aux_loss_coef`, as transformers' `loss`: the fused
checkpoint sets it (with a coefficient of 0.1, so that leaving the term out would show), the per-expert one keeps
transformers' default (off). DPO, pretraining and `train mtp` run the same code on every family: one check each on
the MoE, and the paths not built refuse with one line.

Checkpoints: test_moe.py's and test_families.py's tiny builders, on the tiny chat tokenizer's 512-row vocabulary."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from test_families import make_hf_dense
from test_moe import make_hf_moe

from qwenlite.errors import QwenliteError
from qwenlite.io.adapters import load_adapters
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train import pretrain as pretrain_module
from qwenlite.train.common import TrainSettings
from qwenlite.train.dpo import train_dpo
from qwenlite.train.lora import ADAPTER_WEIGHTS, apply_lora, load_adapter
from qwenlite.train.moe import padding_mask
from qwenlite.train.mtp import train_mtp
from qwenlite.train.posttrain import LoRASettings, epoch_order, pad_batch, pad_token_id
from qwenlite.train.pretrain import TrainConfig, pretrain, resolve_model_config, training_loss
from qwenlite.train.sft import load_sft_data, train_sft

from helpers import max_abs_diff, random_ids
from tiny_chat import write_jsonl, write_tiny_tokenizer
from train_helpers import read_log, single_threaded, small_train_config, write_jsonl_corpus

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
AUX_COEF = 0.1
FAMILIES = ("moe-per-expert", "moe-fused", "qwen3", "qwen2")
LORA_FAMILIES = FAMILIES[1:]  # the two layouts load to the same modules: one adapter says it for both
LAYER_TYPES = ["linear_attention", "full_attention"]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Two plus two is four. Three plus three is six."}]},
    {"messages": [{"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
]  # fmt: skip
SETTINGS = TrainSettings(lr=1e-3, max_steps=3, batch_size=2, log_every=100)  # both conversations, padded, per step
QUIET = dict(log=lambda record: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (transformers model, checkpoint dir with the tiny chat tokenizer), and the conversations' file."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        if family.startswith("moe"):
            aux = dict(output_router_logits=True, router_aux_loss_coef=AUX_COEF) if family == "moe-fused" else {}
            hf = make_hf_moe(vocab_size=512, num_hidden_layers=2, layer_types=LAYER_TYPES, **aux)
        else:
            hf = make_hf_dense(family, vocab_size=512, num_hidden_layers=2)
        hf.save_pretrained(root / family, save_original_format=family == "moe-per-expert")
        write_tiny_tokenizer(root / family)
        out[family] = (hf, root / family)
    return out, write_jsonl(root / "chat.jsonl", CONVERSATIONS)


def first_batch(base, data) -> dict:
    """SFT's first step's batch, as transformers' forward takes it: ids, the padding mask, labels."""
    tokenizer = Tokenizer.from_dir(base)
    examples = load_sft_data(data, tokenizer, SETTINGS.max_len)
    rows = [examples[i] for i in epoch_order(len(examples), SETTINGS.batch_size, SETTINGS.seed)]
    ids, labels = pad_batch([(ex.ids, ex.labels) for ex in rows], pad_token_id(tokenizer))
    mask = padding_mask([len(ex.ids) for ex in rows], ids.shape[1])
    return dict(input_ids=ids, attention_mask=mask.long(), labels=labels)


@pytest.fixture(scope="module")
def sft_runs(bases, tmp_path_factory):
    """family -> (full fine-tuning's log, its output dir, the LoRA run's output dir)."""
    checkpoints, data = bases
    root = tmp_path_factory.mktemp("sft")
    out = {}
    for family, (_, base) in checkpoints.items():
        history = train_sft(base, data, root / family, SETTINGS, **QUIET)
        if family in LORA_FAMILIES:
            lora = TrainSettings(lr=1e-2, max_steps=2, batch_size=2, log_every=100)
            train_sft(base, data, root / f"{family}-lora", lora, LoRASettings(r=2), **QUIET)
        out[family] = history, root / family, root / f"{family}-lora"
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_is_transformers_and_falls(bases, sft_runs, family):
    (hf, base), data = bases[0][family], bases[1]
    history, _, _ = sft_runs[family]
    with torch.no_grad():
        theirs = hf(**first_batch(base, data))
    ours = history[0]["loss"]
    if family == "moe-fused":  # the objective: cross-entropy + coefficient x load-balancing loss
        assert abs(history[0]["aux_loss"] - theirs.aux_loss.item()) < ATOL
        ours += AUX_COEF * history[0]["aux_loss"]
        assert AUX_COEF * history[0]["aux_loss"] > 10 * ATOL  # the term is there to be seen
    else:
        assert "aux_loss" not in history[0]
    assert abs(ours - theirs.loss.item()) < ATOL
    assert history[-1]["loss"] < history[0]["loss"] - 0.5


def test_both_expert_layouts_train_alike(sft_runs):
    """Same weights, so the same cross-entropy; the load-balancing loss changes only what is minimised."""
    (per_expert, *_), (fused, *_) = sft_runs["moe-per-expert"], sft_runs["moe-fused"]
    assert abs(per_expert[0]["loss"] - fused[0]["loss"]) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_result_loads_in_transformers(sft_runs, family):
    _, out, _ = sft_runs[family]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_checkpoint(out, "float32").model
    ids = random_ids(2, 17, vocab=512)
    with torch.no_grad():
        assert max_abs_diff(theirs(ids).logits, ours(ids)) < ATOL
    assert theirs.config.model_type == ours.config.model_type
    if family == "moe-fused":  # the training settings travel with the checkpoint
        assert (theirs.config.output_router_logits, theirs.config.router_aux_loss_coef) == (True, AUX_COEF)


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_lora_adapter_applies_in_peft_and_the_server(bases, sft_runs, family):
    """The adapter adapts attention (and a MoE's shared expert), never a routed expert or a router; PEFT applies it
    to transformers' model as qwenlite does, and per-row serving reads it."""
    peft = pytest.importorskip("peft")
    hf, base = bases[0][family]
    _, _, adapter = sft_runs[family]
    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:
        keys = list(f.keys())
    assert not any(".mlp.experts." in k or ".mlp.gate." in k for k in keys)
    assert any(".self_attn.q_proj." in k for k in keys)
    if family.startswith("moe"):
        assert any(".mlp.shared_expert.down_proj." in k for k in keys)
    ids = random_ids(2, 11, vocab=512)
    ours = load_checkpoint(base, "float32").model
    with torch.no_grad():
        plain = ours(ids)
        load_adapter(ours, adapter)
        adapted = ours(ids)
    assert max_abs_diff(adapted, plain) > 1e-3  # the adapter learned something
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        assert max_abs_diff(theirs(ids).logits, adapted) < ATOL
    theirs.unload()  # the fixture's model, as it was
    served = load_checkpoint(base, "float32").model
    selection = load_adapters(served, [("ft", adapter)])
    with torch.no_grad(), selection.selected([1, 0]):
        rows = served(ids)
    assert max_abs_diff(rows[0], adapted[0]) < ATOL and max_abs_diff(rows[1], plain[1]) < ATOL


def test_lora_refuses_routed_experts(bases):
    model = load_checkpoint(bases[0]["moe-fused"][1], "float32").model
    with pytest.raises(QwenliteError, match="'model.layers.0.mlp.experts.2.up_proj' matches only routed experts"):
        apply_lora(model, 2, targets=["q_proj", "model.layers.0.mlp.experts.2.up_proj"])
    with pytest.raises(QwenliteError, match="LoRA target 'gate' matches no linear layer"):
        apply_lora(model, 2, targets=["gate"])  # the router


def test_dpo_on_a_moe(bases, tmp_path):
    """LoRA DPO with the load-balancing loss: log 2 at the start, the pairs then preferred."""
    _, base = bases[0]["moe-fused"]
    pairs = [{"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
             {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London."}]  # fmt: skip
    settings = TrainSettings(lr=2e-2, max_steps=3, batch_size=2, log_every=100)
    history = train_dpo(base, write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "out", settings,
                        LoRASettings(r=2), **QUIET)  # fmt: skip
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6 and history[0]["aux_loss"] > 0
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["reward_margin"] > 0


@pytest.mark.parametrize("family", ["moe-fused", "qwen2"])
def test_pretraining(bases, tmp_path, monkeypatch, family):
    """Pretraining's objective is transformers' loss on the same batch (the MoE's with the load-balancing loss); from
    the checkpoint's config.json, the loss falls and OUT loads in transformers."""
    hf, base = bases[0][family]
    batch = random_ids(2, 13, vocab=512)
    model = load_checkpoint(base, "float32").model.train()
    objective, parts = training_loss(model, batch, TrainConfig(), model)
    with torch.no_grad():
        theirs = hf(input_ids=batch[:, :-1], labels=batch[:, :-1], shift_labels=batch[:, 1:].contiguous())
    assert abs(objective.item() - theirs.loss.item()) < ATOL
    assert ("aux_loss" in parts) == (family == "moe-fused")
    config = resolve_model_config(base, Tokenizer.from_dir(base).vocab_size)
    corpus = write_jsonl_corpus(tmp_path / "corpus.jsonl", documents=20)
    monkeypatch.setattr(pretrain_module, "plot_loss_curve", lambda log, png: None)  # drawing is not what is tested
    cfg = small_train_config(steps=3, batch_size=2, seq_len=16, eval_every=100, save_every=100, lr=1e-2)
    pretrain(config, [corpus], tmp_path / "out", base, cfg)
    log = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(1, 9, vocab=512)
    with torch.no_grad():
        assert max_abs_diff(theirs(ids).logits, load_checkpoint(tmp_path / "out", "float32").model(ids)) < ATOL


def test_mtp_head_fits_a_moe(bases, tmp_path):
    (_, base), data = bases[0]["moe-per-expert"], bases[1]
    settings = TrainSettings(lr=1e-2, max_steps=3, batch_size=2, log_every=100)
    history = train_mtp(base, data, tmp_path / "out", settings, init="random", **QUIET)
    assert history[-1]["kl"] < history[0]["kl"]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "mtp.layers.0.mlp.experts.4.down_proj.weight" in f.keys()  # the head's layer is a MoE layer too


def test_paths_not_built_refuse(bases, tmp_path):
    (qwen3, moe), data = (bases[0][f][1] for f in ("qwen3", "moe-fused")), bases[1]
    with pytest.raises(QwenliteError, match="a qwen3 model has no multi-token-prediction head"):
        train_mtp(qwen3, data, tmp_path / "out", **QUIET)
    with pytest.raises(QwenliteError, match="a qwen3 model has no multi-token-prediction head"):
        TrainConfig(mtp=True).validate(resolve_model_config(qwen3, 480))
    with pytest.raises(QwenliteError, match="--fsdp is not built for a mixture of experts"):
        TrainConfig(fsdp=True).validate(resolve_model_config(moe, 480))
