"""`qwenlite perplexity`: perplexity against a direct transformers computation over the same windows, the KL
statistics against a direct computation too (itself: zero; another checkpoint; its int4 variant), bits per byte
against the NLL and the byte count, the CLI's table and JSON, and one-line errors for bad input.

Tolerances: fp32 on both sides, so the mean NLL and every KL statistic agree with transformers to 1e-5 relative
(logits agree to 1e-4 absolute, see test_model.py; measured 2e-8 to 1e-7 here); a model against itself gives KL
exactly 0.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import tokenizers
import torch

from qwenlite.cli.main import main
from qwenlite.eval import perplexity as ppl
from qwenlite.eval.perplexity import perplexity
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.text.tokenizer import Tokenizer

from helpers import TINY_TEXT_CONFIG, reference_logits, tiny_checkpoint
from tiny_chat import make_chat_checkpoint
from train_helpers import single_threaded

# Every matrix's input splits into int4's default groups of 128 (hidden, MLP, attention and linear-attention heads).
TEXT_CONFIG = dict(TINY_TEXT_CONFIG, hidden_size=128, intermediate_size=256, head_dim=32, linear_value_head_dim=32)
TEXT = (
    "The capital of France is Paris. The weather in Paris is sunny today, and two plus two is four. "
    "You are a helpful assistant: answer the question briefly and politely. Three plus three is six. "
    * 3
    + "Café, naïve, 東京, 🙂.\n"
)
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_threaded():  # see train_helpers: a neighbour on the other core stalls two-thread OpenMP
        yield


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(transformers model, its checkpoint directory, a text file): a tiny model with a tiny tokenizer."""
    path = tmp_path_factory.mktemp("ppl") / "model"
    hf = make_chat_checkpoint(path, text_config=TEXT_CONFIG)
    file = path.parent / "text.txt"
    file.write_text(TEXT, encoding="utf-8")
    return hf, path, file


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """(transformers model, checkpoint directory): other weights, the same tokenizer."""
    path = tmp_path_factory.mktemp("ppl-other") / "model"
    return make_chat_checkpoint(path, text_config=TEXT_CONFIG, seed=1), path


def token_ids(path, text: str = TEXT) -> list[int]:
    """The text's ids from the tokenizers library itself, not qwenlite's wrapper."""
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def reference_log_probs(hf, ids: list[int], ctx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per window of `ctx` tokens (a last window of one token dropped): (log-probabilities of every position but
    the last (T-1, V), the tokens they predict (T-1,)), from transformers' full forward."""
    out = []
    for i in range(0, len(ids), ctx):
        window = torch.tensor([ids[i : i + ctx]])
        if window.shape[1] >= 2:
            out.append((torch.log_softmax(reference_logits(hf, window)[0, :-1], -1), window[0, 1:]))
    return out


def window_lengths(n: int) -> dict[str, int]:
    """ctx values for a text of n tokens: several windows of more than ppl.POSITIONS tokens and a short last one;
    a last window of one token (dropped); one window holding the whole text."""
    return {"several": ppl.POSITIONS + 30, "tail of one": n - 1, "one window": n}


@pytest.mark.parametrize("shape", ["several", "tail of one", "one window"])
def test_perplexity_matches_transformers(chat, shape):
    hf, path, file = chat
    ids = token_ids(path)
    ctx = window_lengths(len(ids))[shape]
    windows = reference_log_probs(hf, ids, ctx)
    nll = torch.cat([-logp.gather(-1, targets[:, None])[:, 0] for logp, targets in windows]).double()

    result = perplexity(str(path), file, ctx, progress=False)
    assert (result.tokens, result.windows, result.scored_tokens) == (len(ids), len(windows), len(nll))
    assert result.scored_tokens == len(ids) - math.ceil(len(ids) / ctx)  # a window's first token is not scored
    assert result.mean_nll == pytest.approx(nll.mean().item(), rel=RTOL)
    assert result.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=RTOL)
    assert result.precision == "float32" and result.divergence is None


def test_kl_against_itself_is_zero(chat):
    _, path, file = chat
    result = perplexity(str(path), file, 40, base_ref=str(path), progress=False)
    d = result.divergence
    assert max(abs(d.kl_mean), abs(d.kl_max), abs(d.kl_p99), abs(d.kl_median)) <= 1e-6
    assert d.top1_agreement == 1.0
    assert d.base_perplexity == result.perplexity and d.perplexity_ratio == 1.0


