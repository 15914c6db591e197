#!/usr/bin/env python
"""Distillation throughput and peak memory of a full training step, ours against a naive trainer.

A step is what the trainer does per micro-batch: the frozen model's forward, the loss, its backward and an
AdamW step over the F-layer indexers (pattern 1/4 uniform: FSSS FSSS). Both trainers run in the same
process on the same randomly initialised GlmMoeDsa (random token ids, batch 1):

  ours   `IndexerDistillation` on the sparse forward (`use_sparse_forward`: sparse MLA attention, fused
         selection); each served layer's teacher q/k goes from the attention tap into the fused streamed KL
         (Triton on GPU, the chunked torch path on CPU).
  naive  what a user writes first: the same frozen model with eager attention and `output_attentions=True`
         under no_grad, each served layer's head-averaged attention weights as the target, the F indexer's
         logits materialised [B, L, L] with grad from its projections (forward hook), and a torch KL over the
         same support. Sparse stage only: eager weights are the DSA attention, top-k folded into the mask,
         so they are not the dense stage's target unless index_topk >= L.

Both losses are the paper's Eq. 1: per F layer, the mean over its group's served layers of the mean-row KL;
summed over F layers. Before timing, both trainers compute the loss on the same batch at the smallest L and
the relative difference is reported. Per (stage, L, trainer): median step time of `--steps` timed steps
after `--warmup` (CUDA-synchronised), tokens/s, and peak memory (`torch.cuda.max_memory_allocated`, model
weights included); "OOM" when the step runs out of GPU memory. Attention-mass recall logging is off.

  python scripts/bench_train.py --out outputs/bench_train              # 8K/16K/32K, both stages: a few minutes on one H200
  python scripts/bench_train.py --lengths 8192 --stages sparse --steps 2
  python scripts/bench_train.py --model-size tiny --device cpu --lengths 64 --steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from indexcache_train import use_sparse_forward
from indexcache_train.adapters import apply_indexcache, current_pattern, get_adapter
from indexcache_train.benchmarking import GIB, free_memory, synchronize
from indexcache_train.distill import IndexerDistillation, causal_topk
from indexcache_train.kernels.reference import student_logits, support_mask
from indexcache_train.modeling import tiny_config
from indexcache_train.runtime import run_environment

PATTERN = 0.25  # uniform 1/4: FSSS per group
# Indexer 8 heads x 128. Both trainers share one model; each switches it to its own forward.
MODEL_SIZES = {
    "mid": {"dtype": torch.bfloat16, "config": {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
        "first_k_dense_replace": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 512,
        "kv_lora_rank": 256, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "index_n_heads": 8, "index_head_dim": 128, "index_topk": 2048}},
    # The tests' tiny GlmMoeDsa in fp32, so that both trainers' losses agree to rounding on CPU.
    "tiny": {"dtype": torch.float32, "config": {"index_topk": 16, "initializer_range": 0.2}},
}


class NaiveDistillation(nn.Module):
    """The straightforward trainer: eager attention weights as targets, materialised logits, torch KL."""

    def __init__(self, model: nn.Module, pattern):
        super().__init__()
        self.model = apply_indexcache(model, pattern)
        self.adapter = get_adapter(model)
        self.pattern = current_pattern(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        projections, selections = {}, {}

        def grab(indexer, args, output):
            hidden_states, q_resid, position_embeddings = args[:3]
            with torch.enable_grad():
                projections[indexer.layer_idx] = self.adapter.indexer_projections(
                    indexer, hidden_states.detach(), q_resid.detach(), position_embeddings)
            selections[indexer.layer_idx] = causal_topk(output)

        hooks = [self.adapter.indexer(self.model, f).register_forward_hook(grab) for f in self.pattern.full_layers]
        use_sparse_forward(self.model, enabled=False)
        self.model.set_attn_implementation("eager")  # the only one that returns attention weights
        try:
            with torch.no_grad():
                attentions = self.model.model(input_ids=input_ids, use_cache=False, output_attentions=True).attentions
        finally:
            for hook in hooks:
                hook.remove()

        batch, seq_len = input_ids.shape
        loss = 0.0
        for source, served in self.pattern.groups.items():
            p = projections[source]
            logits = student_logits(p.query.float(), p.key.float(), p.weights.float())  # [B, L, L], with grad
            support = support_mask(batch, seq_len, input_ids.device, selections[source])
            log_q = torch.log_softmax(logits.masked_fill(~support, torch.finfo(logits.dtype).min), dim=-1)
            layer_kls = [
                F.kl_div(log_q.flatten(0, 1), attentions[layer].mean(dim=1, dtype=torch.float32).flatten(0, 1),
                         reduction="batchmean")
                for layer in (source, *served)
            ]
            loss = loss + torch.stack(layer_kls).mean()
        return loss


class OursDistillation(nn.Module):
    """`IndexerDistillation` on the sparse forward, returning the loss only."""

    def __init__(self, model: nn.Module, pattern, stage: str):
        super().__init__()
        self.distillation = IndexerDistillation(model, pattern, stage=stage, recall_rows=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        use_sparse_forward(self.distillation.model)
        return self.distillation(input_ids)[0]


# ------------------------------------------------------------------------------------------ set-up ----
def build_model(size: str, max_len: int, device: torch.device) -> nn.Module:
    spec = MODEL_SIZES[size]
    config = tiny_config("glm_moe_dsa", **spec["config"], max_position_embeddings=max(max_len, 512))
    torch.manual_seed(0)
    with device:  # initialise on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=spec["dtype"], attn_implementation="sdpa")
    model.eval()
    IndexerDistillation(model, PATTERN).freeze()  # the F-layer indexers train, nothing else
    return model


def describe(model: nn.Module) -> str:
    c = model.config
    moe = c.mlp_layer_types.count("sparse")
    mlp = f"dense MLP {c.intermediate_size}" + (f", {moe} MoE layers of {c.n_routed_experts} experts" if moe else "")
    params = sum(p.numel() for p in model.parameters())
    return (f"GlmMoeDsa, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads "
            f"(MLA q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim} "
            f"rope, v {c.v_head_dim}), indexer {c.index_n_heads}x{c.index_head_dim}, index_topk {c.index_topk}, "
            f"{mlp}; {params / 1e6:.1f}M params, {str(next(model.parameters()).dtype).removeprefix('torch.')}")


def random_batch(model: nn.Module, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator, device=device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ measure ---
def compare_losses(trainers: dict[str, nn.Module], input_ids: torch.Tensor) -> dict:
    """Each trainer's loss on the same batch with the same (untrained) weights."""
    losses = {}
    for name, trainer in trainers.items():
        try:
            losses[name] = trainer(input_ids).item()
        except torch.cuda.OutOfMemoryError:
            losses[name] = None
        free_memory()
    ours, naive = losses["ours"], losses["naive"]
    rel_diff = abs(ours - naive) / abs(naive) if None not in (ours, naive) else None
    return {"length": input_ids.shape[1], **losses, "rel_diff": rel_diff}


