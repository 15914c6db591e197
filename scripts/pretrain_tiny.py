#!/usr/bin/env python
"""Pretrain a tiny GLM-MoE-DSA model on the Python standard library: the package's embedded default model.

The model is transformers' own `GlmMoeDsaForCausalLM` (~7.3M parameters, dense MLPs, 8 layers, an 8 x 64
indexer per layer, `index_topk` 128, context 2048), trained from scratch in three phases that follow
DeepSeek-V3.2's recipe for converting a dense model to DSA. `--family glm5_next` pretrains a tiny GLM-5.3-Flash
(`Glm5NextForConditionalGeneration`, text only) the same way instead: 8 decoder layers, of which 3 and 7 are
indexed attention with a pooled indexer and the rest KDA linear attention, context 256 and `index_topk` 32 (8
pools of 4) by default; the phases' indexers are those of the indexed layers.

  a. pretrain   LM loss with dense attention: every indexer selects every key (top-k = context) for the
                phase, then top-k 128 is restored. AdamW, linear warm-up then cosine, bf16 autocast on GPU.
  b. warmup     DSA's indexer warm-up. The base is frozen; each indexer learns its own layer's dense attention
                with our fused KL (`IndexerDistillation`, all-F pattern, stage "dense").
  c. sparse     top-k 128 on. Two separate optimisations per step, on the same batch: the base model's LM
                loss through the sparse attention, and the indexers' KL over their own selection (stage
                "sparse"). The indexer's input is detached and its top-k is not differentiable, so neither loss
                sends gradients into the other's parameters.

After each phase (and at initialisation) the validation split is scored: LM loss with dense attention and
with DSA, each indexer's KL to its layer's attention (dense and sparse), and its top-k recall (the share of
its layer's dense attention mass inside its own top-k 128, over the rows that have more keys than that).

**Tokenizer: byte-level** (`byte_tokenizer()`: 256 bytes + <eos>). The corpus is only ~12 MB of text. A BPE
of 4096 tokens (measured: 3.6 bytes per token) would cut it to 3.4M tokens, which an H200 would repeat
10-40 times within the budget, and a 7M-parameter model would spend the later epochs memorising; bytes give
12M tokens, a few epochs. It is also the tokenizer the package already uses for its tiny test models, it
needs no training step, and its losses are nats per byte. The price: a context of 2048 holds ~50 lines of
code, still 16 times `index_topk`, so the selection matters.

**Budget.** `--minutes` is the wall-clock budget of the whole run. A few steps of each phase are timed on a
throw-away copy of the model, the initial evaluation is timed, and the time left after setup and the four
evaluations becomes a step count per phase (70/20/10%). The counts are printed and recorded, and
`--steps A B C` skips the timing and reruns exactly those: with the same seed, the run is the same.

    python scripts/pretrain_tiny.py --out outputs/pretrain_tiny --device cuda            # ~9 minutes, one H200
    python scripts/pretrain_tiny.py --out /tmp/p --model-size micro --context 128 --index-topk 16 \
        --max-steps-per-phase 24 --device cpu                                          # a smoke run
    python scripts/pretrain_tiny.py --family glm5_next --out /work/g5tiny --device cpu --minutes 12

Outputs in `--out`: model.safetensors (bf16) and config.json, the tokenizer, pretrain.json (every phase's
figures) and README.md (the model card). Plain `AutoModelForCausalLM.from_pretrained(out)` loads it
(`Glm5NextForConditionalGeneration.from_pretrained(out)` for glm5_next). The
package's embedded default model (`indexcache_train/embedded_model/`) is one such folder; `--rescore`
re-scores a folder's saved weights with this checkout's evaluation and adds the figures to its card.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Glm5NextConfig

from indexcache_train.adapters import get_adapter
from indexcache_train.benchmarking import synchronize
from indexcache_train.data import build_dataloader, load_packed
from indexcache_train.distill import IndexerDistillation
from indexcache_train.files import write_text_atomically
from indexcache_train.metrics import layer_recalls, lm_loss
from indexcache_train.modeling import TINY_VISION, byte_tokenizer, load_config, model_class, model_from_config, \
    text_config, tiny_config
from indexcache_train.optim import warmup_cosine
from indexcache_train.runtime import resolve_device, run_environment, seed_everything

MODEL_SIZES = {
    # ~7.3M parameters, 14.7 MB in bf16. MLA and indexer shapes scaled down from GLM-5 (hidden 6144, 64 heads,
    # q/kv LoRA ranks 2048/512, indexer 32 x 128).
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=48,
                  qk_rope_head_dim=16, v_head_dim=64, index_n_heads=8, index_head_dim=64),
    # For tests and smoke runs on a CPU.
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16),
}
# GLM-5.3-Flash's text model scaled down: NoPE MLA with a pooled indexer on layers 3 and 7, KDA linear attention
# on the rest, 2 hyper-connection streams, dense MLPs. One linear-attention head: on a CPU transformers' KDA
# falls back to a chunked PyTorch reference whose time grows with the heads and takes most of a step (2 heads
# of 16 took 2.2 s a step of 8 x 256 tokens, 1 head 1.5 s), and narrow linear layers leave the long-range
# work to the indexed ones, whose selection is what this model is for.
GLM5_NEXT_SIZES = {
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32,
                  index_n_heads=4, index_head_dim=32, index_kpool=4, linear_num_heads=1, linear_head_dim=16,
                  hc_mult=2, hc_sinkhorn_iters=2),
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
                  num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, v_head_dim=16,
                  index_n_heads=2, index_head_dim=16, index_kpool=4, linear_num_heads=2, linear_head_dim=8,
                  hc_mult=2, hc_sinkhorn_iters=2),
}
FAMILIES = {"glm_moe_dsa": MODEL_SIZES, "glm5_next": GLM5_NEXT_SIZES}
# Unset options take the family's value: the embedded model's recipe, or a context that a CPU trains in minutes
# (still 8 times index_topk, so the selection drops most pools).
FAMILY_DEFAULTS = {"glm_moe_dsa": dict(context=2048, index_topk=128, batch_size=16),
                   "glm5_next": dict(context=256, index_topk=32, batch_size=8)}
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0
SAVE_RESERVE_S = 15  # saving and the model card, after the last evaluation


# ------------------------------------------------------------------------------------------------ the model
def build_model(family: str, size: str, context: int, index_topk: int, vocab_size: int, eos_id: int,
                seed: int) -> nn.Module:
    seed_everything(seed)
    dims = FAMILIES[family][size]
    if family == "glm5_next":
        text = dict(**dims, vocab_size=vocab_size, max_position_embeddings=context, index_topk=index_topk,
                    mlp_layer_types=["dense"] * dims["num_hidden_layers"], bos_token_id=eos_id,
                    eos_token_id=eos_id, pad_token_id=None)
        # The vision tower is never run (text only): the smallest its config takes, projection included.
        vision = {**TINY_VISION, "out_hidden_size": dims["hidden_size"], "projection_intermediate_size": 16}
        config = Glm5NextConfig(text_config=text, vision_config=vision)
    else:
        config = tiny_config(
            "glm_moe_dsa", **dims, vocab_size=vocab_size, max_position_embeddings=context, index_topk=index_topk,
            first_k_dense_replace=dims["num_hidden_layers"],  # dense MLPs in every layer, no MoE
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        )
    return model_from_config(config, attn_implementation="sdpa")


def num_indexed(model: nn.Module) -> int:
    """Layers that own an indexer (every decoder layer of GlmMoeDsa, the indexed ones of Glm5Next)."""
    return get_adapter(model).num_layers(model)


def all_full(model: nn.Module) -> str:
    """The pattern where every indexer serves exactly its own layer: plain DSA."""
    return "F" * num_indexed(model)


def indexers(model: nn.Module) -> list[nn.Module]:
    adapter = get_adapter(model)
    return [adapter.indexer(model, layer) for layer in range(adapter.num_layers(model))]


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for indexer in indexers(model) for p in indexer.parameters()]


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything but the indexers: what the LM loss trains (the indexers run under no_grad anyway)."""
    indexer_ids = {id(p) for p in indexer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in indexer_ids]


