"""`qwenlite train tokenizer|pretrain|demo|sft|dpo|mtp|merge-lora`: argument parsing only; the work is in train/.

The optimisation flags are the Hugging Face Trainer's (`--max-steps`, `--warmup-steps`, `--max-grad-norm`) in
every command; pretraining's older `--steps`, `--warmup` and `--grad-clip` stay as aliases for one release.
Under torchrun every rank runs the same command line: `torchrun --nproc-per-node 2 -m qwenlite.cli train ...`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.text.vocab import QWEN35_SPECIAL_START_ID, QWEN35_SPECIAL_TOKENS
from qwenlite.train.common import TrainSettings
from qwenlite.train.lora import DEFAULT_TARGETS
from qwenlite.train.posttrain import LoRASettings
from qwenlite.train.pretrain import TrainConfig

QWEN35_VOCAB_SIZE = QWEN35_SPECIAL_START_ID + len(QWEN35_SPECIAL_TOKENS)  # 248077

PRETRAIN_HELP = """Pretrain a Qwen3.5-architecture model from scratch on .txt/.md (one document per file), .jsonl
("text" field per line) or .parquet ("text" column) files. OUT becomes a Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer, generation_config.json) updated at every checkpoint, with
train_log.jsonl, loss_curve.png and the resumable checkpoints under OUT/checkpoints."""


MTP_HELP = """Fit MODEL's multi-token-prediction head (the drafter of --speculate) to MODEL as it is now, e.g. after
fine-tuning, by self-distillation: at each assistant position of DATA (SFT's JSONL) the head learns the
distribution MODEL gives for the token after next (KL), MODEL frozen. With --generate N the contexts are MODEL's own
answers to DATA's prompts. OUT receives the checkpoint with the new mtp.* tensors (and MODEL's vision tower,
unchanged, where it has one)."""

SFT_HELP = """Fine-tune MODEL on chat conversations, loss on assistant tokens only.
DATA is JSONL, one conversation per line: {"messages": [...], "tools": [...]} (tools optional), messages in the
OpenAI shape (roles system/user/assistant/tool; assistant turns may carry reasoning_content and tool_calls).
Conversations are rendered with MODEL's own chat template. A user message's content may hold OpenAI image parts,
{"type": "image_url", "image_url": {"url": ...}}, and video parts, {"type": "video_url", "video_url": {"url": ...}},
the url a base64 data: URL or a file path relative to DATA's folder; MODEL's vision tower reads them, frozen unless
--train-vision. OUT receives a checkpoint (full fine-tuning, with the tower) or a PEFT adapter (--lora R; with
--merge also the merged checkpoint in OUT/merged)."""

DPO_HELP = """Preference-tune MODEL with DPO (sigmoid loss) against the frozen starting model.
DATA is JSONL, one pair per line: {"prompt": ..., "chosen": ..., "rejected": ..., "tools": [...]} where prompt is a
string (one user turn) or a list of messages, and chosen / rejected are each a string (one assistant turn), an
assistant message or a list of messages continuing the prompt."""


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
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
    g.add_argument(
        "--max-steps", "--steps", dest="steps", type=int, default=d.steps, help=f"optimizer steps [{d.steps}]"
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per process [{d.batch_size}]")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence [{d.seq_len}]")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help=f"micro-steps per step [{d.grad_accum}]")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--warmup-steps", "--warmup", dest="warmup", type=int, default=d.warmup,
                   help=f"linear warmup steps [{d.warmup}]")  # fmt: skip
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"[{d.weight_decay}]")
    g.add_argument("--max-grad-norm", "--grad-clip", dest="grad_clip", type=float, default=d.grad_clip,
                   help=f"max gradient norm, 0 = off [{d.grad_clip}]")  # fmt: skip
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
    g.add_argument("--mtp", action="store_true",
                   help="also train a multi-token-prediction head (mtp.*), the drafter of --speculate")  # fmt: skip
    g.add_argument(
        "--mtp-weight", type=float, default=d.mtp_weight, help=f"its loss's weight in the objective [{d.mtp_weight}]"
    )
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

    sft = sub.add_parser("sft", help="supervised fine-tuning on chat data", description=SFT_HELP)
    _add_post_training_flags(sft, "1e-5, 2e-4 with --lora")
    sft.add_argument("--train-vision", action="store_true",
                     help="train the vision tower's weights too (default: frozen; not with --lora)")  # fmt: skip
    sft.set_defaults(func=cmd_sft)

    dpo = sub.add_parser("dpo", help="preference tuning (DPO) on chosen/rejected pairs", description=DPO_HELP)
    _add_post_training_flags(dpo, "5e-7, 5e-6 with --lora")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default 0.1)")
    dpo.set_defaults(func=cmd_dpo)

    mtp = sub.add_parser("mtp", help="fit the multi-token-prediction head to the model (self-distillation)",
                         description=MTP_HELP)  # fmt: skip
    _add_post_training_flags(mtp, "1e-3", lora=False)
    mtp.add_argument("--init", choices=["checkpoint", "random"], default="checkpoint",
                     help="start from the checkpoint's head (default, when it has one) or a new one")  # fmt: skip
    mtp.add_argument("--generate", type=int, default=0, metavar="N",
                     help="train on the model's own greedy answers (up to N tokens) to the data's prompts")  # fmt: skip
    mtp.set_defaults(func=cmd_mtp)

    merge = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base checkpoint")
    merge.add_argument("--model", required=True, help="base checkpoint directory or hub id")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory")
    merge.add_argument("--out", required=True, help="output checkpoint directory")
    merge.set_defaults(func=cmd_merge_lora)


def _add_post_training_flags(p: argparse.ArgumentParser, default_lr: str, lora: bool = True) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {default_lr})")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping (default 1)")
    g.add_argument("--max-len", type=int, default=4096, help="tokens per example; longer ones are cut (default 4096)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="training dtype of the weights")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=1)
    if not lora:
        return
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", type=int, metavar="R", help="train rank-R LoRA adapters instead of all weights")
    g.add_argument("--lora-alpha", type=float, help="scale numerator (default 2R)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated layer names (default: %(default)s); a MoE's routed experts are never adapted",
    )
    g.add_argument("--merge", action="store_true", help="also write base + adapter merged, to OUT/merged")


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
        mtp=args.mtp, mtp_weight=args.mtp_weight,
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


def _settings(args: argparse.Namespace, lr_full: float, lr_lora: float) -> tuple[TrainSettings, LoRASettings | None]:
    for flag in ("batch_size", "grad_accum", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            raise QwenliteError(f"--{flag.replace('_', '-')} must be at least 1")
    lora = None
    if getattr(args, "lora", None) is not None:  # `train mtp` has no LoRA flags
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoRASettings(args.lora, args.lora_alpha, args.lora_dropout, targets, args.merge)
    elif getattr(args, "merge", False):
        raise QwenliteError("--merge needs --lora")
    lr = args.lr if args.lr is not None else (lr_lora if lora else lr_full)
    settings = TrainSettings(
        lr=lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        max_len=args.max_len, seed=args.seed, log_every=args.log_every, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    return settings, lora


def cmd_sft(args: argparse.Namespace) -> int:
    from qwenlite.io.hub import resolve_model_path
    from qwenlite.train.sft import train_sft

    settings, lora = _settings(args, 1e-5, 2e-4)
    train_sft(resolve_model_path(args.model), args.data, args.out, settings, lora, train_vision=args.train_vision)
    print(f"wrote {'the adapter' if lora else 'the checkpoint'} to {args.out}", file=sys.stderr)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from qwenlite.io.hub import resolve_model_path
    from qwenlite.train.dpo import train_dpo

    settings, lora = _settings(args, 5e-7, 5e-6)
    train_dpo(resolve_model_path(args.model), args.data, args.out, settings, lora, beta=args.beta)
    print(f"wrote {'the adapter' if lora else 'the checkpoint'} to {args.out}", file=sys.stderr)
    return 0


def cmd_mtp(args: argparse.Namespace) -> int:
    from qwenlite.io.hub import resolve_model_path
    from qwenlite.train.mtp import train_mtp

    settings, _ = _settings(args, 1e-3, 1e-3)
    if args.generate < 0:
        raise QwenliteError(f"--generate must be >= 0, got {args.generate}")
    train_mtp(resolve_model_path(args.model), args.data, args.out, settings, args.init, args.generate)
    print(f"wrote the checkpoint with its fitted MTP head to {args.out}", file=sys.stderr)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from qwenlite.io.checkpoint import load_checkpoint
    from qwenlite.io.hub import resolve_model_path
    from qwenlite.train.lora import load_adapter, merge_lora
    from qwenlite.train.posttrain import save_model

    base = resolve_model_path(args.model)
    # Merged in fp32, saved in the checkpoint's dtype, with the vision tower where it has one.
    ckpt = load_checkpoint(base, dtype="float32", vision=True)
    load_adapter(ckpt.model, args.adapter)
    merge_lora(ckpt.model)
    out = Path(args.out)
    save_model(ckpt, out)
    print(f"wrote the merged checkpoint to {out}", file=sys.stderr)
    return 0
