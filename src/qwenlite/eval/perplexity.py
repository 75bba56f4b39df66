"""`qwenlite perplexity MODEL --file TEXT [--ctx 512] [--base OTHER]`: how well a model predicts a text and, with a
base model, how far its next-token distributions are from the base's (a quantized copy against the original, say).

What is scored. The file is read as UTF-8 and tokenized whole with MODEL's tokenizer (no chat template, no special
tokens added), then cut into non-overlapping windows of `ctx` tokens; the last window holds what is left (when that
is a single token, it is dropped). Each window is a forward pass of its own: its first token is context only, and
every later token is scored given the tokens before it in the same window, so a window of L tokens scores L - 1.
- tokens scored N; mean NLL = (sum of -ln p(token)) / N, in nats per token; perplexity = exp(mean NLL);
- bits per byte = (sum of -ln p(token)) / ln 2 / B, where B is the UTF-8 bytes of the scored tokens, each token
  counting its own bytes (byte-level BPE: every byte of the text belongs to exactly one token). So B is the text's
  byte count less the bytes of each window's first token (the text after the tokenizer's NFC normalisation: the
  file's bytes for NFC text).

With `--base`, on the same windows and positions, p the model's and q the base's next-token distribution:
KL(base || model) = sum_v q(v) (ln q(v) - ln p(v)) per scored position, and its mean, the standard error of that
mean, median, 99th percentile and maximum; top-1 agreement, the share of positions where both argmaxes are the same
token; both perplexities and their ratio (model / base). The base must share MODEL's vocabulary: the same
tokenizer (id for id) and the same number of logits.

How it differs from llama.cpp's `perplexity`: llama.cpp drops the tokens after the last full window (and wants at
least two windows), starts each window with BOS where the model has one (Qwen3.5 has none), and scores only the
second half of each window, so that every scored token sees at least ctx/2 tokens of context; here every token
after a window's first is scored, so the same model and ctx give a higher perplexity than llama.cpp's. For the KL
statistics llama.cpp first runs the base and saves its log-probabilities at the scored positions to a file
(`--kl-divergence-base`: vocab 16-bit values per position, clamped 16 nats below the largest), then runs the model
with `--kl-divergence` against that file; here both models run window by window in one process, in fp32 throughout
(so the smallest KL values can differ from llama.cpp's), and top-1 agreement is llama.cpp's "same top p".

Memory: one window at a time. A window's final hidden states (ctx, hidden) come from one forward pass without a
cache; the head then runs over POSITIONS positions at a time, so per model at most POSITIONS x vocab fp32 logits
and their log-softmax exist at once (64 x 248320 x 4 B = 64 MB each, where a whole window's at ctx 512 would be
500 MB). What is kept across windows is a few numbers per scored token.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qwenlite.errors import ContextLengthExceeded, InvalidArgument, QwenliteError
from qwenlite.io.hub import resolve_model_path
from qwenlite.io.load import load_model
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.text.tokenizer import Tokenizer

POSITIONS = 64  # head rows at a time: 64 x 248320 fp32 logits = 64 MB


@dataclass
class Divergence:
    """MODEL against BASE on the same positions; KL is KL(base || model) in nats per scored token."""

    base: str
    base_precision: str
    base_perplexity: float
    perplexity_ratio: float  # model / base
    kl_mean: float
    kl_stderr: float | None  # standard error of the mean; None when one token is scored
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float


@dataclass
class PerplexityResult:
    model: str
    precision: str
    file: str
    ctx: int
    windows: int
    tokens: int  # the whole text
    scored_tokens: int
    scored_bytes: int
    nll_sum: float  # nats, over the scored tokens
    mean_nll: float  # nats per token
    perplexity: float
    bits_per_byte: float
    divergence: Divergence | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("tokens scored", f"{self.scored_tokens} of {self.tokens} in {self.windows} windows"),
            ("mean NLL", f"{self.mean_nll:.4f} nats/token"),
            ("perplexity", f"{self.perplexity:.4f}"),
            ("bits per byte", f"{self.bits_per_byte:.4f} ({self.scored_bytes} bytes scored)"),
        ]
        if d := self.divergence:
            stderr = f" ± {d.kl_stderr:.6f}" if d.kl_stderr is not None else ""
            rows += [
                (f"base ({d.base_precision})", d.base),
                ("base perplexity", f"{d.base_perplexity:.4f}"),
                ("perplexity ratio", f"{d.perplexity_ratio:.4f} (model / base)"),
                ("KL(base || model)", f"mean {d.kl_mean:.6f}{stderr} nats/token"),
                ("", f"median {d.kl_median:.6f}, 99% {d.kl_p99:.6f}, max {d.kl_max:.6f}"),
                ("top-1 agreement", f"{d.top1_agreement:.2%}"),
            ]
        title = f"qwenlite perplexity {self.model} ({self.precision}) on {self.file}, ctx {self.ctx}"
        return "\n".join([title, *(f"  {k:<18} {v}" for k, v in rows)])


def perplexity(
    model_ref: str,
    file: str | Path,
    ctx: int = 512,
    dtype: str | None = None,
    quant: str | None = None,
    base_ref: str | None = None,
    base_dtype: str | None = None,
    base_quant: str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity and bits per byte of `model_ref` over `file`, and with `base_ref` the divergence from that base
    (loaded with `base_dtype` / `base_quant`); see the module docstring for what is scored."""
    if ctx < 2:
        raise InvalidArgument(f"ctx must be at least 2 (one token of context, one scored), got {ctx}")
    text = read_text(Path(file))
    model, tokenizer = load(model_ref, dtype, quant, ctx)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise InvalidArgument(f"{file} is {len(ids)} token long; perplexity needs at least 2")
    base = None
    if base_ref is not None:
        base, base_tokenizer = load(base_ref, base_dtype, base_quant, ctx)
        check_same_vocabulary(model, tokenizer, base, base_tokenizer, base_ref)

    windows = [ids[i : i + ctx] for i in range(0, len(ids), ctx) if len(ids) - i >= 2]
    scores = score_windows(model, windows, base, progress)
    token_bytes = {i: len(tokenizer.token_bytes(i)) for i in set(ids)}
    scored_bytes = sum(token_bytes[t] for window in windows for t in window[1:])
    nll = scores["nll"]
    n, nll_sum = len(nll), nll.sum().item()
    result = PerplexityResult(
        model=model_ref, precision=precision(model), file=str(file), ctx=ctx, windows=len(windows),
        tokens=len(ids), scored_tokens=n, scored_bytes=scored_bytes, nll_sum=nll_sum, mean_nll=nll_sum / n,
        perplexity=math.exp(nll_sum / n), bits_per_byte=nll_sum / math.log(2) / scored_bytes,
    )  # fmt: skip
    if base is not None:
        kl = scores["kl"].numpy()
        base_perplexity = math.exp(scores["base_nll"].mean().item())
        result.divergence = Divergence(
            base=base_ref, base_precision=precision(base), base_perplexity=base_perplexity,
            perplexity_ratio=result.perplexity / base_perplexity, kl_mean=float(kl.mean()),
            kl_stderr=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else None, kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
            top1_agreement=scores["agree"].mean().item(),
        )  # fmt: skip
    return result


