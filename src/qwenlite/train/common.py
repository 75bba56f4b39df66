"""What pretraining, SFT and DPO share: the learning-rate schedule (`lr_at`) and the optimizer (`make_optimizer`);
and the step loop SFT and DPO share (`run_steps`), with its settings (`TrainSettings`).

Pretraining keeps its own loop in `pretrain.py`: it adds data parallelism, held-out evaluation and checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Fine-tuning keeps AdamW's default beta2, as the Hugging Face Trainer does; pretraining uses 0.95 (TrainConfig).
FINE_TUNING_BETAS = (0.9, 0.999)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup_steps`, then a cosine from `lr`
    down to `lr * min_lr_ratio` at `total_steps` (the Hugging Face Trainer's get_cosine_schedule_with_warmup, with
    a floor), and the floor after it."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    low = lr * min_lr_ratio
    return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices (projections, embedding, conv) only: not
    on norms, biases and the per-head gate constants A_log and dt_bias (1-D tensors), as usual."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head is listed once
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel exists on CPU too, and is ~5x faster there than the multi-tensor one.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


# ---------------------------------------------------------------------------------------------
# The SFT / DPO loop


@dataclass
class TrainSettings:
    """Optimisation settings shared by SFT and DPO. One step is `grad_accum` micro-batches of `batch_size`."""

    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping, as in pretraining and the Hugging Face Trainer
    max_len: int = 4096  # longer examples are cut (their tail is lost)
    seed: int = 0
    log_every: int = 1
    dtype: str = "float32"  # training dtype of the weights; the output keeps the checkpoint's dtype
    device: str = "cpu"

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(n_examples * self.epochs / per_step))


Logger = Callable[[dict], None]  # receives each step's record
# One optimizer step's micro-batches, forward and backward: returns the record's own fields (loss, ...) and the
# number of tokens it ran through the model (for throughput).
StepFn = Callable[[], tuple[dict, int]]


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    s: TrainSettings,
    total_steps: int,
    train_step: StepFn,
    log: Logger,
) -> list[dict]:
    """`total_steps` optimizer steps, each: the learning rate of `lr_at(step)`, `train_step()` (the micro-batches),
    gradients clipped to `max_grad_norm`, one AdamW step. Returns one record per step; logs every `log_every`
    steps and the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    history = []
    t0 = time.perf_counter()
    tokens = 0
    for step in range(total_steps):
        lr = lr_at(step, total_steps, s.lr, s.warmup_steps, s.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        fields, step_tokens = train_step()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm or math.inf).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens += step_tokens
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, **fields, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": round(tokens / elapsed, 1), "elapsed_s": round(elapsed, 2)}  # fmt: skip
        history.append(record)
        if (step + 1) % s.log_every == 0 or step + 1 == total_steps:
            log(record)
    return history
