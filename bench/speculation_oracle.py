"""Speculative decoding's speed-up measured end to end at a chosen acceptance, where random weights accept nothing.

`qwenlite bench --speculate K` measures what speculation costs (a verification of K+1 tokens, a draft against a
decode token) and what a random checkpoint accepts: nothing, so its speed-up is an estimate. This script measures
the speed-up itself: the checkpoint's MTP head drafts as usual (its full cost paid), and an oracle then replaces each
draft with the token plain greedy decoding produced there with probability p, else with a wrong one; the model
verifies as usual. Each draft is right with probability p once the ones before it were, as with a real head, so
the mean accepted length is 1 + p + ... + p^K tokens per verification. The output must equal plain decoding's,
token for token (checked on every run: the oracle also exercises rollback after every kind of partial acceptance).

    python bench/speculation_oracle.py /tmp/qwcmp/0.8b/bf16-mtp --quant int8 --ks 1,2,3,4 --ps 0.6,0.8,0.9
    python bench/speculation_oracle.py MODEL --out bench/results/DIR     # + speculation_oracle.{md,png} there

MODEL needs an MTP head (`qwenlite init-random --preset 0.8b --mtp`, or a checkpoint with `mtp.*`). Run it on a
quiet machine; plain and speculative runs alternate, and each figure is the best of --repeat.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from qwenlite.errors import QwenliteError
from qwenlite.generate import GenerationStats, generate_tokens
from qwenlite.io.load import load_model
from qwenlite.ops.cpu import kernels
from qwenlite.sample import SamplingParams
from qwenlite.speculative import Draft, Pick, Speculation, check_speculate, make_speculation


class OracleDraft:
    """The MTP head's drafts (their cost), each then replaced by the reference's token with probability p, given the
    drafts before it were right; else by a token that differs from it."""

    def __init__(self, draft: Draft, reference: Sequence[int], p: float, seed: int):
        self.draft, self.reference, self.p, self.rng = draft, reference, p, random.Random(seed)

    def begin(self, max_seq_len: int) -> None:
        self.draft.begin(max_seq_len)

    def propose(self, tokens: Sequence[int], hidden: torch.Tensor, k: int, pick: Pick):
        proposed = self.draft.propose(tokens, hidden, k, pick)
        out, right = [], True
        for j, (_, q) in enumerate(proposed):
            i = len(tokens) + j
            truth = self.reference[i] if i < len(self.reference) else 0  # past the end: generation stops first
            right = right and self.rng.random() < self.p
            out.append((truth if right else truth - 1 if truth else 1, q))  # greedy: any other id is rejected
        return out


def timed(model, ids: list[int], n: int, speculation: Speculation | None) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    out = list(generate_tokens(model, ids, SamplingParams(temperature=0), n, stats=stats, speculation=speculation))
    return out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--quant", choices=["int8", "int4"])
    parser.add_argument("--ks", default="1,2,3,4", help="drafts per verification, comma-separated")
    parser.add_argument("--ps", default="0.6,0.8,0.9", help="per-draft acceptance, comma-separated")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--draft-vocab",
        default="32768",
        choices=["32768", "65536", "all"],
        help="the ids the MTP drafts choose among: 32768 or 65536 (the first ids, as on English or "
        "code, where a real model's tokens keep to them; this model's random ids do not), or all",
    )
    parser.add_argument("--out", type=Path, help="a folder for speculation_oracle.md and .png")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    ps = [float(p) for p in args.ps.split(",")]
    for k in ks:
        check_speculate(k)
    if not all(0 <= p <= 1 for p in ps):
        raise SystemExit(f"--ps: acceptances between 0 and 1, got {args.ps}")

    model, _ = load_model(args.model, None, args.quant, "cpu", with_tokenizer=False)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 0, min(100_000, vocab), (args.prompt,),
                        generator=torch.Generator().manual_seed(0)).tolist()  # fmt: skip
    reference, _ = timed(model, ids, args.decode + 1, None)  # the first token comes from prefill
    full = ids + reference

    plain = float("inf")
    rows = []  # (k, p, expected mean accepted length, measured one, tok/s)
    for k in ks:
        for p in ps:
            best, stats_best = float("inf"), None
            for r in range(args.repeat):
                _, s = timed(model, ids, args.decode + 1, None)
                plain = min(plain, s.decode_seconds)
                spec = make_speculation(args.model, model, k)
                if args.draft_vocab != "all":  # the range a real model's context would give (MTPDraft.draft_vocab)
                    spec.draft.draft_vocab = lambda tokens: int(args.draft_vocab)
                spec.draft = OracleDraft(spec.draft, full, p, seed=r)
                out, s = timed(model, ids, args.decode + 1, spec)
                if out != reference:
                    raise SystemExit(f"K = {k}, p = {p}: speculative output differs from plain decoding")
                if s.decode_seconds < best:
                    best, stats_best = s.decode_seconds, s
            expected = sum(p**j for j in range(k + 1))
            rows.append((k, p, expected, stats_best.mean_accepted_length, args.decode / best))
    plain_tok_s = args.decode / plain

    precision = args.quant or str(model.dtype).removeprefix("torch.")
    lines = [f"# Speculation with oracle drafts: {args.model} ({precision}), {kernels.cpu_name()}, "
             f"{kernels.isa_label()} kernels, {torch.get_num_threads()} threads", "",
             f"Plain greedy decoding: {plain_tok_s:.1f} tok/s (best of {args.repeat * len(ks) * len(ps)}); prompt "
             f"{args.prompt}, {args.decode} tokens, each speculative figure the best of {args.repeat}; output equal "
             "to plain decoding's in every run; MTP drafts among "
             f"{'all ids' if args.draft_vocab == 'all' else f'the first {args.draft_vocab} ids'}.", "",
             "| K | p | mean accepted length (expected) | measured | tok/s | speed-up |",
             "|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for k, p, expected, measured, tok_s in rows:
        lines.append(f"| {k} | {p:.2f} | {expected:.2f} | {measured:.2f} | {tok_s:.1f} | {tok_s / plain_tok_s:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speculation_oracle.md").write_text(text)
        draw(rows, plain_tok_s, f"{Path(args.model).name} {precision}", args.out / "speculation_oracle.png")


def draw(rows, plain_tok_s: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == k]
        ax.plot([r[3] for r in mine], [r[4] / plain_tok_s for r in mine], "o-", label=f"K = {k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("mean accepted length (tokens per verification)")
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_title(f"Speculation, oracle drafts: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    try:
        main()
    except QwenliteError as e:  # a checkpoint without an MTP head, K out of range: one line
        raise SystemExit(f"error: {e}") from None
