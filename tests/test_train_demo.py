"""The demo recipe end to end at a toy size (the real one takes 30 minutes and is run by hand)."""

from __future__ import annotations

import json
import math

import pytest

from qwenlite.train.demo import QUICK, DemoSettings, docstring_questions, run_demo
from qwenlite.train.pretrain import TrainConfig

from train_helpers import single_threaded


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_threaded():
        yield


def test_docstring_questions_are_chat_conversations():
    source = 'def public(x):\n    """Return x twice,\n    as a list.\n\n    More."""\n\ndef _f():\n    """Hidden."""\n'
    assert docstring_questions("mod", source) == [
        {
            "messages": [
                {"role": "user", "content": "What does `mod.public` do?"},
                {"role": "assistant", "content": "Return x twice, as a list."},
            ]
        }
    ]


def test_demo_runs_every_stage(tmp_path):
    settings = DemoSettings(
        corpus_bytes=120_000,
        vocab_size=512,
        model=QUICK.model,
        train=TrainConfig(steps=12, batch_size=4, seq_len=64, lr=3e-3, warmup=2, eval_every=6, save_every=6, mtp=True),
        sft_steps=3,
        sample_tokens=8,
    )
    report = run_demo(tmp_path, settings=settings)
    assert report["steps"] == 12 and report["held_out_loss"] < report["unigram_loss"] + 2
    # An untrained model scores about ln(512) = 6.24 (measured 6.21); these 12 steps reach about 5.46.
    assert report["held_out_loss"] < math.log(settings.vocab_size) - 0.5
    assert len(report["samples"]) == 4 and len(report["sft_losses"]) == 3 and report["chat"]
    text = (tmp_path / "report.md").read_text()
    assert "PSF License" in text and "Held-back questions" in text
    # Trained with its MTP head: speculative decoding with it gives plain decoding's tokens (speed needs a real run).
    speculation = report["speculation"]
    assert speculation["identical"] and speculation["speculative_tokens_per_s"] > 0 and "--speculate 2" in text
    first = json.loads((tmp_path / "corpus" / "chat.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png"):
        assert (tmp_path / "model" / name).is_file()
    assert (tmp_path / "chat" / "model.safetensors").is_file()