@contextmanager
def dense_attention(model: nn.Module):
    """Within the block every indexer keeps every key (top-k = context), so the attention is dense."""
    saved = [indexer.index_topk for indexer in indexers(model)]
    for indexer in indexers(model):
        indexer.index_topk = text_config(model.config).max_position_embeddings
    try:
        yield
    finally:
        for indexer, topk in zip(indexers(model), saved):
            indexer.index_topk = topk


# ------------------------------------------------------------------------------------------------ the steps
Step = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return warmup_cosine(optimizer, max(1, steps // 20), steps, MIN_LR_RATIO)


def lm_step(model: nn.Module, steps: int, lr: float, weight_decay: float) -> Step:
    """One AdamW step on the LM loss of the base model (bf16 autocast on GPU, fp32 master weights)."""
    params = base_parameters(model)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norms: no decay
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    scheduler = schedule(optimizer, steps)
    device = params[0].device

    def step(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"lm_loss": loss.detach()}

    return step


def indexer_step(model: nn.Module, steps: int, lr: float, stage: str) -> Step:
    """One AdamW step of every indexer on our KL to its own layer's attention (`stage` "dense" or "sparse").
    It runs in fp32: the frozen forward is cheap at this size, and the kernels then see one dtype."""
    distillation = IndexerDistillation(model, all_full(model), stage=stage, recall_rows=0)
    params = indexer_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = schedule(optimizer, steps)
    num_layers = num_indexed(model)

    def step(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        loss, _ = distillation(input_ids)  # the sum over layers of each indexer's mean KL
        loss.backward()
        nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {f"kl_{stage}": loss.detach() / num_layers}

    return step


@dataclass
class Phase:
    name: str
    share: float  # of the training time
    dense: bool  # run with every key selected
    description: str

    def make_step(self, model: nn.Module, steps: int, args: argparse.Namespace) -> Step:
        """Builds the phase's optimizers on `model` and sets which of its parameters train."""
        if self.name == "pretrain":
            model.requires_grad_(True)
            return lm_step(model, steps, args.lr, args.weight_decay)
        if self.name == "warmup":
            model.requires_grad_(False)
            for p in indexer_parameters(model):
                p.requires_grad_(True)
            return indexer_step(model, steps, args.warmup_lr, "dense")
        model.requires_grad_(True)
        train_lm = lm_step(model, steps, args.sparse_lr, args.weight_decay)
        train_indexers = indexer_step(model, steps, args.sparse_lr, "sparse")
        return lambda input_ids: {**train_lm(input_ids), **train_indexers(input_ids)}

    def attention(self, model: nn.Module):
        return dense_attention(model) if self.dense else nullcontext()


PHASES = [
    Phase("pretrain", 0.7, True, "LM pretraining, dense attention"),
    Phase("warmup", 0.2, True, "indexer warm-up: base frozen, KL to each layer's dense attention"),
    Phase("sparse", 0.1, False, "sparse stage: top-k on, LM loss on the base and sparse KL on the indexers"),
]


# ------------------------------------------------------------------------------------------------ evaluation
def indexer_kl(model: nn.Module, batches: list[torch.Tensor], stage: str) -> list[float]:
    """Per layer: the mean KL of its indexer to its own layer's attention, dense or over its top-k."""
    distillation = IndexerDistillation(model, all_full(model), stage=stage, recall_rows=0)
    sums = torch.zeros(num_indexed(model), dtype=torch.float64)
    sequences = 0
    with torch.no_grad():
        for ids in batches:  # each batch's KL is a mean over its sequences: weigh it by their number
            metrics = distillation(ids)[1]
            sums += ids.shape[0] * torch.tensor([metrics[f"kl/layer{i}"].item() for i in range(len(sums))],
                                                dtype=torch.float64)
            sequences += ids.shape[0]
    return (sums / sequences).tolist()


def validate(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    topk = text_config(model.config).index_topk
    with dense_attention(model):
        loss_dense = lm_loss(model, batches, "val LM loss (dense)")
        kl_dense = indexer_kl(model, batches, "dense")
    loss_dsa = lm_loss(model, batches, f"val LM loss (DSA, top-{topk})")
    kl_sparse = indexer_kl(model, batches, "sparse")
    recall = layer_recalls(model, batches)
    return {
        "lm_loss_dense": loss_dense, "lm_loss_dsa": loss_dsa,
        "kl_dense": _mean(kl_dense), "kl_sparse": _mean(kl_sparse), "topk_recall": _mean(recall),
        "per_layer": {"kl_dense": kl_dense, "kl_sparse": kl_sparse, "topk_recall": recall},
    }


def describe(figures: dict) -> str:
    return (f"val LM loss dense {figures['lm_loss_dense']:.4f}, DSA {figures['lm_loss_dsa']:.4f} | "
            f"indexer KL dense {figures['kl_dense']:.4f}, sparse {figures['kl_sparse']:.4f} | "
            f"top-k recall {figures['topk_recall']:.3f}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------ the budget
def seconds_per_step(phase: Phase, model: nn.Module, batch: torch.Tensor, args: argparse.Namespace) -> float:
    """Times a phase's step on a throw-away copy of the model: two warm-up calls (kernel compilation), then
    three timed ones. The real model and its optimizers are untouched."""
    scratch = copy.deepcopy(model)
    step = phase.make_step(scratch, 1000, args)
    with phase.attention(scratch):
        for _ in range(2):
            step(batch)
        synchronize()
        started = time.perf_counter()
        for _ in range(3):
            step(batch)
        synchronize()
    return (time.perf_counter() - started) / 3


def plan_steps(step_seconds: dict[str, float] | None, training_seconds: float, args: argparse.Namespace) -> dict:
    """Step counts per phase: `--steps` when given, else the training time split by phase share, capped by
    `--max-steps-per-phase`."""
    if args.steps:
        return dict(zip((p.name for p in PHASES), args.steps))
    steps = {p.name: max(1, int(training_seconds * p.share / step_seconds[p.name])) for p in PHASES}
    if args.max_steps_per_phase:
        steps = {name: min(count, args.max_steps_per_phase) for name, count in steps.items()}
    return steps


# ------------------------------------------------------------------------------------------------ the run
def run_phase(phase: Phase, model: nn.Module, steps: int, batches, args: argparse.Namespace) -> dict:
    """Trains `steps` steps; returns the training metrics at the start and the end (mean of 5% of the steps)."""
    step = phase.make_step(model, steps, args)
    history: list[dict[str, torch.Tensor]] = []
    with phase.attention(model):
        progress = tqdm(range(steps), desc=phase.name)
        for i in progress:
            history.append(step(next(batches)["input_ids"].to(args.device)))
            if i % 20 == 0 or i == steps - 1:
                progress.set_postfix({k: f"{v.item():.4f}" for k, v in history[-1].items()})
    window = max(1, steps // 20)
    return {f"{key}_{end}": torch.stack([h[key] for h in part]).mean().item()
            for key in history[0] for end, part in (("start", history[:window]), ("end", history[-window:]))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    args.device = resolve_device(args.device)
    if args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 distillation and evaluation forwards
    out = Path(args.out)
    if args.rescore:
        return rescore(out, args)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = byte_tokenizer()
    train = load_packed(seq_len=args.context, tokenizer=tokenizer, split="train", max_records=args.max_records)
    validation, val_batches = validation_batches(tokenizer, args)
    loader = build_dataloader(train, args.batch_size, seed=args.seed, infinite=True)
    print(f"Data: {len(train)} training and {len(validation)} validation sequences of {args.context} bytes "
          "(the standard library's .py files, split by file).")

    model = build_model(args.family, args.model_size, args.context, args.index_topk, len(tokenizer),
                        tokenizer.eos_token_id, args.seed).to(args.device)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"Model: {type(model).__name__}, {num_params / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in indexer_parameters(model)) / 1e6:.2f}M in the indexers), "
          f"index_topk {args.index_topk}, context {args.context}.")

    # Time the phases first: that also compiles the KL kernels, so the timed evaluation below is a fair
    # estimate of the three that follow the phases.
    timing_batch = torch.tensor(train[: args.batch_size]["input_ids"], device=args.device)
    step_seconds = None if args.steps else {p.name: seconds_per_step(p, model, timing_batch, args) for p in PHASES}
    eval_started = time.perf_counter()
    record = {"init": validate(model, val_batches)}
    eval_seconds = time.perf_counter() - eval_started
    print(f"init: {describe(record['init'])}")
    training_seconds = args.minutes * 60 - (time.perf_counter() - started) - 3 * eval_seconds - SAVE_RESERVE_S
    steps = plan_steps(step_seconds, training_seconds, args)
    plan = {"training_seconds": training_seconds, "seconds_per_step": step_seconds, "steps": steps}
    print("Plan: " + ", ".join(f"{name} {count} steps" for name, count in steps.items())
          + f"; rerun exactly with --steps {' '.join(map(str, steps.values()))}")

    batches = iter(loader)
    for phase in PHASES:
        phase_started = time.perf_counter()
        train_figures = run_phase(phase, model, steps[phase.name], batches, args)
        if phase is PHASES[-1]:
            model.to(torch.bfloat16).float()  # the last figures are those of the shipped bf16 weights
        record[phase.name] = {"description": phase.description, "steps": steps[phase.name],
                              "train": train_figures, "validation": validate(model, val_batches),
                              "seconds": time.perf_counter() - phase_started}
        print(f"{phase.name}: {describe(record[phase.name]['validation'])}")

    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "command": _command(sys.argv if argv is None else ["scripts/pretrain_tiny.py", *argv]),
        "rerun_command": _command(_rerun_argv(argv, steps)),
        "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
        "environment": run_environment(args.device),
        "model": {"parameters": num_params, "indexer_parameters": sum(p.numel() for p in indexer_parameters(model)),
                  "size": args.model_size, **FAMILIES[args.family][args.model_size], "index_topk": args.index_topk,
                  "context": args.context},
        # Epochs: a sparse-stage step reads its batch twice (LM and KL) but counts once.
        "data": {"train_sequences": len(train), "validation_sequences": len(validation),
                 "tokens_per_step": args.batch_size * args.context,
                 "epochs": sum(steps.values()) * args.batch_size / len(train)},
        "plan": plan,
        "figures": record,
        "safetensors_bytes": (out / "model.safetensors").stat().st_size,
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "pretrain.json", json.dumps(summary, indent=2))
    write_text_atomically(out / "README.md", model_card(summary))
    print(f"Wrote {out} ({summary['safetensors_bytes'] / 1e6:.1f} MB of weights) in "
          f"{summary['wall_seconds'] / 60:.1f} minutes.")
    return summary


def validation_batches(tokenizer, args: argparse.Namespace) -> tuple:
    validation = load_packed(seq_len=args.context, tokenizer=tokenizer, split="validation")
    validation = validation.select(range(min(args.eval_sequences, len(validation))))
    return validation, [b["input_ids"].to(args.device) for b in build_dataloader(
        validation, args.batch_size, seed=args.seed, shuffle=False, drop_last=False)]


def rescore(out: Path, args: argparse.Namespace) -> dict:
    """Score the saved model in `out` on this interpreter's validation split, with the evaluation code of this
    checkout; record the figures in pretrain.json as "rescored" and rewrite the card."""
    summary_path = out / "pretrain.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"No pretrain.json in {out}: --rescore needs a folder that this recipe wrote.")
    summary = json.loads(summary_path.read_text())
    args.context = summary["model"]["context"]
    model = model_class(load_config(str(out))).from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    model.to(args.device).eval()
    validation, val_batches = validation_batches(AutoTokenizer.from_pretrained(out), args)
    summary["rescored"] = {"command": _command(["scripts/pretrain_tiny.py", *sys.argv[1:]]),
                           "environment": run_environment(args.device), "validation_sequences": len(validation),
                           "validation": validate(model, val_batches)}
    print(f"rescored: {describe(summary['rescored']['validation'])}")
    write_text_atomically(summary_path, json.dumps(summary, indent=2))
    write_text_atomically(out / "README.md", model_card(summary))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--rescore", action="store_true",
                        help="only score the model already in --out and record it in its pretrain.json and card")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run")
    parser.add_argument("--steps", type=int, nargs=3, metavar=("PRETRAIN", "WARMUP", "SPARSE"),
                        help="exact steps per phase instead of the budget's plan (reruns a recorded plan)")
    parser.add_argument("--max-steps-per-phase", type=int, help="cap on the planned steps of each phase")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="glm_moe_dsa",
                        help="glm_moe_dsa (GlmMoeDsaForCausalLM, the embedded model) or glm5_next (GLM-5.3-Flash)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--context", type=int, help="default: 2048 (glm_moe_dsa), 256 (glm5_next)")
    parser.add_argument("--index-topk", type=int, help="default: 128 (glm_moe_dsa), 32 (glm5_next)")
    parser.add_argument("--batch-size", type=int, help="default: 16 (glm_moe_dsa), 8 (glm5_next)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR of the pretraining")
    parser.add_argument("--warmup-lr", type=float, default=1e-3, help="peak LR of the indexer warm-up (DeepSeek's)")
    parser.add_argument("--sparse-lr", type=float, default=1e-4, help="peak LR of the sparse stage, both losses")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-sequences", type=int, default=64, help="validation sequences scored per phase")
    parser.add_argument("--max-records", type=int, help="keep only the first training files (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for option, value in FAMILY_DEFAULTS[args.family].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if args.index_topk >= args.context:
        parser.error(f"--index-topk ({args.index_topk}) must be below --context ({args.context}), "
                     "otherwise DSA selects every key.")
    return args


# ------------------------------------------------------------------------------------------------ the card
def _command(argv: list[str]) -> str:
    return "python " + " ".join(shlex.quote(a) for a in argv)


def _rerun_argv(argv: list[str] | None, steps: dict[str, int]) -> list[str]:
    """The command with `--steps` set to the plan (and the options the plan made moot dropped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], 0
    for arg in argv:
        option, has_value = arg.split("=")[0], "=" in arg
        if skip:
            skip -= 1
        elif option in ("--steps", "--minutes", "--max-steps-per-phase"):
            skip = 0 if has_value else 3 if option == "--steps" else 1
        else:
            kept.append(arg)
    return ["scripts/pretrain_tiny.py", *kept, "--steps", *map(str, steps.values())]


def model_card(summary: dict) -> str:
    figures, model = summary["figures"], summary["model"]
    rows = [("init", "random initialisation", figures["init"])]
    rows += [(p.name, f"{figures[p.name]['steps']} steps, {figures[p.name]['seconds']:.0f} s",
              figures[p.name]["validation"]) for p in PHASES]
    header = ("| after | training | val LM loss, dense | val LM loss, DSA top-k | indexer KL, dense | "
              "indexer KL, sparse | top-k recall |")
    table = [header, "|---|---|---|---|---|---|---|"]
    table += [f"| {name} | {how} | {f['lm_loss_dense']:.4f} | {f['lm_loss_dsa']:.4f} | {f['kl_dense']:.4f} | "
              f"{f['kl_sparse']:.4f} | {f['topk_recall']:.3f} |" for name, how, f in rows]
    final = figures[PHASES[-1].name]["validation"]
    recall = " ".join(f"{r:.3f}" for r in final["per_layer"]["topk_recall"])
    if summary["args"].get("family") == "glm5_next":
        return _glm5_next_card(summary, table, recall)
    env = summary["environment"]
    layers = (f"hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, {model['num_attention_heads']} "
              f"MLA heads (q/kv LoRA ranks {model['q_lora_rank']}/{model['kv_lora_rank']}, qk head "
              f"{model['qk_nope_head_dim']}+{model['qk_rope_head_dim']} rope, v head {model['v_head_dim']}), "
              f"dense MLPs of {model['intermediate_size']}")
    indexer = (f"{model['index_n_heads']} heads x {model['index_head_dim']} ({model['indexer_parameters'] / 1e6:.2f}M "
               f"parameters in all) with index_topk {model['index_topk']}")
    return f"""---
library_name: transformers
tags: [glm_moe_dsa, deepseek-sparse-attention, indexcache, tiny]
---
# Tiny GLM-MoE-DSA on the Python standard library

A {model['parameters'] / 1e6:.2f}M-parameter `GlmMoeDsaForCausalLM` (DeepSeek Sparse Attention: a lightning
indexer per layer picks the top-{model['index_topk']} keys of each query) pretrained from scratch in
{summary['wall_seconds'] / 60:.1f} minutes on {env['device']}. It is the embedded default model of
`indexcache_train`: small enough for a CPU, with attention that has learnt real structure to distil.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path)        # weights stored in bf16; dtype=torch.float32 on a CPU
tokenizer = AutoTokenizer.from_pretrained(path)           # byte-level: 256 bytes + <eos>
```

## Model
- {layers};
- in every layer an indexer of {indexer}: all layers are F;
- context {model['context']} bytes.
{_card_rest(summary, table, recall)}"""


def _glm5_next_card(summary: dict, table: list[str], recall: str) -> str:
    model, env = summary["model"], summary["environment"]
    indexed = [i for i in range(model["num_hidden_layers"]) if i % 4 == 3]  # Glm5NextTextConfig's default layout
    return f"""---
library_name: transformers
tags: [glm5_next, deepseek-sparse-attention, indexcache, tiny]
---
# Tiny GLM-5.3-Flash (Glm5Next) on the Python standard library

A {model['parameters'] / 1e6:.2f}M-parameter `Glm5NextForConditionalGeneration`, text only, pretrained from scratch
in {summary['wall_seconds'] / 60:.1f} minutes on {env['device']}, for `indexcache_train`'s miniature
comparisons on this family. Decoder layers {indexed} are indexed attention: a pooled DSA indexer ranks
pools of {model['index_kpool']} keys and keeps the top-{model['index_topk']} keys' worth (plus the visible tail);
the other layers are KDA linear attention.

```python
from transformers import AutoTokenizer, Glm5NextForConditionalGeneration
model = Glm5NextForConditionalGeneration.from_pretrained(path)   # bf16 weights; dtype=torch.float32 on a CPU
tokenizer = AutoTokenizer.from_pretrained(path)                  # byte-level: 256 bytes + <eos>
```

## Model
- hidden {model['hidden_size']}, {model['num_hidden_layers']} decoder layers, {model['hc_mult']} hyper-connection
  streams, dense MLPs of {model['intermediate_size']};
- indexed layers: NoPE MLA, {model['num_attention_heads']} heads (q/kv LoRA ranks
  {model['q_lora_rank']}/{model['kv_lora_rank']}, qk head {model['qk_nope_head_dim']}, v head {model['v_head_dim']}),
  an indexer of {model['index_n_heads']} heads x {model['index_head_dim']}
  ({model['indexer_parameters'] / 1e6:.2f}M parameters in all), all F;
- linear layers: KDA, {model['linear_num_heads']} heads of {model['linear_head_dim']};
- context {model['context']} bytes; the vision tower is the smallest the config takes and was never trained.
{_card_rest(summary, table, recall)}"""


def _card_rest(summary: dict, table: list[str], recall: str) -> str:
    model, env = summary["model"], summary["environment"]
    return f"""
## Data
The `.py` sources of the Python {env['python']} standard library, read from the interpreter at training time
(`indexcache_train.data.stdlib_corpus`): {summary['data']['train_sequences']} training sequences, split by
file from a hash of the path, seen {summary['data']['epochs']:.2f} times over the three phases; the validation
figures use {summary['data']['validation_sequences']} sequences of held-out files. None of that text is shipped here.

## How it was made
```
{summary['command']}
```
`scripts/pretrain_tiny.py` of `indexcache_train`; torch {env['torch']}, transformers {env['transformers']}.
The same steps, without the timing that planned them:
```
{summary['rerun_command']}
```
1. **pretrain**: LM loss with dense attention (every indexer keeps every key), AdamW, warm-up then cosine.
2. **warmup**: DSA's indexer warm-up. The base is frozen; each indexer learns the head-averaged dense
   attention of its own layer (KL, `IndexerDistillation` with an all-F pattern, stage "dense").
3. **sparse**: top-k on. The base trains on the LM loss through the sparse attention, and the indexers on the
   KL over their own top-k (stage "sparse"), as two separate optimisations on the same batches.

## Figures (validation)
{chr(10).join(table)}

LM losses are in nats per byte. DSA: each layer attends only to its own indexer's top-{model['index_topk']}.
Top-k recall: the share of a layer's dense attention mass (head mean) inside its indexer's top-k, over the
queries with more than {model['index_topk']} keys, averaged over layers; per layer after the last phase:
{recall}. The last row is measured on the shipped (bf16-rounded) weights. All figures are in `pretrain.json`.
On a GPU a rerun of the same steps is not bit-identical; `docs/pretrain.md` of `indexcache_train` records how
far apart two H200 runs landed.
{_rescored_paragraph(summary)}"""


def _rescored_paragraph(summary: dict) -> str:
    if "rescored" not in summary:
        return ""
    rescored, env = summary["rescored"], summary["rescored"]["environment"]
    return f"""
**Rescored from these files** ({rescored['validation_sequences']} validation sequences, {env['device']},
Python {env['python']}, torch {env['torch']}): {describe(rescored['validation'])}.
```
{rescored['command']}
```
It re-reads the shipped weights with the evaluation code of that checkout; it can differ from the last row
above only where that code or the interpreter's standard library (and so the validation split) differs.
"""


if __name__ == "__main__":
    main()
