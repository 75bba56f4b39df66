"""Generation: greedy parity with transformers' `generate`, and the text layer (reasoning apart from the
answer, stop strings, finish reasons, UTF-8 safety) driven by a scripted model on the real vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenlite.config import preset_config
from qwenlite.errors import QwenliteError
from qwenlite.generate import GenerationStats, generate, generate_tokens, stream
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.sample import SamplingParams

from helpers import make_hf_checkpoint, random_ids

GREEDY = SamplingParams(temperature=0)


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_matches_transformers_generate(tmp_path, tied):
    hf = make_hf_checkpoint(tmp_path, tied=tied)
    model = load_checkpoint(tmp_path, dtype="float32").model
    prompt = random_ids(1, 23, seed=3)
    expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, prompt.shape[1] :]
    got = list(generate_tokens(model, prompt[0].tolist(), GREEDY, max_tokens=40))
    assert got == expected.tolist()
    assert len(set(got)) > 3  # a non-degenerate continuation, so the comparison means something


class ScriptedModel(nn.Module):
    """Stands in for the network: after the prompt it emits `script` token by token, then <|im_end|>."""

    def __init__(self, script: list[int], prompt_len: int, eos: int = 248046):
        super().__init__()
        self.config = preset_config("tiny")
        self.dtype, self.device = torch.float32, torch.device("cpu")  # what generation and the engine ask
        self.script, self.prompt_len, self.eos = script, prompt_len, eos

    def forward(self, ids, cache, logits_to_keep=0):
        cache.lengths += ids.shape[1]
        i = int(cache.lengths[0]) - self.prompt_len
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.script[i] if i < len(self.script) else self.eos] = 10.0
        return logits


def scripted_stream(tok, prompt: str, pieces: list, **kwargs):
    """`pieces` are strings (encoded) or token ids; returns (answer, reasoning, chunks)."""
    script = []
    for p in pieces:
        script += tok.encode(p) if isinstance(p, str) else [p]
    prompt_ids = tok.encode(prompt)
    chunks = list(stream(ScriptedModel(script, len(prompt_ids)), tok, prompt_ids, GREEDY, **kwargs))
    return "".join(c.text for c in chunks), "".join(c.reasoning for c in chunks), chunks


THINK, END_THINK = 248068, 248069


def test_reasoning_is_separated_when_the_prompt_opens_a_think_block(qwen35_tokenizer):
    prompt = qwen35_tokenizer.apply_chat_template([{"role": "user", "content": "6*7?"}], enable_thinking=True)
    answer, reasoning, chunks = scripted_stream(
        qwen35_tokenizer, prompt, ["Six times seven.\n", END_THINK, "\n\nThe answer is 42."]
    )
    assert reasoning == "Six times seven."
    assert answer == "The answer is 42."
    assert chunks[-1].finish_reason == "stop"
    assert all(not (c.text and c.reasoning) for c in chunks)


def test_no_reasoning_when_thinking_is_off(qwen35_tokenizer):
    prompt = qwen35_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    answer, reasoning, _ = scripted_stream(qwen35_tokenizer, prompt, ["Hello! How can I help?"])
    assert (answer, reasoning) == ("Hello! How can I help?", "")


def test_a_think_block_the_model_opens_itself(qwen35_tokenizer):
    answer, reasoning, _ = scripted_stream(
        qwen35_tokenizer, "<|im_start|>assistant\n", [THINK, "\nhmm\n", END_THINK, "\n\nok"]
    )
    assert (answer, reasoning) == ("ok", "hmm")


def test_stop_string_split_across_tokens(qwen35_tokenizer):
    answer, _, chunks = scripted_stream(
        qwen35_tokenizer, "x", ["Hello world, ", "ST", "OP", " never shown"], stop=["STOP"]
    )
    assert answer == "Hello world, "
    assert chunks[-1].finish_reason == "stop"


def test_text_that_only_looks_like_a_stop_string_is_released(qwen35_tokenizer):
    answer, _, chunks = scripted_stream(qwen35_tokenizer, "x", ["a STO", "P? no: STOCK"], stop=["STOPPED"])
    assert answer == "a STOP? no: STOCK"
    assert chunks[-1].finish_reason == "stop"  # ended by <|im_end|>


def test_max_tokens_gives_finish_reason_length(qwen35_tokenizer):
    prompt_ids = qwen35_tokenizer.encode("x")
    script = qwen35_tokenizer.encode(" one two three four five six seven")
    chunks = list(stream(ScriptedModel(script, 1), qwen35_tokenizer, prompt_ids, GREEDY, max_tokens=4))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].stats.generated_tokens == 4
    assert "".join(c.text for c in chunks) == qwen35_tokenizer.decode(script[:4])


def test_multibyte_text_is_never_broken(qwen35_tokenizer):
    text = "喵星人🐈‍⬛ café naïve 😀👍🏽 ok"
    answer, _, chunks = scripted_stream(qwen35_tokenizer, "x", [text])
    assert answer == text
    assert not any("\ufffd" in c.text for c in chunks)


def test_prompt_longer_than_context_is_a_clear_error(qwen35_tokenizer):
    ids = qwen35_tokenizer.encode("word " * 40)
    model = ScriptedModel([], len(ids))
    with pytest.raises(QwenliteError, match="longer than the context"):
        list(generate_tokens(model, ids, GREEDY, max_tokens=5, max_context=16))


def test_stats_are_filled(qwen35_tokenizer):
    ids = qwen35_tokenizer.encode("x")
    stats = GenerationStats()
    out = list(generate_tokens(ScriptedModel([100, 101, 102], 1), ids, GREEDY, 10, {248046}, stats=stats))
    assert out == [100, 101, 102]
    assert stats.prompt_tokens == 1 and stats.generated_tokens == 3 and stats.finish_reason == "stop"
    assert stats.time_to_first_token > 0 and stats.decode_tokens_per_second > 0


def test_generate_returns_the_answer_only(qwen35_tokenizer):
    prompt = "<|im_start|>assistant\n<think>\n"
    ids = qwen35_tokenizer.encode(prompt)
    script = qwen35_tokenizer.encode("reasoning") + [END_THINK] + qwen35_tokenizer.encode("\n\nanswer")
    assert generate(ScriptedModel(script, len(ids)), qwen35_tokenizer, ids, GREEDY) == "answer"
