"""`indexcache-train`: distil the retained indexers of a frozen DSA model (the recipe).

    indexcache-train experiment=smoke                                   # a tiny random model, on CPU
    deepspeed --no_local_rank --num_gpus 8 -m indexcache_train.train \\
        model=from_pretrained model.name_or_path=/ckpt/GLM-5 data=files data.files=/data/long.jsonl \\
        distill.pattern=0.25 deepspeed=zero3 deepspeed.bf16=true

`train(cfg)` reads top to bottom:
- **setup**: check the config against the model's config.json (before any weights load), load the base,
  apply the pattern and freeze all but the F-layer indexers, and wrap them in DeepSpeed with a client AdamW
  and a warm-up + cosine schedule (`engine.build_engine`); resume from a checkpoint when asked;
- **the loop**: `engine.train_step` (one frozen forward and `engine.backward` per micro-batch), logging, and a
  checkpoint every `trainer.save_every` steps, each holding only the trainable tensors and written atomically;
  a non-finite loss stops the run before it touches the weights; `trainer.memory_report_step` traces one
  step's memory and writes what is alive at its peak, by line of code (`memory_report.py`);
- **the end**: the final checkpoint, the after-evaluation, `${output_dir}/export` (a Hugging Face folder with
  the pattern in its config), and the before/after table, printed last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .adapters import ADAPTERS
from .checkpoint import latest_checkpoint, load_checkpoint, resume_path, save_checkpoint
from .config import CONFIG_DIR, check_known_keys, register_configs
from .context_parallel import check_context_parallel_size, parallel_groups
from .data import build_dataloader, load_packed
from .distill import IndexerDistillation
from .engine import build_engine, deepspeed_config, train_step, uses_bf16
from .export import export_indexcache
from .files import write_text_atomically
from .memory_report import MemoryTrace, format_report
from .metrics import lm_loss
from .modeling import (
    LazyTokenizer,
    build_model,
    check_seq_len,
    load_model_config,
    resolve_dtype,
    text_config,
)
from .pattern import IndexCachePattern
from .plan import check_run_plan
from .runtime import init_distributed, resolve_device, seed_everything
from .sparse_forward import SPARSE_ATTENTION
from .tracking import Tracker
from .zero import ZeroContext, gathered_forward, place

log = logging.getLogger(__name__)
STAGES = ("dense", "sparse", "schedule")


# --------------------------------------------------------------------------------------------- checks
def check_run_config(cfg: DictConfig, model_config) -> None:
    """Everything that can be checked from the config and the model's config.json, so that a bad value fails
    in a second rather than after the model has loaded and a first evaluation has run."""
    adapter = ADAPTERS[model_config.model_type]  # load_model_config has checked it is one
    try:
        IndexCachePattern.coerce(cfg.distill.pattern, adapter.config_num_layers(model_config))
    except ValueError as error:
        raise ValueError(f"distill.pattern={cfg.distill.pattern!r}: {error}") from None
    check_seq_len(model_config, cfg.data.seq_len)
    context = text_config(model_config).max_position_embeddings
    if cfg.data.seq_len > context:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context "
                         f"(max_position_embeddings {context}).")
    if cfg.distill.stage not in STAGES:
        raise ValueError(f"distill.stage={cfg.distill.stage!r}: choose from {STAGES}.")
    trainer = cfg.trainer
    checks = [
        ("trainer.lr", trainer.lr, math.isfinite(trainer.lr) and trainer.lr > 0, "a positive number"),
        ("trainer.min_lr_ratio", trainer.min_lr_ratio, 0 <= trainer.min_lr_ratio <= 1, "in [0, 1]"),
        ("trainer.weight_decay", trainer.weight_decay, trainer.weight_decay >= 0, "at least 0"),
        ("trainer.max_steps", trainer.max_steps, trainer.max_steps >= 1, "at least 1"),
        ("trainer.warmup_steps", trainer.warmup_steps, trainer.warmup_steps >= 0, "at least 0"),
        ("trainer.save_every", trainer.save_every, trainer.save_every >= 1, "at least 1"),
        ("trainer.eval_batches", trainer.eval_batches, trainer.eval_batches >= 0, "at least 0"),
        ("trainer.gradient_accumulation_steps", trainer.gradient_accumulation_steps,
         trainer.gradient_accumulation_steps >= 1, "at least 1"),
        ("data.batch_size", cfg.data.batch_size, cfg.data.batch_size >= 1, "at least 1"),
        ("distill.dense_steps", cfg.distill.dense_steps, cfg.distill.dense_steps >= 0, "at least 0"),
    ]
    report_step = trainer.memory_report_step
    if report_step is not None:
        checks.append(("trainer.memory_report_step", report_step, 1 <= report_step <= trainer.max_steps,
                       f"a step from 1 to trainer.max_steps ({trainer.max_steps}), or null"))
    for key, value, ok, wanted in checks:
        if not ok:
            raise ValueError(f"{key}={value} is invalid: it must be {wanted}.")


def check_context_parallel_config(cfg: DictConfig, world_size: int) -> None:
    """`context_parallel_size` against the world size, the sequence length and the forward CP runs on."""
    size = cfg.context_parallel_size
    check_context_parallel_size(size, world_size, cfg.data.seq_len)
    if size > 1 and cfg.model.attn_implementation != SPARSE_ATTENTION:
        raise ValueError(f"context_parallel_size={size} needs the sparse forward: set "
                         f"model.attn_implementation={SPARSE_ATTENTION} (now {cfg.model.attn_implementation}).")


# --------------------------------------------------------------------------------------------- pieces
def stage_at(cfg: DictConfig, step: int) -> str:
    if cfg.distill.stage == "schedule":
        return "dense" if step < cfg.distill.dense_steps else "sparse"
    return cfg.distill.stage


def load_eval_batches(cfg: DictConfig, tokenizer, device: torch.device) -> list[torch.Tensor]:
    """The held-out batches of the before/after table: `data.eval_files`, else the stdlib validation split."""
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
    loader = build_dataloader(packed, cfg.data.batch_size, seed=cfg.data.seed, shuffle=False, drop_last=True)
    batches = []
    for batch in loader:
        if len(batches) == cfg.trainer.eval_batches:
            break
        batches.append(batch["input_ids"].to(device))
    return batches


@torch.no_grad()
def pattern_eval(distillation: IndexerDistillation, batches: list[torch.Tensor], stage: str) -> dict:
    """LM loss with the pattern, and each layer's KL (in `stage`) and recall of the attention it distils."""
    if not batches:
        return {}
    loss = lm_loss(distillation.model, batches, "eval: LM loss", distillation.context_parallel)
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


