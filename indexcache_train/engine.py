"""The optimizer side of a distillation run: DeepSpeed's engine around an `IndexerDistillation`, with the
trainer's AdamW and warm-up + cosine, and one optimizer step of it.

`indexcache-train` and `scripts/reproduce_table.py` both run their steps through these functions, so that a
script's distillation is the trainer's. Each function reads a composed train config (`config.compose_config`
gives one for a script): `data.batch_size`, the `trainer` section and the `deepspeed` section.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from .distill import IndexerDistillation
from .optim import warmup_cosine
from .runtime import all_ranks_finite, mean_over_ranks
from .zero import zero_settings


def uses_bf16(cfg: DictConfig, device: torch.device) -> bool:
    """deepspeed.bf16: auto is bf16 on a GPU, fp32 on a CPU."""
    return device.type == "cuda" if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)


def deepspeed_config(cfg: DictConfig, bf16: bool) -> dict:
    """The DeepSpeed JSON, with `deepspeed.config` merged in last (recursively, so that one nested key does
    not replace its section). No optimizer is named in it (a client AdamW is passed), so no fused op compiles."""
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.trainer.gradient_accumulation_steps,
        "gradient_clipping": cfg.trainer.gradient_clipping,
        **zero_settings(cfg.deepspeed),
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return OmegaConf.to_container(OmegaConf.merge(config, cfg.deepspeed.config), resolve=True)


def build_engine(cfg: DictConfig, distillation: IndexerDistillation, device: torch.device):
    """DeepSpeed around `distillation`, with AdamW over its trainable tensors and the warm-up + cosine;
    returns the engine and those tensors."""
    import deepspeed

    trainable = [p for p in distillation.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas),
                                  weight_decay=cfg.trainer.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.trainer.warmup_steps, cfg.trainer.lr_decay_steps or cfg.trainer.max_steps,
                              cfg.trainer.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=distillation, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, uses_bf16(cfg, device)))
    return engine, trainable


def train_step(engine, batches, cfg: DictConfig, device: torch.device, trainable: list[torch.nn.Parameter],
               step: int, last_saved=None) -> dict[str, float]:
    """One optimizer step over `trainer.gradient_accumulation_steps` micro-batches drawn from `batches`.
    Returns the loss and metrics averaged over the micro-batches and the data-parallel replicas, and the
    gradient norm. A non-finite loss on any rank raises before the weights change; `last_saved` (a
    checkpoint) is named then.

    Context parallel, a rank's loss is its share of its replica's sequence loss (the C shares of a CP group
    sum to it), while DeepSpeed averages gradients over all W = C * D ranks. Scaled by C, the average is
    (1 / (C D)) sum_replicas sum_shares C g_share = (1 / D) sum_replicas g_sequence: the update of D-way data
    parallelism on the same sequences. The mean over the world of the scaled losses is, likewise, the mean
    over replicas of their sequence losses; the metrics are already whole-sequence values on every rank."""
    micro_batches = cfg.trainer.gradient_accumulation_steps
    context_size = cfg.context_parallel_size
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    for _ in range(micro_batches):
        loss, metrics = engine(next(batches)["input_ids"].to(device))
        if not all_ranks_finite(loss):
            raise FloatingPointError(
                f"The loss is {loss.item()} at step {step + 1}: the run stops before updating the weights. "
                f"Last good checkpoint: {last_saved or 'none yet'} (untouched)."
            )
        loss = loss * context_size
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and cfg.deepspeed.zero_stage == 0:
            # Only ZeRO optimizers record the norm; without ZeRO the full gradients are on hand.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        engine.step()
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value.detach() / micro_batches
    if cfg.deepspeed.zero_stage > 0:
        grad_norm = engine.get_global_grad_norm()
    record = mean_over_ranks(sums)
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record
