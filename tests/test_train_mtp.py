"""`qwenlite train mtp`: the head fitted by self-distillation drafts what the model says. On a model that has
learned a Markov chain (its next token depends on the current one, so the token after next is learnable from what
the head sees), a new head's drafts are accepted rarely; once fitted, speculative decoding with it accepts most
drafts and its greedy output stays plain decoding's. The command writes the checkpoint with the new `mtp.*` tensors
and the model's own weights unchanged."""

from __future__ import annotations

import pytest
import torch
from test_train_sft import CHATS

from qwenlite.cli.main import main as cli_main
from qwenlite.generate import GenerationStats, generate_tokens
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.load import load_mtp
from qwenlite.model.qwen3_5 import initial_value
from qwenlite.sample import SamplingParams
from qwenlite.speculative import MTPDraft, Speculation
from qwenlite.train.common import TrainSettings
from qwenlite.train.mtp import distillation_loss, fit_head, new_head

from helpers import make_hf_checkpoint, markov_ids, random_ids, train_on_markov_chain
from tiny_chat import make_chat_checkpoint, write_jsonl

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def markov_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("markov")
    make_hf_checkpoint(path)
    model = load_checkpoint(path, dtype="float32").model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the documented initialisation trains faster than the checkpoint's lively weights
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), gen, model.config.zero_centred_norms))
    successors, loss = train_on_markov_chain(model, gen)
    assert loss < 1.6, loss
    return model.eval().requires_grad_(False), successors


def speculative_run(model, head, prompt: list[int]) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    with torch.inference_mode():
        ids = list(
            generate_tokens(model, prompt, GREEDY, 40, stats=stats, speculation=Speculation(MTPDraft(model, head), 3))
        )
    return ids, stats


def test_a_fitted_head_drafts_what_the_model_says(markov_model):
    model, successors = markov_model
    gen = torch.Generator().manual_seed(1)
    held_out = markov_ids(successors, 8, 40, gen)
    every = torch.ones_like(held_out, dtype=torch.bool)
    head = new_head(model, seed=0)
    with torch.no_grad():
        before, fields_before = distillation_loss(model, head, held_out, every)
    prompt = held_out[0, :8].tolist()
    plain = list(generate_tokens(model, prompt, GREEDY, 40))
    ids, stats_before = speculative_run(model, head, prompt)
    assert ids == plain

    sequences = [(row.tolist(), [True] * len(row)) for row in markov_ids(successors, 64, 40, gen)]
    settings = TrainSettings(lr=3e-3, max_steps=60, batch_size=8, warmup_steps=5, log_every=1000)
    history = fit_head(model, head, sequences, settings, pad_id=0, log=lambda r: None)
    assert len(history) == 60 and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        after, fields_after = distillation_loss(model, head, held_out, every)
    assert after < 0.2 * before, (before.item(), after.item())
    assert fields_after["agreement"] > 0.9 > fields_before["agreement"] + 0.5, (fields_before, fields_after)

    ids, stats_after = speculative_run(model, head, prompt)
    assert ids == plain  # exact: speculation never changes greedy output
    assert stats_after.acceptance_rate > 0.8 > stats_before.acceptance_rate + 0.5, (stats_before, stats_after)


def test_train_mtp_writes_the_checkpoint_with_a_new_head(tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    make_chat_checkpoint(base)
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    assert load_mtp(base, load_checkpoint(base).model) is None  # no head to start from: a new one
    argv = ["train", "mtp", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--generate", "6", "--log-every", "100"]  # fmt: skip
    assert cli_main(argv) == 0
    model = load_checkpoint(out, dtype="float32").model
    head = load_mtp(out, model)
    assert head is not None
    fresh = new_head(model, seed=0)
    assert not torch.equal(head.fc.weight, fresh.fc.weight)  # trained from the documented initialisation
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(model(ids), load_checkpoint(base, dtype="float32").model(ids))  # the model untouched
    assert (out / "chat_template.jinja").is_file()


def test_bad_input_is_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    make_chat_checkpoint(base)
    missing = [
        "train",
        "mtp",
        "--model",
        str(base),
        "--data",
        str(tmp_path / "none.jsonl"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(missing) != 0
    assert "none.jsonl" in capsys.readouterr().err
    negative = [
        *missing[:5],
        str(write_jsonl(tmp_path / "c.jsonl", CHATS)),
        "--out",
        str(tmp_path / "o"),
        "--generate",
        "-1",
    ]
    assert cli_main(negative) != 0
    assert "--generate must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