def test_kl_against_another_checkpoint_matches_a_direct_computation(chat, other):
    hf, path, file = chat
    hf_base, base_path = other
    ctx = ppl.POSITIONS + 30
    ids = token_ids(path)
    logp, targets = (torch.cat(t) for t in zip(*reference_log_probs(hf, ids, ctx), strict=True))
    logq, _ = (torch.cat(t) for t in zip(*reference_log_probs(hf_base, ids, ctx), strict=True))
    kl = (logq.exp() * (logq - logp)).sum(-1).double().numpy()  # KL(base || model), per position
    nll, base_nll = (-lp.gather(-1, targets[:, None]).double().mean().item() for lp in (logp, logq))

    result = perplexity(str(path), file, ctx, base_ref=str(base_path), progress=False)
    d = result.divergence
    assert d.kl_mean > 0.1  # far apart: KL(model || base) would differ by far more than the tolerance
    assert d.kl_mean == pytest.approx(kl.mean(), rel=RTOL)
    assert d.kl_stderr == pytest.approx(kl.std(ddof=1) / math.sqrt(len(kl)), rel=RTOL)
    assert d.kl_median == pytest.approx(np.median(kl), rel=RTOL)
    assert d.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=RTOL)
    assert d.kl_max == pytest.approx(kl.max(), rel=RTOL)
    assert d.top1_agreement == pytest.approx((logp.argmax(-1) == logq.argmax(-1)).double().mean().item())
    assert result.perplexity == pytest.approx(math.exp(nll), rel=RTOL)
    assert d.base_perplexity == pytest.approx(math.exp(base_nll), rel=RTOL)
    assert d.perplexity_ratio == pytest.approx(math.exp(nll - base_nll), rel=RTOL)


def test_kl_against_the_int4_variant(chat):
    _, path, file = chat
    plain = perplexity(str(path), file, 40, progress=False)
    result = perplexity(str(path), file, 40, quant="int4", base_ref=str(path), progress=False)
    d = result.divergence
    assert result.precision == "int4" and d.base_precision == "float32"
    assert 0 < d.kl_median <= d.kl_p99 <= d.kl_max and d.kl_mean > 0
    assert d.top1_agreement < 1
    assert d.base_perplexity == plain.perplexity  # the base is the fp32 model, scored the same way
    assert result.perplexity != plain.perplexity
    assert d.perplexity_ratio == pytest.approx(result.perplexity / plain.perplexity)


def test_bits_per_byte(chat):
    """Byte-level BPE: every byte of the text belongs to one token (the multi-byte characters split into byte
    tokens); each window's first token's bytes do not count."""
    _, path, file = chat
    tokenizer = Tokenizer.from_dir(path)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids[:1]) == "The"
    n_bytes = len(TEXT.encode())
    assert n_bytes > len(TEXT)  # multi-byte characters

    whole = perplexity(str(path), file, len(ids), progress=False)
    assert whole.scored_bytes == n_bytes - len(b"The")
    assert whole.bits_per_byte == pytest.approx(whole.nll_sum / math.log(2) / whole.scored_bytes, rel=1e-12)
    assert whole.nll_sum == pytest.approx(whole.mean_nll * whole.scored_tokens, rel=1e-12)

    ctx = 9
    assert len(ids) % ctx > 1  # no window of one token
    windowed = perplexity(str(path), file, ctx, progress=False)
    assert windowed.scored_bytes == n_bytes - sum(len(tokenizer.token_bytes(i)) for i in ids[::ctx])
    assert windowed.bits_per_byte == pytest.approx(windowed.nll_sum / math.log(2) / windowed.scored_bytes, rel=1e-12)


