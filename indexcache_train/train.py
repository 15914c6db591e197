"""`indexcache-train`: distil the retained indexers of a frozen DSA model (the recipe).

    indexcache-train experiment=smoke                                   # a tiny random model, on CPU
    deepspeed --no_local_rank --num_gpus 8 -m indexcache_train.train \\
        model=from_pretrained model.name_or_path=/ckpt/GLM-5 data=files data.files=/data/long.jsonl \\
        distill.pattern=0.25 deepspeed=zero3 deepspeed.bf16=true

Steps: load the base, apply the pattern and freeze all but the F-layer indexers; wrap in DeepSpeed with a
client AdamW and a warm-up + cosine schedule; each step runs `IndexerDistillation` (one frozen forward)
and `engine.backward`. Checkpoints hold only the trainable tensors and are written atomically;
`resume=auto` continues exactly (data position, optimiser, scheduler, RNG). A non-finite loss stops the
run before it touches the weights. At the end, `${output_dir}/export` is a Hugging Face folder with the
pattern in its config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import CONFIG_DIR, register_configs
from .data import build_dataloader, load_packed
from .distill import IndexerDistillation
from .evaluate import check_seq_len, lm_loss, resolve_device
from .export import export_indexcache, trained_indexer_state
from .files import write_text_atomically
from .modeling import build_model_and_tokenizer
from .plan import check_run_plan
from .zero import ZeroContext, gathered_forward, place, zero_settings

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int]:
    """DeepSpeed's process group (NCCL on GPU, gloo on CPU); a plain `python -m` run is a world of one."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_ranks_finite(value: torch.Tensor) -> bool:
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(metrics)
    stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
    torch.distributed.all_reduce(stacked)
    return dict(zip(keys, (stacked / torch.distributed.get_world_size()).tolist()))


# --------------------------------------------------------------------------------------------- optimisation
def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """The LR multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def deepspeed_config(cfg: DictConfig, bf16: bool) -> dict:
    """The DeepSpeed JSON. No optimizer is named in it (a client AdamW is passed), so no fused op compiles."""
    config = {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": cfg.trainer.gradient_accumulation_steps,
        "gradient_clipping": cfg.trainer.gradient_clipping,
        **zero_settings(cfg.deepspeed),
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merged(config, OmegaConf.to_container(cfg.deepspeed.config, resolve=True))


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively, so that one nested key does not replace its section."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def stage_at(cfg: DictConfig, step: int) -> str:
    if cfg.distill.stage == "schedule":
        return "dense" if step < cfg.distill.dense_steps else "sparse"
    return cfg.distill.stage


# --------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / CHECKPOINTS / "latest"
    return output_dir / CHECKPOINTS / pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(engine, distillation, output_dir: Path, step: int, loader, run_info: dict, rank: int) -> Path:
    """Write `checkpoints/step{N}` atomically: into a temporary tag, renamed once every rank is done."""
    root = output_dir / CHECKPOINTS
    tag, temporary = f"step{step}", f".tmp-step{step}"
    client_state = {"step": step, "loader": loader.state_dict()}
    engine.save_checkpoint(str(root), tag=temporary, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               root / temporary / f"rng_rank{rank}.pt")
    state = trained_indexer_state(distillation.model)
    if rank == 0:
        save_file(state, str(root / temporary / "trainable.safetensors"))
    torch.distributed.barrier()
    if rank == 0:
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(root / temporary, root / tag)
        write_text_atomically(root / "latest", tag)
        write_text_atomically(output_dir / "run.json", json.dumps({**run_info, "step": step}, indent=2))
    torch.distributed.barrier()
    return root / tag


def load_checkpoint(engine, path: Path, loader, rank: int) -> int:
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if client_state is None:
        raise FileNotFoundError(f"No DeepSpeed checkpoint could be read from {path}.")
    loader.load_state_dict(client_state["loader"])
    rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return client_state["step"]


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def pattern_eval(distillation: IndexerDistillation, batches: list[torch.Tensor], stage: str) -> dict:
    """LM loss with the pattern, and each layer's KL (in `stage`) and recall of the attention it distils."""
    if not batches:
        return {}
    loss = lm_loss(distillation.model, batches, "eval: LM loss")
    training_stage, distillation.stage = distillation.stage, stage
    sums: dict[str, float] = {}
    for ids in batches:
        for key, value in distillation(ids)[1].items():
            sums[key] = sums.get(key, 0.0) + value.item()
    distillation.stage = training_stage
    per_layer = {key: value / len(batches) for key, value in sums.items()}
    recalls = [v for k, v in per_layer.items() if k.startswith("recall/")]
    return {"lm_loss": loss, "perplexity": math.exp(loss),
            "mean_recall": sum(recalls) / len(recalls) if recalls else None, **per_layer}


