"""Pretraining from scratch: `TrainConfig` and one visible training loop, `pretrain`.

Weight initialisation: `init_weights(model, seed)` gives every tensor the model's documented initialisation
(`qwenlite.model.qwen3_5.initial_value`: projections, conv and embedding N(0, 0.02); zero-centred norms 0, plain
ones (Qwen3 / Qwen2) 1; biases 0; the gated norm's weight and dt_bias 1; A_log = log U(0.01, 16)), drawn in
state-dict order from a generator seeded with `seed`: the same numbers
`io.checkpoint.write_random_checkpoint(config, seed=seed)` writes. The tied head shares the embedding.

Output directory (OUT):
    config.json, model.safetensors            the latest checkpoint's weights (fp32), Hugging Face layout
    generation_config.json, tokenizer.json,   so that `qwenlite run OUT` and transformers'
    tokenizer_config.json, chat_template.jinja  AutoModelForCausalLM / AutoTokenizer load OUT as it is
    train_log.jsonl, loss_curve.png           one JSON record per logged step and per evaluation; the plot
    checkpoints/step_NNNNNNNN/                config.json, model.safetensors, optimizer.pt, trainer_state.pt
                                              (step, data position, RNG states), train_config.json
    token_cache/                              the tokenized corpus (see `qwenlite.train.data`)

A checkpoint is written whole into checkpoints/.tmp-step_N and renamed to step_N, then the newest
`keep_checkpoints` are kept and OUT's weights are re-pointed at it (hard link + rename), so a kill at any
moment leaves the last complete checkpoint, and a loadable OUT. `resume=True` continues from the newest
checkpoint: model, AdamW moments, step (the learning rate is a function of it), data position and RNG states
are restored, and the log is cut back to that step, so on CPU the run continues bit for bit as if never
stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qwenlite.config import ModelConfig, load_config, preset_config
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import copy_side_files, write_checkpoint
from qwenlite.io.files import atomic_write
from qwenlite.model.mtp import MTP
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.text.tokenizer import ENDOFTEXT, IM_END
from qwenlite.text.vocab import write_tokenizer_files
from qwenlite.train import common
from qwenlite.train import distributed as ddp
from qwenlite.train.data import BatchIterator, PackedSequences, held_out_batches, pack_corpus, tokenize_corpus
from qwenlite.train.moe import aux_loss_enabled, load_balancing_loss, recording_router_logits
from qwenlite.train.plots import plot_loss_curve

VOCAB_MULTIPLE = 256  # a preset's vocabulary is the tokenizer's rounded up to this (Qwen3.5: 248077 -> 248320)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; the learning-rate schedule spans them
    batch_size: int = 8  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step: global batch = batch_size * world_size * grad_accum
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at `steps`
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # on matrices (projections, embedding, conv), not on norms, A_log, dt_bias
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3 / nanoGPT pretraining's: a second moment that follows the changing gradient scale
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    val_fraction: float = 0.01  # share of the packed windows held out
    eval_every: int = 100  # steps between held-out evaluations (and one at the end)
    eval_sequences: int = 64  # held-out windows per evaluation (at most)
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0  # weights and data order
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    mtp: bool = False  # train a multi-token-prediction head with the model (the checkpoint's mtp.*)
    mtp_weight: float = 0.3  # its loss's weight in the objective, DeepSeek-V3's for most of its run

    def validate(self, model: ModelConfig | None = None) -> None:
        """Refuse settings out of range, and (given the model's config) paths not built for its family."""
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise QwenliteError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.keep_checkpoints < 1 or not 0 <= self.val_fraction < 1:
            raise QwenliteError("need lr > 0, warmup >= 0, keep_checkpoints >= 1 and 0 <= val_fraction < 1")
        if self.mtp and self.fsdp:
            raise QwenliteError("--mtp trains with DDP or in one process; FSDP does not shard the head yet")
        if self.mtp_weight < 0:
            raise QwenliteError(f"mtp_weight must be >= 0, got {self.mtp_weight}")
        if model is not None and self.mtp and model.dense:
            raise QwenliteError(
                f"--mtp: a {model.model_type} model has no multi-token-prediction head (transformers, vLLM and "
                "llama.cpp define none); Qwen3.5 and Qwen3.5 MoE have one"
            )
        if model is not None and self.fsdp and model.moe:
            raise QwenliteError(
                "--fsdp is not built for a mixture of experts yet (an expert that no token on a rank chose has no "
                "gradient there, which FSDP2's reduce-scatter needs): train it with DDP, without --fsdp"
            )


@dataclass
class PretrainResult:
    out_dir: Path
    step: int
    train_loss: float | None  # of the last step
    val_loss: float | None  # of the last evaluation
    tokens_per_second: float  # over this run's steps after the first (which pays for warm-up)
    num_parameters: int


# ---------------------------------------------------------------------------------------------
# Model and schedule


def resolve_model_config(spec: str | Path, tokenizer_vocab_size: int) -> ModelConfig:
    """A preset name (the vocabulary then follows the tokenizer, rounded up to a multiple of 256; no MTP head)
    or a config.json / checkpoint directory, used as written (its vocabulary must cover the tokenizer)."""
    path = Path(spec)
    if path.is_file() or path.is_dir():
        config = load_config(path.parent if path.is_file() else path)
    else:
        vocab = -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = preset_config(str(spec), vocab_size=vocab, mtp_num_hidden_layers=0, dtype="float32")
    if config.vocab_size < tokenizer_vocab_size:
        raise QwenliteError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer_vocab_size}"
        )
    return config


