"""`qwenlite train sft|dpo|merge-lora`: argument parsing only; the work is in sft.py, dpo.py and lora.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.train.lora import DEFAULT_TARGETS
from qwenlite.train.posttrain import LoRASettings, TrainSettings

SFT_HELP = """Fine-tune MODEL on chat conversations, loss on assistant tokens only.
DATA is JSONL, one conversation per line: {"messages": [...], "tools": [...]} (tools optional), messages in the
OpenAI shape (roles system/user/assistant/tool; assistant turns may carry reasoning_content and tool_calls).
Conversations are rendered with MODEL's own chat template. OUT receives a checkpoint (full fine-tuning) or a
PEFT adapter (--lora R; with --merge also the merged checkpoint in OUT/merged)."""

DPO_HELP = """Preference-tune MODEL with DPO (sigmoid loss) against the frozen starting model.
DATA is JSONL, one pair per line: {"prompt": ..., "chosen": ..., "rejected": ..., "tools": [...]} where prompt is a
string (one user turn) or a list of messages, and chosen / rejected are each a string (one assistant turn), an
assistant message or a list of messages continuing the prompt."""


def _add_common(p: argparse.ArgumentParser, default_lr: str) -> None:
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
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--max-len", type=int, default=4096, help="tokens per example; longer ones are cut (default 4096)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="training dtype of the weights")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=1)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", type=int, metavar="R", help="train rank-R LoRA adapters instead of all weights")
    g.add_argument("--lora-alpha", type=float, help="scale numerator (default 2R)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument(
        "--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated layer names (default: %(default)s)"
    )
    g.add_argument("--merge", action="store_true", help="also write base + adapter merged, to OUT/merged")


def add_post_train_commands(train_subparsers) -> None:
    """Add `sft`, `dpo` and `merge-lora` to the `qwenlite train` sub-commands."""
    sft = train_subparsers.add_parser("sft", help="supervised fine-tuning on chat data", description=SFT_HELP)
    _add_common(sft, "1e-5, 2e-4 with --lora")
    sft.set_defaults(func=cmd_sft)

    dpo = train_subparsers.add_parser("dpo", help="preference tuning (DPO) on chosen/rejected pairs",
                                      description=DPO_HELP)  # fmt: skip
    _add_common(dpo, "5e-7, 5e-6 with --lora")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default 0.1)")
    dpo.set_defaults(func=cmd_dpo)

    merge = train_subparsers.add_parser("merge-lora", help="fold a LoRA adapter into its base checkpoint")
    merge.add_argument("--model", required=True, help="base checkpoint directory or hub id")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory")
    merge.add_argument("--out", required=True, help="output checkpoint directory")
    merge.set_defaults(func=cmd_merge_lora)


def _settings(args: argparse.Namespace, lr_full: float, lr_lora: float) -> tuple[TrainSettings, LoRASettings | None]:
    for flag in ("batch_size", "grad_accum", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            raise QwenliteError(f"--{flag.replace('_', '-')} must be at least 1")
    lora = None
    if args.lora is not None:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoRASettings(args.lora, args.lora_alpha, args.lora_dropout, targets, args.merge)
    elif args.merge:
        raise QwenliteError("--merge needs --lora")
    lr = args.lr if args.lr is not None else (lr_lora if lora else lr_full)
    settings = TrainSettings(
        lr=lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        max_len=args.max_len, seed=args.seed, log_every=args.log_every, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    return settings, lora


def cmd_sft(args: argparse.Namespace) -> int:
    from qwenlite.hub import resolve_model_path
    from qwenlite.train.sft import train_sft

    settings, lora = _settings(args, 1e-5, 2e-4)
    train_sft(resolve_model_path(args.model), args.data, args.out, settings, lora)
    print(f"wrote {'the adapter' if lora else 'the checkpoint'} to {args.out}", file=sys.stderr)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from qwenlite.hub import resolve_model_path
    from qwenlite.train.dpo import train_dpo

    settings, lora = _settings(args, 5e-7, 5e-6)
    train_dpo(resolve_model_path(args.model), args.data, args.out, settings, lora, beta=args.beta)
    print(f"wrote {'the adapter' if lora else 'the checkpoint'} to {args.out}", file=sys.stderr)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from qwenlite.hub import resolve_model_path
    from qwenlite.train.lora import load_adapter, merge_lora
    from qwenlite.train.posttrain import copy_tokenizer_files
    from qwenlite.weights import load_checkpoint, save_checkpoint

    base = resolve_model_path(args.model)
    ckpt = load_checkpoint(base, dtype="float32")  # merge in fp32, save in the checkpoint's dtype
    load_adapter(ckpt.model, args.adapter)
    merge_lora(ckpt.model)
    out = Path(args.out)
    save_checkpoint(ckpt.model.to(ckpt.config.torch_dtype), out, extra_tensors=ckpt.mtp)
    copy_tokenizer_files(base, out)
    print(f"wrote the merged checkpoint to {out}", file=sys.stderr)
    return 0
