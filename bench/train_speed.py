"""Pretraining speed: qwenlite's training loop against transformers' Trainer on the same model (same initial
weights, from one checkpoint), the same packed windows in the same order, the same optimizer settings and thread
count; each engine in its own process. Prints training tokens/s (median step after two warm-up steps) and the
losses of both as a sanity check. Run by hand:

    python bench/train_speed.py --model tiny --vocab real --batch-size 4 --seq-len 256 --steps 12
    python bench/train_speed.py --model 20m --vocab 8192 --batch-size 8 --seq-len 256 --steps 12

Models: `tiny` is the preset (hidden 128, 4 layers); with `--vocab real` it keeps the Qwen3.5 vocabulary, so the
248K-row head dominates. `20m`: hidden 384, 10 layers (21M parameters with an 8192-id vocabulary). Data: the
Python standard library's source (PSF License), as in `qwenlite train demo`; `--vocab N` trains an N-id tokenizer
on it first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "tiny": None,  # the preset
    "20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6,
                num_key_value_heads=3, head_dim=64, linear_num_key_heads=3, linear_num_value_heads=6,
                linear_key_head_dim=64, linear_value_head_dim=64),
}  # fmt: skip
WARMUP = 2


def prepare(work: Path, model: str, vocab: str, corpus_bytes: int) -> None:
    """Corpus, tokenizer and a checkpoint with the documented initial weights, shared by both engines."""

    from qwenlite.config import ModelConfig
    from qwenlite.io.checkpoint import save_checkpoint
    from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
    from qwenlite.text.vocab import write_tokenizer_files
    from qwenlite.train.demo import build_stdlib_corpus
    from qwenlite.train.pretrain import init_weights, resolve_model_config
    from qwenlite.train.tokenizer_train import train_tokenizer

    build_stdlib_corpus(work / "corpus", corpus_bytes)
    if vocab == "real":
        write_tokenizer_files(work / "tokenizer")
        size = 248077
    else:
        size = train_tokenizer([work / "corpus" / "stdlib.jsonl"], int(vocab), work / "tokenizer").vocab_size
    if MODELS[model] is None:
        config = resolve_model_config(model, size)
    else:
        config = ModelConfig(vocab_size=size, mtp_num_hidden_layers=0, dtype="float32", **MODELS[model])
    net = Qwen3_5ForCausalLM(config)
    init_weights(net, seed=0)
    save_checkpoint(net, work / "init")
    print(f"{model}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, vocab {config.vocab_size}")


def windows(work: Path, args) -> list:
    """The training windows, (T + 1) tokens each, in qwenlite's batch order for the whole run."""
    from qwenlite.train.data import BatchIterator, pack_corpus, tokenize_corpus

    corpus = tokenize_corpus([work / "corpus" / "stdlib.jsonl"], work / "tokenizer", work / "cache", False)
    data, train, _ = pack_corpus(corpus, args.seq_len, 0.01)
    batches = BatchIterator(data, train, args.batch_size, seed=0)
    return [batches.next() for _ in range(args.steps)]


def run_qwenlite(work: Path, args) -> dict:
    import torch

    from qwenlite.config import load_config
    from qwenlite.train.pretrain import TrainConfig, pretrain

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, warmup=2,
                      val_fraction=0.01, eval_every=10**9, eval_sequences=1, save_every=10**9, log_every=1)  # fmt: skip
    out = work / "qwenlite"
    pretrain(load_config(work / "init"), [work / "corpus" / "stdlib.jsonl"], out, work / "tokenizer", cfg,
             cache_dir=work / "cache", device="cpu")  # fmt: skip
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    return {"tokens_per_s": [r["tokens_per_s"] for r in steps], "loss": [r["loss"] for r in steps]}


def run_transformers(work: Path, args) -> dict:
    import torch
    from torch.utils.data import IterableDataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    batches = windows(work, args)

    class Windows(IterableDataset):  # qwenlite's order; an iterable dataset is not reshuffled
        def __iter__(self):
            for batch in batches:
                for row in batch:
                    yield {"input_ids": row, "labels": row}  # the model shifts labels: T predictions

    class Clock(TrainerCallback):
        times, losses = [], []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    model = AutoModelForCausalLM.from_pretrained(work / "init", dtype=torch.float32, attn_implementation="sdpa")
    training = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    clock = Clock()
    Trainer(model=model, args=training, train_dataset=Windows(), callbacks=[clock]).train()
    tokens = args.batch_size * args.seq_len  # predicted tokens, as qwenlite counts them
    return {"tokens_per_s": [tokens / t for t in clock.times], "loss": clock.losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--vocab", default="real", help="'real' (Qwen3.5's) or a size to train")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--engine", choices=["qwenlite", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:  # a child: one engine, results as JSON on the last line
        work = Path(args.work)
        result = (run_qwenlite if args.engine == "qwenlite" else run_transformers)(work, args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.model, args.vocab, args.corpus_bytes)
        results = {}
        for engine in ("qwenlite", "transformers"):
            argv = [sys.executable, __file__, *sys.argv[1:], "--engine", engine, "--work", str(work)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
            results[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = args.batch_size * args.seq_len
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} = {tokens} tokens per step, "
          f"{args.threads} threads, {args.steps} steps (median after {WARMUP} warm-up steps)")  # fmt: skip
    speed = {e: statistics.median(r["tokens_per_s"][WARMUP:]) for e, r in results.items()}
    for engine, r in results.items():
        losses = r["loss"]
        print(f"  {engine:<12} {speed[engine]:>9,.0f} tokens/s   loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"  ratio qwenlite / transformers: {speed['qwenlite'] / speed['transformers']:.2f}")


if __name__ == "__main__":
    main()