def init_weights(model: Qwen3_5ForCausalLM, seed: int) -> None:
    """The documented initialisation (module docstring), in place."""
    generator = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            tensor.copy_(initial_value(name, tuple(tensor.shape), generator, model.config.zero_centred_norms))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): `common.lr_at` over `cfg.steps`."""
    return common.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V) fp32, targets (B, T) -> cross-entropy (mean over tokens, or per sequence summed)."""
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none" if reduction == "sum" else "mean")
    return loss.view(targets.shape).sum(-1) if reduction == "sum" else loss


class WithMTP(torch.nn.Module):
    """The model and its multi-token-prediction head (the model's submodule `mtp`, so that its tensors are saved as
    the checkpoint's `mtp.*`) in one forward, as DDP needs: -> (the model's logits (B, T, V), the head's (B, T-1, V):
    at position t, from hidden state t and token t+1, the logits of token t+2)."""

    def __init__(self, model: Qwen3_5ForCausalLM):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.lm
        hidden = lm.model(input_ids)
        drafted = lm.mtp(lm, input_ids[:, 1:], hidden[:, :-1])
        return lm.lm_head(hidden).float(), lm.lm_head(drafted).float()


def training_loss(
    wrapped: torch.nn.Module, batch: torch.Tensor, cfg: TrainConfig, model: Qwen3_5ForCausalLM
) -> tuple[torch.Tensor, dict]:
    """batch (B, T + 1) -> (the objective, its parts): next-token cross-entropy ("loss"); with `cfg.mtp`, plus the
    head's cross-entropy on the token after next ("mtp_loss") weighted by `mtp_weight`; for a MoE whose config
    sets `output_router_logits`, plus the router's load-balancing loss ("aux_loss", train/moe.py) weighted by
    `router_aux_loss_coef`, as transformers' loss. `model`: the one `wrapped` runs, whose routers are read."""
    aux = aux_loss_enabled(model.config)
    with recording_router_logits(model) if aux else contextlib.nullcontext() as router_logits:
        out = wrapped(batch[:, :-1])
    if cfg.mtp:
        logits, drafted = out
        loss, mtp_loss = causal_lm_loss(logits, batch[:, 1:]), causal_lm_loss(drafted, batch[:, 2:])
        objective, parts = loss + cfg.mtp_weight * mtp_loss, {"loss": loss.detach(), "mtp_loss": mtp_loss.detach()}
    else:
        loss = objective = causal_lm_loss(out, batch[:, 1:])
        parts = {"loss": loss.detach()}
    if aux:
        aux_loss = load_balancing_loss(router_logits, model.config.num_experts_per_tok)
        objective = objective + model.config.router_aux_loss_coef * aux_loss
        parts["aux_loss"] = aux_loss.detach()
    return objective, parts