def test_real_vocabulary(tmp_path_factory, tmp_path):
    """The tiny preset with the real 248K vocabulary: the head taken ppl.POSITIONS rows at a time gives the forward's
    log-probabilities, and the real tokenizer's bytes add up."""
    path = tiny_checkpoint(tmp_path_factory)
    file = tmp_path / "text.txt"
    file.write_text(TEXT, encoding="utf-8")
    tokenizer = Tokenizer.from_dir(path)
    ids = tokenizer.encode(TEXT)
    ctx = ppl.POSITIONS + 30
    model = load_checkpoint(path).model
    with torch.inference_mode():
        nll = torch.cat([torch.nn.functional.cross_entropy(model(torch.tensor([ids[i : i + ctx]]))[0, :-1],
                                                           torch.tensor(ids[i + 1 : i + ctx]), reduction="none")
                         for i in range(0, len(ids), ctx)])  # fmt: skip
    result = perplexity(str(path), file, ctx, progress=False)
    assert result.scored_tokens == len(nll) and result.mean_nll == pytest.approx(nll.mean().item(), rel=RTOL)
    assert result.scored_bytes == len(TEXT.encode()) - sum(len(tokenizer.token_bytes(i)) for i in ids[::ctx])


def test_cli_table_and_json(chat, capsys):
    _, path, file = chat
    argv = ["perplexity", str(path), "--file", str(file), "--ctx", "40"]
    assert main(argv) == 0
    expected = perplexity(str(path), file, 40, progress=False)
    out = capsys.readouterr().out
    assert f"{expected.scored_tokens} of {expected.tokens} in {expected.windows} windows" in out
    for figure in (f"{expected.mean_nll:.4f} nats/token", f"perplexity         {expected.perplexity:.4f}",
                   f"{expected.bits_per_byte:.4f} ({expected.scored_bytes} bytes scored)"):  # fmt: skip
        assert figure in out, figure

    assert main([*argv, "--quant", "int4", "--base", str(path), "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    got = json.loads(out)
    assert got["precision"] == "int4" and got["scored_tokens"] == expected.scored_tokens
    assert got["divergence"]["base_perplexity"] == expected.perplexity
    assert set(got["divergence"]) >= {"kl_mean", "kl_stderr", "kl_median", "kl_p99", "kl_max", "top1_agreement",
                                      "perplexity_ratio"}  # fmt: skip

    assert main([*argv, "--base", str(path), "--base-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    for label in ("base (bfloat16)", "base perplexity", "perplexity ratio", "KL(base || model)", "top-1 agreement"):
        assert label in out, label

    assert main([*argv, "--base", str(path), "--base-quant", "int8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["precision"], got["divergence"]["base_precision"]) == ("float32", "int8")


def swapped_vocabulary(path, dest):
    """A copy of the checkpoint at `path` whose tokenizer swaps the ids of two tokens: as many ids, other meanings."""
    shutil.copytree(path, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """The same tokenizer, more rows in the embedding and the head."""
    path = tmp_path_factory.mktemp("ppl-wider") / "model"
    make_chat_checkpoint(path, text_config=dict(TEXT_CONFIG, vocab_size=640))
    return path


BAD_INPUT = {
    "missing file": (lambda d: ["--file", str(d["tmp"] / "nope.txt")], "no such file"),
    "empty file": (lambda d: ["--file", str(d["write"](""))], "is empty"),
    "not UTF-8": (lambda d: ["--file", str(d["write"](b"caf\xe9"))], "is not UTF-8"),
    "one token": (lambda d: ["--file", str(d["write"]("a"))], "1 token long; perplexity needs at least 2"),
    "ctx 1": (lambda d: ["--ctx", "1"], "ctx must be at least 2"),
    "ctx past the context": (lambda d: ["--ctx", "1025"], "context of 1024 tokens"),
    "base with more logits": (lambda d: ["--base", str(d["wider"])], "640 logits per token, the model 512"),
    "base with another tokenizer": (
        lambda d: ["--base", str(swapped_vocabulary(d["path"], d["tmp"] / "swapped"))],
        "tokenizer differs from the model's",
    ),
    "base flags without a base": (lambda d: ["--base-quant", "int8"], "need --base"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line(chat, wider, tmp_path, capsys, case):
    _, path, file = chat

    def write(content: str | bytes):
        target = tmp_path / "text.txt"
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
        return target

    argv, message = BAD_INPUT[case]
    extra = argv({"tmp": tmp_path, "write": write, "wider": wider, "path": path})
    default_file = [] if "--file" in extra else ["--file", str(file)]
    assert main(["perplexity", str(path), *default_file, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwenlite: error:") and message in err[0], err
