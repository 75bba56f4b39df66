"""The CPU recipe, `qwenlite train demo --out DIR`: from raw text to a small model that writes Python and answers
questions about the library in a chat format, on a 2-core CPU in about 30 minutes (`--quick`: about a minute,
for a smoke test).

Corpus: the Python standard library that runs this code, nothing downloaded: the source of every module (tests,
IDLE, lib2to3 and turtledemo left out; one document per file) and the reference-manual topics that
`pydoc_data.topics` ships (one document per topic). License: the PSF License Agreement, the LICENSE.txt beside
the standard library. About 11 MB of text; 3 to 4 million tokens with a 4096-id tokenizer.

Stages, each skipped when its output is already there (with --resume an interrupted demo continues):
1. corpus: OUT/corpus/stdlib.jsonl; OUT/corpus/chat.jsonl, questions about public functions and classes
   answered with the first paragraph of their docstrings ({"messages": [...]}), every 20th held back in
   OUT/corpus/chat_eval.jsonl;
2. tokenizer: OUT/tokenizer, byte-level BPE with Qwen3.5's pre-tokenizer and special tokens;
3. pretraining: OUT/model (see DEMO and QUICK below for the model and schedule);
4. chat fine-tuning: OUT/chat, full fine-tuning with `qwenlite.train.sft` (loss on assistant tokens);
5. evaluation: held-out loss, perplexity and bits per byte over every held-out window next to a unigram
   baseline, samples from the pretrained model, and the chat model's answers to held-back questions; written
   to OUT/report.md beside OUT/model/loss_curve.png.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import random
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenlite.config import ModelConfig
from qwenlite.io.files import atomic_write
from qwenlite.io.load import load_mtp
from qwenlite.train.data import pack_corpus, tokenize_corpus
from qwenlite.train.distributed import DistEnv
from qwenlite.train.pretrain import PretrainResult, TrainConfig, evaluate, pretrain
from qwenlite.train.tokenizer_train import train_tokenizer

SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
PROMPTS = (
    'def is_prime(n):\n    """',
    "import os\n\n\ndef ",
    'class Stack:\n    """A ',
    "The for statement",
)


@dataclass(frozen=True)
class DemoSettings:
    corpus_bytes: int | None  # stop adding modules past this many bytes (None: the whole library and the topics)
    vocab_size: int
    model: dict  # ModelConfig fields
    train: TrainConfig
    sft_steps: int  # chat fine-tuning steps of 8 conversations
    sample_tokens: int


# 3.5M parameters (2.7M outside the tied embedding): on 2 idle cores about 4,500 tokens/s (3,400 with
# OMP_WAIT_POLICY=PASSIVE, as runs/demo.sh sets), so 3000 steps of 2048 tokens (6.1M tokens, 1.9 passes over the
# corpus) take 23-30 minutes; chat fine-tuning about 2 more. Held-out loss was still falling at the end (2.47).
DEMO = DemoSettings(
    corpus_bytes=None,
    vocab_size=4096,
    model=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=48, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=48, linear_value_head_dim=48, max_position_embeddings=2048),
    train=TrainConfig(steps=3000, batch_size=8, seq_len=256, lr=2e-3, warmup=100, val_fraction=0.01,
                      eval_every=250, eval_sequences=64, save_every=250, log_every=25, mtp=True),
    sft_steps=500,
    sample_tokens=120,
)  # fmt: skip
QUICK = DemoSettings(
    corpus_bytes=600_000,
    vocab_size=1024,
    model=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=48, linear_num_key_heads=1, linear_num_value_heads=2,
               linear_key_head_dim=48, linear_value_head_dim=48, max_position_embeddings=2048),
    train=TrainConfig(steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup=30, val_fraction=0.02,
                      eval_every=100, eval_sequences=32, save_every=100, log_every=20, mtp=True),
    sft_steps=40,
    sample_tokens=40,
)  # fmt: skip