def loss_parts(cfg: TrainConfig, config: ModelConfig) -> tuple[str, ...]:
    """The parts of the objective that `training_loss` returns, logged each step."""
    return ("loss",) + ("mtp_loss",) * cfg.mtp + ("aux_loss",) * aux_loss_enabled(config)


@torch.no_grad()
def evaluate(model, data: PackedSequences, indices: np.ndarray, cfg: TrainConfig, env: ddp.DistEnv) -> float:
    """Mean held-out cross-entropy per token over `eval_sequences` held-out windows spread evenly over the corpus
    (the first ones would all come from its first files), computed by all ranks together."""
    if len(indices) > cfg.eval_sequences:
        indices = indices[np.linspace(0, len(indices) - 1, cfg.eval_sequences).round().astype(int)]
    totals = torch.zeros(2, dtype=torch.float64)
    for batch, weight in held_out_batches(data, indices, cfg.batch_size, env.rank, env.world_size):
        batch = batch.to(env.device)
        with autocast(env.device):
            logits = model(batch[:, :-1])
            logits = logits[0] if isinstance(logits, tuple) else logits  # WithMTP: the model's own
            per_sequence = causal_lm_loss(logits, batch[:, 1:], reduction="sum")
        totals += torch.stack([(per_sequence.double().cpu() * weight).sum(), weight.sum() * cfg.seq_len])
    totals = ddp.all_reduce_sum(totals.to(env.device), env).cpu()
    return (totals[0] / totals[1]).item()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The loop


def pretrain(
    model_config: ModelConfig,
    data: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer_dir: str | Path | None,
    cfg: TrainConfig,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    stop_at: int | None = None,
) -> PretrainResult:
    """Train `model_config` from scratch (or from OUT's newest checkpoint with `resume`) on the documents of
    `data`, tokenized with `tokenizer_dir` (None: the real Qwen3.5 tokenizer, written into OUT). `stop_at` ends
    this run after that step with a checkpoint, the schedule still spanning `cfg.steps` (a time-boxed job
    continues with `resume`). Under torchrun every rank calls this; rank 0 alone writes.

    The weights start from `init_weights(model, cfg.seed)`, the documented initialisation (module docstring).
    Each step: `grad_accum` micro-batches forward and backward (bf16 autocast on CUDA, fp32 on CPU), gradients
    clipped to `grad_clip`, one AdamW step at `lr_at(step)`; then logging, held-out evaluation and
    checkpointing at their intervals."""
    cfg.validate(model_config)
    out = Path(out_dir)
    env = ddp.init_distributed(device)
    try:
        run = setup_pretrain(model_config, data, out, tokenizer_dir, cfg, resume, cache_dir, env)
        result = _pretrain(run, out, cfg, env, stop_at)
    except BaseException:
        ddp.shutdown(env, wait_for_others=False)  # the others may be inside a collective that never completes
        raise
    ddp.shutdown(env)
    return result