def format_before_after(before: dict, after: dict) -> str:
    rows = [("LM loss", "lm_loss"), ("mean attention recall", "mean_recall")]
    rows += [(key, key) for key in sorted(before) if key.startswith("kl_group/")]
    lines = [f"{'':28}{'before':>10}{'after':>10}"]
    for label, key in rows:
        if before.get(key) is not None:
            lines.append(f"{label:28}{before[key]:>10.4f}{after[key]:>10.4f}")
    if before.get("lm_loss_as_loaded") is not None:
        lines.append(f"LM loss of the model as loaded, with all its indexers: {before['lm_loss_as_loaded']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the run
def train(cfg: DictConfig) -> dict:
    import deepspeed

    rank, world_size = init_distributed()
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)

    bf16 = device.type == "cuda" if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)
    ds_config = deepspeed_config(cfg, bf16)
    # Alive for the whole run: under ZeRO-3, transformers then builds and loads the model into partitions.
    zero_context = ZeroContext(ds_config)  # noqa: F841
    if cfg.trainer.gpu_memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cfg.trainer.gpu_memory_fraction, device)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    check_seq_len(model.config, cfg.data.seq_len)
    if cfg.trainer.check_plan:
        dtype_bytes = 2 if bf16 else next(model.parameters()).element_size()
        memory_plan = check_run_plan(cfg, model, world_size=world_size, device=device, dtype_bytes=dtype_bytes)
        if rank == 0:
            print(memory_plan.table())
            write_text_atomically(output_dir / "plan.json", json.dumps(memory_plan.to_dict(), indent=2))
    place(model, device).eval()  # before the pattern, so that removed indexers live on the same device
    resume_from = _resume_path(cfg, output_dir)
    eval_batches = load_eval_batches(cfg, tokenizer, device)
    # The loss with every indexer the checkpoint has: what the distilled pattern should come back to.
    with gathered_forward(model):  # no engine gathers ZeRO-3 partitions yet
        loss_as_loaded = (lm_loss(model, eval_batches, "eval: LM loss as loaded")
                          if eval_batches and resume_from is None else None)
    distillation = IndexerDistillation(model, cfg.distill.pattern, stage=stage_at(cfg, 0),
                                       kl_backend=cfg.distill.kl_backend, recall_rows=cfg.distill.recall_rows,
                                       teacher_form=cfg.distill.teacher_form)
    counts = distillation.freeze()
    log.info("Pattern %s: %d trainable parameters (F-layer indexers), %d frozen.", distillation.pattern,
             counts["trainable"], counts["frozen"])

    packed = load_packed(files=cfg.data.files, hub_name=cfg.data.hub_name, seq_len=cfg.data.seq_len,
                         tokenizer=tokenizer, split=cfg.data.split, text_field=cfg.data.text_field,
                         max_records=cfg.data.max_records)
    loader = build_dataloader(packed, cfg.trainer.micro_batch_size, seed=cfg.data.seed, rank=rank,
                              world_size=world_size, infinite=True)

    trainable = [p for p in distillation.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas),
                                  weight_decay=cfg.trainer.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.trainer.warmup_steps, cfg.trainer.lr_decay_steps or cfg.trainer.max_steps,
                                 cfg.trainer.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=distillation, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    step = 0
    if resume_from is not None:
        step = load_checkpoint(engine, resume_from, loader, rank)
        log.info("Resumed from %s at step %d.", resume_from, step)
    eval_stage = stage_at(cfg, cfg.trainer.max_steps - 1)  # before and after compare in the final stage
    if step == 0:
        before = pattern_eval(distillation, eval_batches, eval_stage)
        if before:
            before["lm_loss_as_loaded"] = loss_as_loaded
    else:
        before = _read_json(output_dir / "eval_before.json")
    run_info = {"model": OmegaConf.to_container(cfg.model, resolve=True), "pattern": str(distillation.pattern),
                "max_steps": cfg.trainer.max_steps}
    tracker = Tracker(cfg, output_dir, rank)
    if rank == 0:
        write_text_atomically(output_dir / "eval_before.json", json.dumps(before, indent=2))

    batches = iter(loader)
    tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len * cfg.trainer.gradient_accumulation_steps
    progress = tqdm(total=cfg.trainer.max_steps, initial=step, desc="distil", disable=rank != 0)
    last_saved = latest_checkpoint(output_dir)
    while step < cfg.trainer.max_steps:
        distillation.stage = stage_at(cfg, step)
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(cfg.trainer.gradient_accumulation_steps):
            input_ids = next(batches)["input_ids"].to(device)
            loss, metrics = engine(input_ids)
            if not all_ranks_finite(loss):
                raise FloatingPointError(
                    f"The loss is {loss.item()} at step {step + 1}: the run stops before updating the weights. "
                    f"Last good checkpoint: {last_saved or 'none yet'} (untouched)."
                )
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and cfg.deepspeed.zero_stage == 0:
                # Only ZeRO optimizers record the norm; without ZeRO the full gradients are on hand.
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            engine.step()
        step += 1
        record = {"step": step, "stage": distillation.stage, **mean_over_ranks({"loss": loss, **metrics})}
        elapsed = time.perf_counter() - started
        if cfg.deepspeed.zero_stage > 0:
            grad_norm = engine.get_global_grad_norm()
        record.update(lr=engine.get_lr()[0], tokens_per_s=tokens_per_step * world_size / elapsed,
                      peak_memory_gib=_peak_memory_gib(device))
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        tracker.log(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", stage=distillation.stage)
        if step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_steps:
            last_saved = save_checkpoint(engine, distillation, output_dir, step, loader, run_info, rank)
    progress.close()
    if last_saved is None or last_saved.name != f"step{step}":  # resumed at max_steps: nothing new ran
        last_saved = save_checkpoint(engine, distillation, output_dir, step, loader, run_info, rank)

    after = pattern_eval(distillation, eval_batches, eval_stage)
    summary = {"step": step, "pattern": str(distillation.pattern), "before": before, "after": after}
    if rank == 0:
        write_text_atomically(output_dir / "eval_after.json", json.dumps(after, indent=2))
        if before:
            print(format_before_after(before, after))
    if cfg.export:
        card = {"steps": step, "stage": cfg.distill.stage,
                **{f"after/{k}": v for k, v in after.items() if not k.startswith(("kl/", "recall/"))}}
        export_dir = export_indexcache(distillation.model, output_dir / "export", base_path=cfg.model.name_or_path,
                                       tokenizer=tokenizer, model_card=card)
        summary["export"] = str(export_dir)
    tracker.finish(summary)
    return summary


def load_eval_batches(cfg: DictConfig, tokenizer, device: torch.device) -> list[torch.Tensor]:
    if cfg.trainer.eval_batches == 0:
        return []
    files = cfg.data.eval_files
    if files is None and cfg.data.files is not None:
        log.warning("No data.eval_files given: the before/after table uses the training files.")
        files = cfg.data.files
    packed = load_packed(files=files, hub_name=cfg.data.hub_name if files is None else None,
                         seq_len=cfg.data.seq_len, tokenizer=tokenizer,
                         split="validation" if files is None else cfg.data.split, text_field=cfg.data.text_field,
                         max_records=cfg.data.max_records)
    loader = build_dataloader(packed, cfg.trainer.micro_batch_size, seed=cfg.data.seed, shuffle=False,
                              drop_last=True)
    batches = []
    for batch in loader:
        if len(batches) == cfg.trainer.eval_batches:
            break
        batches.append(batch["input_ids"].to(device))
    return batches


def _resume_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    if cfg.resume is None:
        if latest_checkpoint(output_dir) is not None:
            raise FileExistsError(f"{output_dir} already holds checkpoints: pass resume=auto to continue, or "
                                  "choose another output_dir.")
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(cfg.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={cfg.resume!r} is not a checkpoint folder.")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Tracker:
    """metrics.jsonl and wandb, on rank 0 only."""

    def __init__(self, cfg: DictConfig, output_dir: Path, rank: int):
        self.active = rank == 0
        self.run = None
        if not self.active:
            return
        self.metrics = (output_dir / "metrics.jsonl").open("a")
        if cfg.logger.mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.logger.project, name=cfg.logger.name, mode=cfg.logger.mode,
                                  dir=str(output_dir), config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "stage"}, step=record["step"])

    def finish(self, summary: dict) -> None:
        if not self.active:
            return
        self.metrics.close()
        if self.run is not None:
            self.run.summary.update({"final_step": summary["step"]})
            self.run.finish()


register_configs()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
