"""What pretraining, SFT and DPO share: the learning-rate schedule (`lr_at`) and the optimizer (`make_optimizer`)."""

from __future__ import annotations

import math

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
