"""Small corpora, a small trained tokenizer and a small model config for the training tests.

Import as `from train_helpers import ...` (tests/ is on sys.path, see helpers.py)."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch

from qwenlite.config import ModelConfig
from qwenlite.train.pretrain import TrainConfig

NOUNS = "cat dog bird fish horse cow owl fox".split()
VERBS = "sees likes chases eats finds hears".split()
TOKENIZER_VOCAB = 320  # 256 bytes + 31 merges + 33 special tokens


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}." for _ in range(n))


def write_jsonl_corpus(path: Path, documents: int = 200, seed: int = 0) -> Path:
    """A corpus a tiny model learns in a few dozen steps: short documents from a small grammar."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": sentences(rng, rng.randint(2, 8))}) + "\n")
    return path


def small_config(vocab_size: int = TOKENIZER_VOCAB, **overrides) -> ModelConfig:
    """hidden 64, 4 layers (3 linear-attention : 1 full), more value heads than key heads as 4B/9B."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, mtp_num_hidden_layers=0, dtype="float32", max_position_embeddings=1024,
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def small_train_config(**overrides) -> TrainConfig:
    fields = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, val_fraction=0.1, eval_every=4,
                  eval_sequences=8, save_every=4, log_every=1)  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def model_state(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model.safetensors"))


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count n inside, the one before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def single_threaded():
    """Models this small train as fast on one thread as on two, and one thread is not stalled when a neighbour
    holds the other core (two spinning OpenMP threads on a shared core can run 10x slower)."""
    return torch_threads(1)