def format_before_after(before: dict, after: dict, pattern: str) -> str:
    """The before/after table, with each row's unit and which direction is better."""
    rows = [("LM loss, nats per token (lower is better)", "lm_loss"),
            ("mean attention recall (higher is better)", "mean_recall")]
    rows += [(f"{key}, nats (lower is better)", key) for key in sorted(before) if key.startswith("kl_group/")]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"Before and after distilling the indexers of {pattern}, on held-out batches:",
             f"{'':{width}}{'before':>10}{'after':>10}"]
    for label, key in rows:
        if before.get(key) is not None:
            lines.append(f"{label:{width}}{before[key]:>10.4f}{after[key]:>10.4f}")
    if before.get("lm_loss_as_loaded") is not None:
        lines.append(f"LM loss of the model as loaded, with all its indexers: {before['lm_loss_as_loaded']:.4f} "
                     "nats per token")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the recipe
def train(cfg: DictConfig) -> dict:
    # ---- setup
    rank, world_size = init_distributed()
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_config = load_model_config(cfg.model)
    check_run_config(cfg, model_config)
    if cfg.trainer.memory_report_step is not None and device.type != "cuda":
        raise ValueError("trainer.memory_report_step traces CUDA memory; this run is on the CPU.")
    check_context_parallel_config(cfg, world_size)
    groups = parallel_groups(cfg.context_parallel_size)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resume_path(cfg.resume, output_dir)
    seed_everything(cfg.seed)

    bf16 = uses_bf16(cfg, device)
    if cfg.trainer.check_plan:  # from the config alone, before any weight is read
        dtype_bytes = 2 if bf16 or cfg.model.dtype == "auto" else resolve_dtype(cfg.model.dtype).itemsize
        memory_plan = check_run_plan(cfg, model_config, world_size=world_size, device=device,
                                     dtype_bytes=dtype_bytes)
        if rank == 0:
            print(memory_plan.table())
            write_text_atomically(output_dir / "plan.json", json.dumps(memory_plan.to_dict(), indent=2))
    # Alive for the whole run: under ZeRO-3, transformers then builds and loads the model into partitions.
    zero_context = ZeroContext(deepspeed_config(cfg, bf16))  # noqa: F841
    if cfg.trainer.gpu_memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cfg.trainer.gpu_memory_fraction, device)
    model = place(build_model(cfg.model, model_config), device).eval()  # before the pattern: removed indexers
    tokenizer = LazyTokenizer(cfg.model)                                 # stay on the same device
    eval_batches = load_eval_batches(cfg, tokenizer, device)
    # The loss with every indexer the checkpoint has: what the distilled pattern should come back to.
    with gathered_forward(model):  # no engine gathers ZeRO-3 partitions yet
        loss_as_loaded = (lm_loss(model, eval_batches, "eval: LM loss as loaded", groups.context_parallel)
                          if eval_batches and resume_from is None else None)
    distillation = IndexerDistillation(model, cfg.distill.pattern, stage=stage_at(cfg, 0),
                                       kl_backend=cfg.distill.kl_backend, recall_rows=cfg.distill.recall_rows,
                                       teacher_form=cfg.distill.teacher_form, cross_layer=cfg.distill.cross_layer,
                                       context_parallel=groups.context_parallel)
    counts = distillation.freeze()
    log.info("Pattern %s: %d trainable parameters (F-layer indexers), %d frozen.", distillation.pattern,
             counts["trainable"], counts["frozen"])
    packed = load_packed(files=cfg.data.files, hub_name=cfg.data.hub_name, seq_len=cfg.data.seq_len,
                         tokenizer=tokenizer, split=cfg.data.split, text_field=cfg.data.text_field,
                         max_records=cfg.data.max_records)
    # Sharded over the data-parallel replicas: the ranks of one CP group read the same batches.
    loader = build_dataloader(packed, cfg.data.batch_size, seed=cfg.data.seed, rank=groups.data_rank,
                              world_size=groups.data_size, infinite=True)
    engine, trainable = build_engine(cfg, distillation, device)

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
    if rank == 0:
        write_text_atomically(output_dir / "eval_before.json", json.dumps(before, indent=2))
    run_info = {"model": OmegaConf.to_container(cfg.model, resolve=True), "pattern": str(distillation.pattern),
                "max_steps": cfg.trainer.max_steps}
    tracker = Tracker(cfg, output_dir, rank, start_step=step)

    # ---- the loop
    batches = iter(loader)
    tokens_per_step = (cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.gradient_accumulation_steps
                       * groups.data_size)
    progress = tqdm(total=cfg.trainer.max_steps, initial=step, desc="distil", disable=rank != 0)
    last_saved = latest_checkpoint(output_dir)
    while step < cfg.trainer.max_steps:
        distillation.stage = stage_at(cfg, step)
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        traced = step + 1 == cfg.trainer.memory_report_step
        with MemoryTrace(device) if traced else contextlib.nullcontext() as trace:
            record = train_step(engine, batches, cfg, device, trainable, step, last_saved)
        step += 1
        if traced:
            _write_memory_report(trace.report(), output_dir, rank)
        tracker.log({"step": step, "stage": distillation.stage, **record, "lr": engine.get_lr()[0],
                     "tokens_per_s": tokens_per_step / (time.perf_counter() - started),
                     "peak_memory_gib": _peak_memory_gib(device)})
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", stage=distillation.stage)
        if step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_steps:
            last_saved = save_checkpoint(engine, model, output_dir, step, loader, run_info, rank)
    progress.close()

    # ---- the end
    if last_saved is None or last_saved.name != f"step{step}":  # resumed at max_steps: nothing new ran
        last_saved = save_checkpoint(engine, model, output_dir, step, loader, run_info, rank)
    after = pattern_eval(distillation, eval_batches, eval_stage)
    summary = {"step": step, "pattern": str(distillation.pattern), "before": before, "after": after}
    if rank == 0:
        write_text_atomically(output_dir / "eval_after.json", json.dumps(after, indent=2))
    if cfg.export:
        card = {"steps": step, "stage": cfg.distill.stage,
                **{f"after/{k}": v for k, v in after.items() if not k.startswith(("kl/", "recall/"))}}
        export_dir = export_indexcache(model, output_dir / "export", base_path=cfg.model.name_or_path,
                                       tokenizer=tokenizer.loaded, model_card=card)
        summary["export"] = str(export_dir)
    tracker.finish(summary)
    if rank == 0 and before:  # last, so that wandb's summary does not push it off the screen
        print(format_before_after(before, after, summary["pattern"]))
    return summary


def _write_memory_report(report: dict, output_dir: Path, rank: int) -> None:
    write_text_atomically(output_dir / f"memory_report_rank{rank}.json", json.dumps(report, indent=2))
    if rank == 0:
        tqdm.write(format_report(report))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "train")
    train(cfg)


def main() -> None:
    register_configs()  # here, not at import: importing the package registers nothing
    _hydra_main()


if __name__ == "__main__":
    main()
