"""`qwenlite train tokenizer|pretrain|demo`: argument parsing only; the work is in the library functions.

`add_train_commands(sub)` adds `train` to the top-level subparsers and returns the `train` subparsers, so that
post-training commands (sft, dpo) are added beside these by their own module. Under torchrun every rank runs
the same command line: `torchrun --nproc-per-node 2 -m qwenlite.cli train pretrain ...`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwenlite.tokenizer import QWEN35_SPECIAL_START_ID, QWEN35_SPECIAL_TOKENS
from qwenlite.train.pretrain import TrainConfig

QWEN35_VOCAB_SIZE = QWEN35_SPECIAL_START_ID + len(QWEN35_SPECIAL_TOKENS)  # 248077

PRETRAIN_HELP = """Pretrain a Qwen3.5-architecture model from scratch on .txt/.md (one document per file), .jsonl
("text" field per line) or .parquet ("text" column) files. OUT becomes a Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer, generation_config.json) updated at every checkpoint, with
train_log.jsonl, loss_curve.png and the resumable checkpoints under OUT/checkpoints."""


def add_train_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    train = subparsers.add_parser("train", help="train tokenizers and models", description="Train and post-train.")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")

    tok = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Train a byte-level BPE tokenizer with Qwen3.5's pre-tokenizer, normaliser and special tokens.",
    )
    tok.add_argument("--data", nargs="+", required=True, metavar="PATH", help=".txt/.md/.jsonl/.parquet files or dirs")
    tok.add_argument("--vocab-size", type=int, default=8192, help="ids in all, special tokens included (default 8192)")
    tok.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    tok.add_argument("--out", required=True, metavar="DIR")
    tok.set_defaults(func=cmd_train_tokenizer)

    pre = sub.add_parser("pretrain", help="pretrain a model from scratch", description=PRETRAIN_HELP)
    pre.add_argument("--config", required=True, help="preset (tiny, qwen3.5-0.8b, ...) or a config.json path")
    pre.add_argument("--data", nargs="+", required=True, metavar="PATH", help=".txt/.md/.jsonl/.parquet files or dirs")
    pre.add_argument("--out", required=True, metavar="DIR")
    pre.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the Qwen3.5 tokenizer)")
    d = TrainConfig()
    g = pre.add_argument_group("training (defaults in brackets)")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps [{d.steps}]")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per process [{d.batch_size}]")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence [{d.seq_len}]")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help=f"micro-steps per step [{d.grad_accum}]")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup steps [{d.warmup}]")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"[{d.weight_decay}]")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off [{d.grad_clip}]")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help=f"held out [{d.val_fraction}]")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help=f"[{d.eval_every}]")
    g.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help=f"windows [{d.eval_sequences}]")
    g.add_argument("--save-every", type=int, default=d.save_every, help=f"[{d.save_every}]")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help=f"[{d.keep_checkpoints}]")
    g.add_argument("--log-every", type=int, default=d.log_every, help=f"[{d.log_every}]")
    g.add_argument("--seed", type=int, default=d.seed, help=f"weights and data order [{d.seed}]")
    g.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    g.add_argument("--stop-at", type=int, metavar="STEP", help="end this run after STEP (continue later with --resume)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--cache-dir", metavar="DIR", help="token cache (default OUT/token_cache)")
    pre.set_defaults(func=cmd_pretrain)

    demo = sub.add_parser(
        "demo",
        help="the whole path on this CPU: corpus, tokenizer, pretraining, evaluation (~30 min)",
        description="Pretrain a small Qwen3.5-architecture model on the Python standard library's own source and "
        "documentation (PSF License), then evaluate it and sample from it. --quick: about a minute.",
    )
    demo.add_argument("--out", required=True, metavar="DIR")
    demo.add_argument("--quick", action="store_true", help="a small run (about a minute), for a smoke test")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in OUT")
    demo.set_defaults(func=cmd_demo)
    return sub


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from qwenlite.train.tokenizer_train import train_tokenizer

    tok = train_tokenizer(args.data, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote a tokenizer of {tok.vocab_size} ids to {args.out}", file=sys.stderr)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from qwenlite.train.data import load_tokenizer_for_data
    from qwenlite.train.pretrain import pretrain, resolve_model_config

    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, val_fraction=args.val_fraction,
        eval_every=args.eval_every, eval_sequences=args.eval_sequences, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, seed=args.seed, fsdp=args.fsdp,
    )  # fmt: skip
    vocab = load_tokenizer_for_data(args.tokenizer)[0].get_vocab_size() if args.tokenizer else QWEN35_VOCAB_SIZE
    config = resolve_model_config(args.config, vocab)
    result = pretrain(
        config, args.data, args.out, args.tokenizer, cfg,
        resume=args.resume, cache_dir=args.cache_dir, device=args.device, stop_at=args.stop_at,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        held_out = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"step {result.step}{held_out}: checkpoint in {Path(args.out)}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qwenlite.train.demo import run_demo

    run_demo(args.out, quick=args.quick, resume=args.resume)
    return 0
