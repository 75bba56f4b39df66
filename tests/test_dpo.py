"""DPO: at step 0 the policy is the reference, so the loss is log 2; it falls and the chosen reward margin rises,
with full weights and with LoRA (reference = adapters disabled); bad pairs fail naming file and line."""

import math

import pytest
import torch

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train.common import TrainSettings
from qwenlite.train.dpo import dpo_loss, load_dpo_data, train_dpo
from qwenlite.train.posttrain import IGNORE, LoRASettings

from tiny_chat import make_chat_checkpoint, write_jsonl

PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
    {"prompt": [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Capital of France?"}],
     "chosen": {"role": "assistant", "content": "Paris.", "reasoning_content": "The capital of France is Paris."},
     "rejected": {"role": "assistant", "content": "London.", "reasoning_content": "Not sure."}},
    {"prompt": "What is three plus three?", "chosen": "Six.", "rejected": "Three plus three is five."},
    {"prompt": "Weather in Paris?",
     "chosen": [{"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."}],
     "rejected": "I cannot know the weather."},
]  # fmt: skip


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    make_chat_checkpoint(root / "base")
    return root / "base", write_jsonl(root / "prefs.jsonl", PAIRS)


def test_dpo_loss_of_equal_policies_is_log2():
    x = torch.tensor([-3.0, -10.0])
    loss, chosen, rejected = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.allclose(loss, torch.full((2,), math.log(2)))
    assert torch.equal(chosen, torch.zeros(2)) and torch.equal(rejected, torch.zeros(2))


def test_dpo_loss_at_a_nonzero_margin():
    pc, pr = torch.tensor([-3.0, -8.0]), torch.tensor([-5.0, -4.0])  # policy log-probs: chosen, rejected
    rc, rr = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -5.0])  # reference log-probs
    beta = 0.3
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    # margins (pc - rc) - (pr - rr) = 1.5 and -3: -log sigmoid(beta * margin) = log(1 + exp(-beta * margin))
    expected = [math.log1p(math.exp(-beta * 1.5)), math.log1p(math.exp(-beta * -3.0))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.3, -0.6]) and rejected.tolist() == pytest.approx([-0.15, 0.3])


def test_pairs_share_the_prompt_and_train_only_the_completion(prefs):
    base, data = prefs
    tok = Tokenizer.from_dir(base)
    pairs = load_dpo_data(data, tok, 4096)
    for p in pairs:
        c, r = p.chosen, p.rejected
        start = next(i for i, x in enumerate(c.labels) if x != IGNORE)
        assert start == next(i for i, x in enumerate(r.labels) if x != IGNORE)
        assert c.ids[:start] == r.ids[:start]  # the same rendered prompt and header, which are not trained
        assert tok.decode(c.ids[:start]).endswith("<|im_start|>assistant\n")
    # the tool-using answer trains both assistant turns and not the tool turn between them
    trained = tok.decode([x for x in pairs[3].chosen.labels if x != IGNORE])
    assert "<tool_call>" in trained and "It is sunny." in trained and "sunny\n</tool_response>" not in trained


@pytest.mark.parametrize("lora", [None, LoRASettings(r=4)], ids=["full", "lora"])
def test_dpo_starts_at_log2_and_learns_the_preference(prefs, tmp_path, lora):
    base, data = prefs
    lr = 1e-3 if lora is None else 1e-2
    settings = TrainSettings(lr=lr, max_steps=16, batch_size=2, log_every=100)
    history = train_dpo(base, data, tmp_path / "out", settings, lora, beta=0.5, log=lambda r: None)
    first, last = history[0], history[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before the first update
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert last["loss"] < 0.5 * math.log(2), [h["loss"] for h in history]
    assert last["reward_margin"] > 0.5 and last["accuracy"] == 1.0
    assert (tmp_path / "out" / ("adapter_config.json" if lora else "config.json")).is_file()


BAD = {
    'missing "chosen"': {"prompt": "hi", "rejected": "no"},
    '"rejected" has no assistant turn': {
        "prompt": "hi",
        "chosen": "yes",
        "rejected": [{"role": "user", "content": "?"}],
    },
    '"prompt" must be a string, a message or a non-empty list': {"prompt": [], "chosen": "a", "rejected": "b"},
}


@pytest.mark.parametrize("problem", BAD)
def test_bad_pairs_name_file_and_line(prefs, tmp_path, problem):
    base, _ = prefs
    data = write_jsonl(tmp_path / "prefs.jsonl", [PAIRS[0], BAD[problem]])
    with pytest.raises(QwenliteError, match=f"prefs.jsonl:2: {problem}"):
        train_dpo(base, data, tmp_path / "out", TrainSettings(max_steps=1))
    assert not (tmp_path / "out").exists()