def run_demo(
    out_dir: str | Path, quick: bool = False, resume: bool = False, settings: DemoSettings | None = None
) -> dict:
    """Run the stages (module docstring) into `out_dir`; returns the numbers of the report."""
    s = settings or (QUICK if quick else DEMO)
    out = Path(out_dir)
    t0 = time.perf_counter()
    _stage("1/5 corpus: the Python standard library's source and reference topics (PSF License)")
    docs, chat = out / "corpus" / "stdlib.jsonl", out / "corpus" / "chat.jsonl"
    chat_eval = out / "corpus" / "chat_eval.jsonl"
    if not docs.is_file():
        build_stdlib_corpus(out / "corpus", s.corpus_bytes)

    _stage(f"2/5 tokenizer: byte-level BPE, {s.vocab_size} ids")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer([docs], s.vocab_size, tokenizer_dir, show_progress=False)

    _stage("3/5 pretraining")
    config = ModelConfig(vocab_size=s.vocab_size, mtp_num_hidden_layers=0, dtype="float32", **s.model)
    result = pretrain(config, [docs], out / "model", tokenizer_dir, s.train, resume=resume)

    _stage("4/5 chat fine-tuning: answer questions about the library from its docstrings")
    chat_dir, sft_losses = fine_tune_chat(out / "model", chat, out / "chat", s)

    _stage("5/5 evaluation")
    report = evaluate_demo(out, docs, s, result)
    report["chat"] = ask_questions(chat_dir, chat_eval, s) if chat_dir else []
    report["sft_losses"] = sft_losses
    report["minutes"] = (time.perf_counter() - t0) / 60
    write_report(out / "report.md", report)
    print((out / "report.md").read_text(), file=sys.stderr)
    return report


