"""Shared fixtures. Built once per session (per pytest-xdist worker): the real Qwen3.5 tokenizer files are ~33 MB."""

import os

import pytest
import torch

from qwenlite.config import ModelConfig
from qwenlite.io.checkpoint import save_checkpoint
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import write_tokenizer_files

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (pyproject's addopts): one torch thread each, since two spinning OpenMP threads on a core
    # shared with the other worker can run 10x slower. What tests the kernels' split over threads asks for its own
    # (the `threads` fixture).
    torch.set_num_threads(1)


@pytest.fixture
def threads():
    """Two torch threads for the test (the C kernels' split of the work over threads), one again after it."""
    from train_helpers import torch_threads

    with torch_threads(2) as n:
        yield n


@pytest.fixture(autouse=True)
def speculation_decisions(tmp_path_factory, monkeypatch):
    """What `bench --speculate` records (run's measured default) goes to a file of each test's own, not the user's."""
    from qwenlite import speculative

    path = tmp_path_factory.mktemp("decisions") / "speculation.json"
    monkeypatch.setattr(speculative, "decisions_path", lambda: path)
    return path


@pytest.fixture(scope="session")
def qwen35_tokenizer_dir(tmp_path_factory):
    """A directory holding tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen3.5."""
    path = tmp_path_factory.mktemp("qwen35_tokenizer")
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="session")
def qwen35_tokenizer(qwen35_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen35_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen36_tokenizer_dir(qwen35_tokenizer_dir, tmp_path_factory):
    """The same tokenizer files with a Qwen3.6-style chat template (helpers.qwen36_style_template)."""
    from helpers import qwen36_style_template

    path = tmp_path_factory.mktemp("qwen36_tokenizer")
    for file in qwen35_tokenizer_dir.iterdir():
        (path / file.name).symlink_to(file)
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.jinja").write_text(qwen36_style_template())
    return path


# A model with real predictions, for the accuracy cost of quantization (test_quant.py, test_kernels.py)


def markov_batch(successors: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Token sequences from a chain where each token has 3 successors, with probabilities 0.7 / 0.2 / 0.1."""
    probs = torch.tensor([0.7, 0.2, 0.1])
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, 256, (batch,), generator=gen)
    choice = torch.multinomial(probs, batch * length, replacement=True, generator=gen).view(batch, length)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], choice[:, t]]
    return x


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny Qwen3.5 (hidden 128, vocab 512, tied) trained ~40 AdamW steps on a Markov chain, saved with the tiny
    tokenizer; returns (checkpoint dir, held-out token ids)."""
    c = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=32, linear_value_head_dim=32, mtp_num_hidden_layers=0, dtype="float32",
                    max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    model = Qwen3_5ForCausalLM(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), gen))
    successors = torch.randint(0, 256, (c.vocab_size, 3), generator=gen)  # the chain visits 256 of the 512 ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        x = markov_batch(successors, 16, 40, gen)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.4  # from 6.2; the chain's entropy is 0.80
    from tiny_chat import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("trained") / "ckpt"
    save_checkpoint(model.eval(), path)
    write_tiny_tokenizer(path)
    return path, markov_batch(successors, 4, 64, gen)


@pytest.fixture(scope="session")
def multimodal_checkpoint(tmp_path_factory, qwen35_tokenizer_dir):
    """(transformers model, directory) of helpers.make_multimodal_checkpoint, built once; tests leave it as it is."""
    from helpers import make_multimodal_checkpoint

    path = tmp_path_factory.mktemp("multimodal")
    return make_multimodal_checkpoint(path, qwen35_tokenizer_dir), path
