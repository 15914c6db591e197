"""The learning-rate schedule every loop of the package shares: linear warm-up, then cosine decay.

With peak rate lr, W warm-up steps, a horizon of T steps and a floor ratio r, step s (0-based) runs at

    lr * (s + 1) / W                                         for s < W
    lr * (r + (1 - r) * (1 + cos(pi * min(1, (s - W) / (T - W)))) / 2)    otherwise

transformers' `get_cosine_with_min_lr_schedule_with_warmup` is the same cosine but differs at both ends: it
runs the first step at lr 0 (s / W), and past the horizon the cosine rises again. We keep ours because a run
extended beyond `lr_decay_steps` must stay at the floor, and because the shipped model
(`scripts/pretrain_tiny.py`) and the measured tables were made with it.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule above on `optimizer`, stepped once per optimizer step."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