def _stage(title: str) -> None:
    print(f"\n== {title}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Corpus


def stdlib_files() -> list[Path]:
    """The library's modules in path order, less tests, tools and the generated build-settings dump."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if not SKIPPED_PARTS & set(p.relative_to(root).parts) and not p.name.startswith("_sysconfigdata")
    )


def build_stdlib_corpus(out_dir: Path, max_bytes: int | None = None) -> None:
    """OUT/stdlib.jsonl ({"text", "source"} per module and per reference topic), OUT/chat.jsonl and, every 20th
    question held back, OUT/chat_eval.jsonl. With `max_bytes`, modules drawn in a fixed random order until that
    much text, and no topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    if max_bytes is not None:
        random.Random(0).shuffle(files)
    docs, chats, size = [], [], 0
    for path in files:
        try:
            with tokenize.open(path) as f:  # honours a PEP 263 coding line
                source = f.read()
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        docs.append({"text": source, "source": f"stdlib/{path.relative_to(root)}"})
        chats += docstring_questions(module, source)
        size += len(source)
        if max_bytes is not None and size >= max_bytes:
            break
    if max_bytes is None:
        from pydoc_data.topics import topics

        docs += [{"text": text, "source": f"pydoc_data.topics/{name}"} for name, text in sorted(topics.items())]
    out_dir.mkdir(parents=True, exist_ok=True)
    held = [c for i, c in enumerate(chats) if i % 20 == 19]
    chats = [c for i, c in enumerate(chats) if i % 20 != 19]
    # stdlib.jsonl last: its presence marks a complete corpus stage
    for name, records in (("chat.jsonl", chats), ("chat_eval.jsonl", held), ("stdlib.jsonl", docs)):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(out_dir / name, lambda p, text=lines: p.write_text(text, encoding="utf-8"))


def docstring_questions(module: str, source: str) -> list[dict]:
    """'What does `module.name` do?' answered with the first paragraph of the docstring, for each public
    top-level function and class that has one."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        answer = " ".join(doc.split("\n\n")[0].split()) if doc else ""
        if len(answer) >= 20:
            question = f"What does `{module}.{node.name}` do?"
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


# ---------------------------------------------------------------------------------------------
# Chat fine-tuning (hook) and evaluation


def fine_tune_chat(model_dir: Path, chat_data: Path, out_dir: Path, s: DemoSettings) -> tuple[Path, list[float]]:
    """Stage 4: full fine-tuning of the pretrained model on the docstring conversations with `train_sft` (the
    model's own chat template, loss on assistant tokens only). Returns (the chat checkpoint, its losses)."""
    from qwenlite.train.common import TrainSettings
    from qwenlite.train.sft import train_sft

    log_file = out_dir / "sft_log.jsonl"
    if (out_dir / "model.safetensors").is_file() and log_file.is_file():
        return out_dir, [json.loads(line)["loss"] for line in log_file.read_text().splitlines()]
    settings = TrainSettings(
        lr=1e-3, max_steps=s.sft_steps, batch_size=8, warmup_steps=max(1, s.sft_steps // 20), weight_decay=0.0,
        max_len=s.train.seq_len, log_every=max(1, s.sft_steps // 10),
    )  # fmt: skip
    history = train_sft(model_dir, chat_data, out_dir, settings)
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(log_file, lambda p: p.write_text(text))
    return out_dir, [r["loss"] for r in history]


def ask_questions(chat_dir: Path, questions: Path, s: DemoSettings, count: int = 4) -> list[dict]:
    """Greedy answers of the chat model to held-back questions, beside the docstring's own words."""
    from qwenlite.generate import stream
    from qwenlite.io.checkpoint import load_checkpoint
    from qwenlite.sample import SamplingParams
    from qwenlite.text.tokenizer import Tokenizer

    model = load_checkpoint(chat_dir, dtype=torch.float32).model
    tokenizer = Tokenizer.from_dir(chat_dir)
    records = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines()][:count]
    out = []
    for record in records:
        question, reference = record["messages"][0]["content"], record["messages"][1]["content"]
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
        chunks = list(stream(model, tokenizer, ids, SamplingParams(temperature=0), max_tokens=s.sample_tokens))
        answer = "".join(c.text for c in chunks).strip()
        out.append({"question": question, "answer": answer, "reference": reference,
                    "finished": chunks[-1].finish_reason == "stop"})  # fmt: skip
    return out


def evaluate_demo(out: Path, docs: Path, s: DemoSettings, result: PretrainResult) -> dict:
    """Held-out loss over every held-out window, a unigram baseline, bits per byte, and samples."""
    from qwenlite.generate import generate
    from qwenlite.io.checkpoint import load_checkpoint
    from qwenlite.sample import SamplingParams
    from qwenlite.text.tokenizer import Tokenizer

    model_dir = out / "model"
    corpus = tokenize_corpus([docs], model_dir, model_dir / "token_cache", show_progress=False)  # the cached ids
    packed, train_idx, val_idx = pack_corpus(corpus, s.train.seq_len, s.train.val_fraction)
    model = load_checkpoint(model_dir, dtype=torch.float32).model
    cfg = dataclasses.replace(s.train, eval_sequences=len(val_idx))
    held_out = evaluate(model, packed, val_idx, cfg, DistEnv())
    unigram = unigram_loss(packed, train_idx, val_idx, s.vocab_size)
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in docs.open(encoding="utf-8"))
    bytes_per_token = text_bytes / len(corpus.tokens)

    tokenizer = Tokenizer.from_dir(model_dir)
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=0)
    samples = {p: generate(model, tokenizer, tokenizer.encode(p), params, max_tokens=s.sample_tokens) for p in PROMPTS}
    report = {
        "corpus_documents": corpus.num_documents,
        "corpus_tokens": len(corpus.tokens),
        "bytes_per_token": bytes_per_token,
        "parameters": result.num_parameters,
        "steps": result.step,
        "tokens_trained": result.step * s.train.batch_size * s.train.seq_len * s.train.grad_accum,
        "tokens_per_second": result.tokens_per_second,
        "train_loss": result.train_loss,
        "held_out_windows": len(val_idx),
        "held_out_loss": held_out,
        "held_out_perplexity": math.exp(held_out),
        "held_out_bits_per_byte": held_out / math.log(2) / bytes_per_token,
        "unigram_loss": unigram,
        "samples": samples,
    }
    if s.train.mtp:
        report["speculation"] = measure_speculation(model, load_mtp(model_dir, model), tokenizer, s.sample_tokens)
    return report


def measure_speculation(model, head, tokenizer, max_tokens: int, k: int = 2) -> dict:
    """Greedy decoding of the sample prompts with and without `--speculate k` drafted by the MTP head trained with the
    model: decode tokens per second of each (prefill left out), the drafts' acceptance, and whether the tokens agree."""
    from qwenlite.generate import GenerationStats, generate_tokens
    from qwenlite.sample import SamplingParams
    from qwenlite.speculative import MTPDraft, Speculation

    greedy = SamplingParams(temperature=0)
    result: dict = {"k": k}
    outputs = {}
    with torch.inference_mode():
        for name, speculation in (("plain", None), ("speculative", Speculation(MTPDraft(model, head), k))):
            runs = [GenerationStats() for _ in PROMPTS]
            outputs[name] = [
                list(generate_tokens(model, tokenizer.encode(p), greedy, max_tokens, stats=r, speculation=speculation))
                for p, r in zip(PROMPTS, runs, strict=True)
            ]
            seconds = sum(r.decode_seconds for r in runs)
            result[f"{name}_tokens_per_s"] = sum(r.generated_tokens - 1 for r in runs) / seconds if seconds else 0.0
            drafted = sum(r.draft_tokens for r in runs)
            result["acceptance"] = sum(r.accepted_tokens for r in runs) / drafted if drafted else 0.0
    result["identical"] = outputs["plain"] == outputs["speculative"]
    return result


def unigram_loss(packed, train_idx, val_idx, vocab_size: int) -> float:
    """Cross-entropy of the held-out targets under the training windows' token frequencies (add-one smoothed):
    what a model that ignores context scores."""
    T = packed.seq_len
    counts = np.ones(vocab_size)
    for i in train_idx:
        np.add.at(counts, packed.tokens[i * T + 1 : i * T + T + 1].astype(np.int64), 1)
    log_p = np.log(counts / counts.sum())
    held = np.concatenate([packed.tokens[i * T + 1 : i * T + T + 1] for i in val_idx]).astype(np.int64)
    return float(-log_p[held].mean())


def write_report(path: Path, r: dict) -> None:
    lines = [
        "# qwenlite train demo",
        "",
        f"- corpus: the Python standard library's source and reference topics (PSF License), "
        f"{r['corpus_documents']:,} documents, {r['corpus_tokens']:,} tokens ({r['bytes_per_token']:.2f} bytes/token)",
        f"- model: {r['parameters'] / 1e6:.2f}M parameters, {r['steps']} steps, {r['tokens_trained']:,} tokens "
        f"at {r['tokens_per_second']:,.0f} tokens/s",
        f"- final training loss {r['train_loss']:.3f}; held-out loss {r['held_out_loss']:.3f} nats/token "
        f"(perplexity {r['held_out_perplexity']:.1f}, {r['held_out_bits_per_byte']:.2f} bits/byte) over "
        f"{r['held_out_windows']} windows; a unigram model scores {r['unigram_loss']:.3f}",
        f"- chat fine-tuning: {len(r['sft_losses'])} steps, loss {r['sft_losses'][0]:.3f} -> "
        f"{sum(r['sft_losses'][-10:]) / len(r['sft_losses'][-10:]):.3f} (mean of the last 10)"
        if r["sft_losses"]
        else "- chat fine-tuning: skipped",
        *(
            [
                f"- speculative decoding with the MTP head trained alongside (`--speculate {sp['k']}`): "
                f"{sp['speculative_tokens_per_s']:.0f} tokens/s against {sp['plain_tokens_per_s']:.0f} plain "
                f"({sp['speculative_tokens_per_s'] / sp['plain_tokens_per_s']:.2f}x), "
                f"acceptance {sp['acceptance']:.0%}, "
                f"greedy output {'identical' if sp['identical'] else 'DIFFERENT (a bug)'}"
            ]
            if (sp := r.get("speculation"))
            else []
        ),
        f"- wall time of this invocation {r['minutes']:.1f} min; loss curve: model/loss_curve.png",
        "",
        "## Samples (temperature 0.7, top-p 0.95, seed 0)",
    ]
    for prompt, text in r["samples"].items():
        lines += ["", "```", prompt + text, "```"]
    if r["chat"]:
        lines += ["", "## Held-back questions to the chat model (greedy)"]
        for qa in r["chat"]:
            ended = "" if qa["finished"] else " (did not end its turn)"
            lines += ["", f"**Q:** {qa['question']}", "", f"**A:** {qa['answer']}{ended}", "",
                      f"*docstring:* {qa['reference']}"]  # fmt: skip
    body = "\n".join(lines) + "\n"
    atomic_write(path, lambda p: p.write_text(body, encoding="utf-8"))