def _pretrain(run: PretrainState, out: Path, cfg: TrainConfig, env: ddp.DistEnv, stop_at: int | None) -> PretrainResult:
    """The loop (see `pretrain`), after `setup_pretrain`."""
    model, wrapped, optimizer, batches = run.model, run.wrapped, run.optimizer, run.batches
    last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    step = run.step
    train_loss = val_loss = None
    clock = Throughput(run.tokens_per_step, first_step=step)
    # The logged loss is the mean over the steps since the last log; a checkpoint keeps a partial window.
    parts = loss_parts(cfg, model.config)
    window_loss = torch.tensor([run.log_window.get(f"{p}_sum", 0.0) for p in parts], device=env.device)
    window_steps = run.log_window["steps"]
    while step < last:
        clock.step_begins()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = batches.next().to(env.device)  # (B, T + 1)
            with ddp.gradient_sync(wrapped, enabled=micro == cfg.grad_accum - 1):
                with autocast(env.device):
                    loss, losses = training_loss(wrapped, batch, cfg, model)
                (loss / cfg.grad_accum).backward()
            window_loss += torch.stack([losses[p] for p in parts]) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        clock.steps += 1

        # Logs and evaluations follow cfg.steps, not `last`: a run stopped and resumed logs what one run would.
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = (ddp.all_reduce_sum(window_loss, env) / env.world_size / window_steps).tolist()
            train_loss = means[0]
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            record = {"step": step, **dict(zip(parts, means, strict=True)), "lr": lr, "grad_norm": norm.item(),
                      "tokens_per_s": clock.lap(step), "tokens": step * run.tokens_per_step,
                      "epoch": round(batches.epoch, 4)}  # fmt: skip
            _log(env, run.log_path, record, cfg)
            window_loss.zero_()
            window_steps = 0
        if len(run.val_idx) and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_loss = evaluate(wrapped, run.packed, run.val_idx, cfg, env)
            _log(env, run.log_path, {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, cfg)
            clock.drop_lap()
        if step % cfg.save_every == 0 or step == last:
            # The partial window as its mean over ranks, so that every rank resumes with the same share.
            sums = (ddp.all_reduce_sum(window_loss, env) / env.world_size).tolist()
            window = {**{f"{p}_sum": v for p, v in zip(parts, sums, strict=True)}, "steps": window_steps}
            save_training_checkpoint(out, step, model, optimizer, batches, cfg, run.data_fingerprint, window, env)
            clock.drop_lap()

    return PretrainResult(out, step, train_loss, val_loss, clock.run_rate(), run.num_parameters)


# ---------------------------------------------------------------------------------------------
# Setup and bookkeeping


@dataclass
class PretrainState:
    """What the loop starts from (`setup_pretrain`)."""

    model: Qwen3_5ForCausalLM  # fp32 master weights
    wrapped: torch.nn.Module  # what the loop calls: DDP around the model, the model sharded by FSDP2, or the model
    optimizer: torch.optim.AdamW
    batches: BatchIterator  # at the data position to continue from
    packed: PackedSequences
    val_idx: np.ndarray  # the held-out windows
    data_fingerprint: dict  # recorded in each checkpoint: a resume on other data or packing is refused
    step: int  # optimizer steps already taken: 0, or the resumed checkpoint's
    log_window: dict  # the resumed checkpoint's partial logging window: {"loss_sum" (and the other parts'), "steps"}
    tokens_per_step: int  # over all ranks
    num_parameters: int
    log_path: Path


def setup_pretrain(
    model_config: ModelConfig,
    data: Sequence[str | Path],
    out: Path,
    tokenizer_dir: str | Path | None,
    cfg: TrainConfig,
    resume: bool,
    cache_dir: str | Path | None,
    env: ddp.DistEnv,
) -> PretrainState:
    """Tokenize and pack the corpus, build the initialised model and its optimizer, restore OUT's newest
    checkpoint (with `resume`; without, an existing run is an error) and prepare OUT (rank 0)."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise QwenliteError(
            f"{out} already holds a training run ({checkpoint.relative_to(out)}); pass --resume to continue it "
            "or choose another --out"
        )
    if tokenizer_dir is None:
        tokenizer_dir = out
        if not (out / "tokenizer.json").is_file():
            _on_main_first(env, lambda: write_tokenizer_files(out) if env.is_main else None)
    tokenizer_dir = Path(tokenizer_dir)
    cache = Path(cache_dir or out / "token_cache")
    corpus = _on_main_first(env, lambda: tokenize_corpus(data, tokenizer_dir, cache, show_progress=env.is_main))
    packed, train_idx, val_idx = pack_corpus(corpus, cfg.seq_len, cfg.val_fraction)
    if corpus.eos_id >= model_config.vocab_size:
        raise QwenliteError(
            f"the tokenizer in {tokenizer_dir} does not fit the model's vocab_size {model_config.vocab_size}"
        )
    # fp32 master weights; the config claims a multi-token-prediction head only where one is trained.
    model_config = dataclasses.replace(
        model_config, eos_token_id=corpus.eos_id, dtype="float32", mtp_num_hidden_layers=int(cfg.mtp)
    )
    data_fingerprint = {"tokens_sha256": corpus.sha256, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
                        "seed": cfg.seed}  # fmt: skip

    torch.manual_seed(cfg.seed)
    model = Qwen3_5ForCausalLM(model_config)
    if cfg.mtp:
        model.mtp = MTP(model_config)  # a submodule: saved, restored and optimised with the model's tensors
    init_weights(model, cfg.seed)
    model.to(env.device).train()
    num_parameters = sum(p.numel() for p in model.parameters())
    wrapped = ddp.wrap_model(WithMTP(model) if cfg.mtp else model, env, cfg.fsdp)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    batches = BatchIterator(packed, train_idx, cfg.batch_size, cfg.seed, env.rank, env.world_size)
    step, window = 0, {"steps": 0}
    log_path = out / "train_log.jsonl"
    if checkpoint is not None:
        step, window = load_training_checkpoint(checkpoint, model, optimizer, batches, model_config, data_fingerprint)
        _say(env, f"resuming from {checkpoint} (step {step})")
    if env.is_main:
        _prepare_out_dir(out, tokenizer_dir, corpus.eos_id, model_config.vocab_size)
        truncate_log(log_path, step)
    ddp.barrier(env)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world_size
    windows = f"{len(train_idx)} training and {len(val_idx)} held-out windows of {cfg.seq_len}"
    _say(env, f"{num_parameters / 1e6:.2f}M parameters | {len(corpus.tokens):,} tokens, {windows} | "
              f"{tokens_per_step:,} tokens per step")  # fmt: skip
    return PretrainState(model, wrapped, optimizer, batches, packed, val_idx, data_fingerprint, step, window,
                         tokens_per_step, num_parameters, log_path)  # fmt: skip


@dataclass
class Throughput:
    """Tokens per second of training alone. A lap runs from the first step after a log, an evaluation or a
    checkpoint (whose time is not training time) to the next log; the run's rate leaves out the lap that holds
    its first step, which pays for warm-up."""

    tokens_per_step: int
    first_step: int  # steps taken before this run (a resumed one)
    steps: int = 0  # in the current lap
    start: float = 0.0
    tokens: int = 0  # over the counted laps of this run
    seconds: float = 0.0

    def step_begins(self) -> None:
        if self.steps == 0:
            self.start = time.perf_counter()

    def lap(self, step: int) -> float:
        """End the current lap after `step` (a log line); returns its tokens per second."""
        seconds = time.perf_counter() - self.start
        if step - self.steps > self.first_step:
            self.tokens, self.seconds = self.tokens + self.steps * self.tokens_per_step, self.seconds + seconds
        rate = self.steps * self.tokens_per_step / seconds
        self.steps = 0
        return rate

    def drop_lap(self) -> None:
        """After an evaluation or a checkpoint: the steps since the last log stay untimed."""
        self.steps = 0

    def run_rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _say(env: ddp.DistEnv, message: str) -> None:
    if env.is_main:
        print(message, file=sys.stderr, flush=True)


def _log(env: ddp.DistEnv, path: Path, record: dict, cfg: TrainConfig) -> None:
    if not env.is_main:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if "val_loss" in record:
        line = f"step {record['step']:>6} | held-out loss {record['val_loss']:.4f} | ppl {record['val_ppl']:.2f}"
    else:
        line = (f"step {record['step']:>6}/{cfg.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s")  # fmt: skip
    print(line, file=sys.stderr, flush=True)


def _on_main_first(env: ddp.DistEnv, fn):
    """Run fn on rank 0, then on the others: an error on rank 0 is raised on every rank instead of leaving
    them waiting."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = ddp.broadcast_object(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    if message is not None:
        raise QwenliteError(f"rank 0 failed: {message}")
    return result if env.is_main else fn()


def _prepare_out_dir(out: Path, tokenizer_dir: Path, eos_id: int, vocab_size: int) -> None:
    """The tokenizer's side files (`io.checkpoint.SIDE_FILES`) and our own generation_config.json beside the
    weights, so that OUT loads as a checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir.resolve() != out.resolve():  # the default tokenizer is written into OUT itself
        copy_side_files(tokenizer_dir, out)  # a generation_config.json among them is replaced below
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    stops = [i for i in (ids.get(IM_END), ids.get(ENDOFTEXT, eos_id)) if i is not None and i < vocab_size]
    generation = {"eos_token_id": stops, "pad_token_id": eos_id, "do_sample": True, "temperature": 0.8,
                  "top_p": 0.95}  # fmt: skip
    atomic_write(out / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2)))


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: only a fully written one carries a step_N name."""
    found = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def save_training_checkpoint(
    out: Path,
    step: int,
    model: Qwen3_5ForCausalLM,
    optimizer: torch.optim.Optimizer,
    batches: BatchIterator,
    cfg: TrainConfig,
    data_fingerprint: dict,
    log_window: dict,
    env: ddp.DistEnv,
) -> None:
    """Gather full state on every rank; rank 0 writes it into a temporary directory and renames it into place,
    prunes old checkpoints, points OUT's weights at the new one and redraws the loss curve."""
    model_state = ddp.full_model_state(model)
    optim_state = ddp.full_optimizer_state(model, optimizer)
    if not env.is_main:
        return _on_main_first(env, lambda: None)

    def write() -> None:
        root = out / "checkpoints"
        final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
        if final.exists():  # the same step again (a finished run resumed): already on disk
            return
        for stale in root.glob(".tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        try:
            tensors = {
                k: v for k, v in model_state.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")
            }
            write_checkpoint(model.config, tmp, tensors.items(), torch.float32)
            torch.save(optim_state, tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            trainer = {"step": step, "data": batches.state_dict(), "data_fingerprint": data_fingerprint, "rng": rng,
                       "log_window": log_window, "world_size": env.world_size}  # fmt: skip
            torch.save(trainer, tmp / "trainer_state.pt")
            (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(root.glob("step_*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
        for name in ("model.safetensors", "config.json"):
            _link_or_copy(final / name, out / name)
        if (out / "train_log.jsonl").is_file():
            plot_loss_curve(out / "train_log.jsonl", out / "loss_curve.png")

    _on_main_first(env, write)


def _link_or_copy(source: Path, target: Path) -> None:
    """Atomically make `target` the same file as `source` (a hard link; a copy where links are not allowed)."""

    def place(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(target, place)


def load_training_checkpoint(
    path: Path,
    model: Qwen3_5ForCausalLM,
    optimizer: torch.optim.Optimizer,
    batches: BatchIterator,
    model_config: ModelConfig,
    data_fingerprint: dict,
) -> tuple[int, dict]:
    """Restore everything `save_training_checkpoint` wrote; returns the step to continue from and the partial
    logging window."""
    saved = load_config(path)
    if dataclasses.replace(saved, dtype="float32").to_dict() != model_config.to_dict():
        raise QwenliteError(f"{path}/config.json describes another model than --config; resume with the same config")
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    if trainer["data_fingerprint"] != data_fingerprint:
        raise QwenliteError(
            f"{path} was trained on other data or packing ({trainer['data_fingerprint']}, now {data_fingerprint}); "
            "resume with the same --data, tokenizer, --seq-len and --seed"
        )
    state = load_file(str(path / "model.safetensors"))
    if model_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    optim_state = torch.load(path / "optimizer.pt", weights_only=True)
    ddp.load_full_state(model, optimizer, state, optim_state)
    batches.load_state_dict(trainer["data"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return int(trainer["step"]), trainer.get("log_window", {"steps": 0})