@torch.inference_mode()
def score_windows(
    model: Qwen3_5ForCausalLM, windows: list[list[int]], base: Qwen3_5ForCausalLM | None = None, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Per scored position, in text order (fp64): "nll", the model's -ln p(next token); with a base also
    "base_nll", "kl" = KL(base || model) and "agree" (1 where both argmaxes are the same token)."""
    out = defaultdict(list)
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = torch.tensor([window])
        targets = ids[0, 1:, None].to(model.device)  # (T-1, 1): position i predicts token i+1
        hidden = model.model(ids.to(model.device))[:, :-1]  # (1, T-1, hidden); the last position predicts nothing
        base_hidden = base.model(ids.to(base.device))[:, :-1] if base is not None else None
        for s in range(0, len(targets), POSITIONS):
            logp = log_probs(model, hidden[:, s : s + POSITIONS])  # (n, V)
            out["nll"].append(-logp.gather(-1, targets[s : s + POSITIONS])[:, 0])
            if base is not None:
                logq = log_probs(base, base_hidden[:, s : s + POSITIONS]).to(logp.device)  # (n, V)
                out["base_nll"].append(-logq.gather(-1, targets[s : s + POSITIONS])[:, 0])
                out["kl"].append((logq.exp() * (logq - logp)).sum(-1))
                out["agree"].append(logq.argmax(-1) == logp.argmax(-1))
    return {k: torch.cat(v).cpu().double() for k, v in out.items()}


def log_probs(model: Qwen3_5ForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states (1, n, hidden) -> next-token log-probabilities (n, V) fp32: the head as forward runs it."""
    return torch.log_softmax(model.lm_head(hidden).float()[0], dim=-1)


def read_text(path: Path) -> str:
    if not path.is_file():
        raise QwenliteError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwenliteError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise QwenliteError(f"{path} is empty")
    return text


def load(model_ref: str, dtype: str | None, quant: str | None, ctx: int) -> tuple[Qwen3_5ForCausalLM, Tokenizer]:
    model, tokenizer = load_model(resolve_model_path(model_ref), dtype, quant)
    context = model.config.max_position_embeddings
    if ctx > context:
        raise ContextLengthExceeded(f"ctx {ctx} is larger than {model_ref}'s context of {context} tokens")
    return model, tokenizer


def check_same_vocabulary(
    model: Qwen3_5ForCausalLM, tokenizer: Tokenizer, base: Qwen3_5ForCausalLM, base_tokenizer: Tokenizer, base_ref: str
) -> None:
    """KL compares distributions over token ids: both models must mean the same token by each id and have as
    many logits."""
    if model.config.vocab_size != base.config.vocab_size:
        raise QwenliteError(
            f"{base_ref} has {base.config.vocab_size} logits per token, the model {model.config.vocab_size}: "
            "the base must share the model's vocabulary"
        )
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if tokens != [base_tokenizer.id_to_token(i) for i in range(base_tokenizer.vocab_size)]:
        raise QwenliteError(f"{base_ref}'s tokenizer differs from the model's: the base must share its vocabulary")


def precision(model: Qwen3_5ForCausalLM) -> str:
    bits = getattr(model.lm_head, "bits", None)  # a QuantLinear head: quantized on load or a quantized checkpoint
    return f"int{bits}" if bits else str(model.dtype).removeprefix("torch.")