def time_steps(trainer: nn.Module, input_ids: torch.Tensor, steps: int, warmup: int) -> dict:
    device = input_ids.device
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        loss = trainer(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"status": "ok", "step_s": step_s, "tokens_per_s": input_ids.numel() / step_s,
            "peak_gib": peak_gib(device), "loss": loss.item()}


def run_case(trainer: nn.Module | None, input_ids: torch.Tensor, steps: int, warmup: int) -> dict:
    if trainer is None:
        return {"status": "n/a"}
    free_memory()  # each case's peak starts from the model weights alone
    try:
        result = time_steps(trainer, input_ids, steps, warmup)
    except torch.cuda.OutOfMemoryError:
        result = {"status": "OOM", "peak_gib": peak_gib(input_ids.device)}
    free_memory()  # outside the except block, so the traceback's tensors are gone
    return result


# ------------------------------------------------------------------------------------------ report ----
def fmt(result: dict, key: str, spec: str) -> str:
    if result["status"] != "ok":
        return result["status"]
    return "-" if result[key] is None else format(result[key], spec)


def fmt_length(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def ratio(numerator: dict, denominator: dict, key: str) -> str:
    if numerator["status"] != "ok" or denominator["status"] != "ok" or numerator[key] is None:
        return ""
    return f"{numerator[key] / denominator[key]:.1f}x"


def markdown(report: dict) -> str:
    check = report["loss_check"]
    lines = [
        (f"Distillation step (forward + loss + backward + AdamW on the F indexers), pattern 1/4 uniform "
         f"({report['pattern']}), batch 1, median of {report['steps']} steps after {report['warmup']} warm-up."),
        f"Model: {report['model']}.",
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}.",
    ]
    if check:
        ours, naive = (f"{check[k]:.6g}" if check[k] is not None else "OOM" for k in ("ours", "naive"))
        diff = "n/a" if check["rel_diff"] is None else f"{check['rel_diff']:.2e}"
        lines.append(f"Loss check, sparse stage at L={fmt_length(check['length'])}, same batch and weights: "
                     f"ours {ours}, naive {naive}, relative difference {diff}.")
    lines += [
        "",
        ("| stage | L | ours tok/s | ours step s | ours peak GiB | naive tok/s | naive step s | naive peak GiB "
         "| speed-up | naive/ours memory |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ours, naive = row["ours"], row["naive"]
        lines.append(
            f"| {row['stage']} | {fmt_length(row['length'])} | {fmt(ours, 'tokens_per_s', ',.0f')} "
            f"| {fmt(ours, 'step_s', '.3f')} | {fmt(ours, 'peak_gib', '.1f')} | {fmt(naive, 'tokens_per_s', ',.0f')} "
            f"| {fmt(naive, 'step_s', '.3f')} | {fmt(naive, 'peak_gib', '.1f')} "
            f"| {ratio(ours, naive, 'tokens_per_s')} | {ratio(naive, ours, 'peak_gib')} |"
        )
    if any(row["naive"]["status"] == "n/a" for row in report["results"]):
        lines += ["", ("n/a: the naive trainer takes its targets from eager attention weights, which are the "
                       "top-k-masked DSA attention, so it has no dense stage.")]
    lines += [
        "",
        "```",
        report["command"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--stages", nargs="+", choices=["sparse", "dense"], default=["sparse", "dense"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (Triton compiles there)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="mid")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write OUT.md (table and command) and OUT.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    lengths = sorted(args.lengths)

    model = build_model(args.model_size, lengths[-1], device)
    ours = {stage: OursDistillation(model, PATTERN, stage) for stage in args.stages}
    naive = NaiveDistillation(model, PATTERN)
    report = {
        "command": shlex.join(["python", "scripts/bench_train.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": describe(model), "pattern": str(current_pattern(model)), "steps": args.steps,
        "warmup": args.warmup, **run_environment(device), "loss_check": None, "results": [],
    }
    print(f"{report['model']}\n{report['device']}, pattern {report['pattern']}", flush=True)

    if "sparse" in ours:
        check = compare_losses({"ours": ours["sparse"], "naive": naive}, random_batch(model, lengths[0], device))
        report["loss_check"] = check
        print(f"loss check at L={check['length']}: {check}", flush=True)
    for stage in args.stages:
        for length in lengths:
            input_ids = random_batch(model, length, device)
            row = {"stage": stage, "length": length,
                   "ours": run_case(ours[stage], input_ids, args.steps, args.warmup),
                   "naive": run_case(naive if stage == "sparse" else None, input_ids, args.steps, args.warmup)}
            report["results"].append(row)
            print(json.dumps(row), flush=True)

    table = markdown(report)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(table)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
