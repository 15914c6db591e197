#!/usr/bin/env python
"""Reproduce the IndexCache paper's comparisons in miniature, on the tiny pretrained DSA model.

For each retention ratio (default 1/2, 1/4, 1/8) it reports the validation LM loss and the mean
attention-mass recall of five rows:

  a. all-F                     every layer keeps its indexer (plain DSA); the same for every ratio
  b. uniform, training-free    the paper's uniform pattern FSSS... (offset 1), indexers as pretrained
  c. searched, training-free   greedy search (`indexcache-search`, docs/search.md) on a calibration set from the training split;
                               one run down to the smallest ratio gives the nested patterns of the others,
                               each with as many F layers as (b)
  d. uniform + distillation    each F indexer distilled against every layer of its group (the multi-layer
                               loss, paper Eq. 1): a dense warm-up, then the sparse stage
  e. uniform + own-layer only  the paper's "w/o cross-layer loss" ablation: the same run as (d), under the
                               uniform pattern (its S layers attend through their F layer's top-k), but each
                               F indexer's loss is its own layer's KL alone (`cross_layer=False`)

Every row is trained (d, e) and scored under its own pattern.

**Mean attention-mass recall** (one definition, every row): run the model with the row's pattern through the
attention tap (`metrics.layer_recalls`, through `capture.attention_taps`). For each layer, take its dense causal attention, head-averaged
(`capture.dense_attention_probs`, from that forward's own queries and keys), and sum it over the top-k the
layer actually attends to under the pattern (its own indexer's on an F layer, its F layer's on an S layer):
`metrics.attention_recall`. Only queries with more than `index_topk` candidate keys count (on the others any
selection holds every key), as in `metrics.py`. The figure is the mean over those queries, then over layers.

The distillation is the trainer's: `IndexerDistillation` in DeepSpeed's engine with the trainer's AdamW,
warm-up + cosine and gradient clipping (`engine.build_engine`), stepped by `engine.train_step`, all read from
the trainer's own config (`indexcache-train`'s defaults, ZeRO 0, fp32). It leaves out what a row does not
need: checkpoints, the before/after evaluation, the export. Each of (d) and (e) reloads the model from
`--model`, so both start from the same weights, and reseeds, so both see the same batches. Its two stages
each get their own engine, and so their own learning rate and schedule (warm-up over 1/20 of the stage,
then a cosine to 0.1 of the peak); the trainer's one `trainer.lr` serves both stages. The dense stage uses
`--dense-lr` (1e-3, DeepSeek's warm-up LR); the sparse stage `--sparse-lr` (1e-4, the tiny model's
pretraining sparse LR: DeepSeek's 7.3e-6 was for a run of a far larger model and moves a 7M-parameter
model's indexers by nothing in a few hundred steps).

    python scripts/reproduce_table.py --out outputs/reproduce/table --device cuda   # the embedded model, ~6.5 min
    python scripts/reproduce_table.py --model outputs/pretrain_tiny --out ...       # a fresh pretrain_tiny.py run
    python scripts/reproduce_table.py --model /work/g5tiny --ratios 0.5 --out ...   # pretrain_tiny.py --family glm5_next

On GLM-5.3-Flash (glm5_next) the pattern runs over the indexed layers, and the model runs on transformers'
native attention (the sparse forward does not cover its pooled indexer).

Writes `OUT.json` (every figure, per layer too, the search steps and the training curves) and `OUT.md` (the
table, the exact command, and the paper's figures next to it, labelled as quoted).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from indexcache_train.adapters import ADAPTERS, apply_indexcache, get_adapter
from indexcache_train.config import EMBEDDED_MODEL_DIR, compose_config
from indexcache_train.data import build_dataloader, load_packed
from indexcache_train.distill import IndexerDistillation
from indexcache_train.engine import build_engine, train_step
from indexcache_train.metrics import layer_recalls, lm_loss
from indexcache_train.modeling import check_seq_len, load_config, load_model, text_config
from indexcache_train.pattern import IndexCachePattern
from indexcache_train.pattern_search import greedy_search
from indexcache_train.runtime import init_distributed, resolve_device, run_environment, seed_everything
from indexcache_train.sparse_forward import SPARSE_ATTENTION

ROWS = {
    "a": "all-F",
    "b": "uniform, training-free",
    "c": "searched, training-free",
    "d": "uniform + distillation (multi-layer loss)",
    "e": "uniform + distillation, own layer only",
}
RECALL_DEFINITION = (
    "Per layer, on the model running the row's pattern: the share of the layer's dense causal attention "
    "(head mean, from that forward's queries and keys) inside the top-k the layer attends to (its own "
    "indexer's on an F layer, its F layer's on an S layer), over the queries with more than index_topk "
    "candidate keys; then the mean over layers."
)

# Quoted from the IndexCache paper (arXiv 2603.12201), never measured here: 30B DSA model, 200K context, long-context
# benchmark average (higher is better).
PAPER_REFERENCE = """\
**The paper's figures (quoted from the IndexCache paper, arXiv 2603.12201; not measured here).** 30B DSA model, 200K context;
long-context benchmark average, *higher* is better (our table reports LM loss, *lower* is better):

| the paper's row | retention | long-context average |
|---|---|---|
| (a) baseline, all indexers | 1 | 50.2 |
| (c) searched pattern, no training | 1/4 | 49.9 |
| (b) uniform pattern, no training | 1/4 | 43.0 |
| (d) uniform + training-aware | 1/2 | 51.6, against 51.0 |
| (d) uniform + training-aware | 1/4 | within 0.4 points of the baseline |

The paper's findings: (c) ≈ (a) ≫ (b) at 1/4; (d) ≈ (a); (d) better than (e), the ablation without the
cross-layer loss.
"""


# ------------------------------------------------------------------------------------------------ measuring
def measure(model: nn.Module, pattern: IndexCachePattern, batches: list[torch.Tensor]) -> dict:
    """Validation LM loss and recall of `model` running `pattern`."""
    apply_indexcache(model, pattern)
    model.eval()
    loss = lm_loss(model, batches, f"val LM loss ({pattern})")
    recalls = layer_recalls(model, batches)
    return {"pattern": str(pattern), "num_full": len(pattern.full_layers), "lm_loss": loss,
            "recall": sum(recalls) / len(recalls), "recall_per_layer": recalls}


# ------------------------------------------------------------------------------------------------ distilling
def stage_config(args: argparse.Namespace, steps: int, lr: float):
    """The trainer's config for one stage of a row: its defaults (AdamW betas and weight decay, clipping, the
    cosine's floor), ZeRO 0 in fp32, and this stage's batch size, steps, peak lr and warm-up."""
    return compose_config("train", [
        "deepspeed=zero0", "deepspeed.bf16=false", "logger=disabled", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={steps}", f"trainer.lr={lr}", f"trainer.warmup_steps={max(1, steps // 20)}",
    ])


def distill(model: nn.Module, pattern: IndexCachePattern, cross_layer: bool, batches, args: argparse.Namespace,
            desc: str) -> dict:
    """Train the F indexers of `pattern` with the trainer's step, the model running `pattern`:
    `--dense-fraction` of `--distill-steps` dense, the rest sparse. `cross_layer` picks the loss, each F
    layer's group (the paper's) or its own layer alone. Returns the training curve (the F indexers' mean
    group KL per step)."""
    distillation = IndexerDistillation(model, pattern, stage="dense", kl_backend=args.kl_backend, recall_rows=0,
                                       cross_layer=cross_layer)
    distillation.freeze()
    layers = pattern.full_layers
    dense_steps = round(args.distill_steps * args.dense_fraction)
    stages = [("dense", dense_steps, args.dense_lr), ("sparse", args.distill_steps - dense_steps, args.sparse_lr)]
    curve: dict[str, list[float]] = {"dense": [], "sparse": []}
    started = time.perf_counter()
    with tqdm(total=args.distill_steps, desc=desc) as progress:
        for stage, steps, lr in stages:
            if steps == 0:
                continue
            cfg = stage_config(args, steps, lr)
            distillation.stage = stage
            engine, trainable = build_engine(cfg, distillation, args.device)
            for step in range(steps):
                record = train_step(engine, batches, cfg, args.device, trainable, step)
                curve[stage].append(sum(record[f"kl_group/layer{layer}"] for layer in layers) / len(layers))
                progress.update()
                progress.set_postfix(stage=stage, kl=f"{curve[stage][-1]:.4f}")
            engine.destroy()
    return {"pattern": str(pattern), "loss": "multi-layer" if cross_layer else "own layer only",
            "trained_layers": layers, "steps": {"dense": dense_steps, "sparse": args.distill_steps - dense_steps},
            "lr": {"dense": args.dense_lr, "sparse": args.sparse_lr}, "kl_curve": curve,
            "seconds": time.perf_counter() - started}


def distilled_row(args, pattern: IndexCachePattern, cross_layer: bool, train_data, val_batches, desc: str) -> dict:
    """Reload the model, distil the F indexers of `pattern` under it, measure with it."""
    model = fresh_model(args)
    seed_everything(args.seed)
    batches = iter(build_dataloader(train_data, args.batch_size, seed=args.seed, infinite=True))
    training = distill(model, pattern, cross_layer, batches, args, desc)
    row = measure(model, pattern, val_batches)
    del model
    return {**row, "training": training}


# ------------------------------------------------------------------------------------------------ the run
def fresh_model(args: argparse.Namespace) -> nn.Module:
    config = load_config(args.model)
    adapter = ADAPTERS[config.model_type]  # load_config has checked it is a DSA model
    attention = SPARSE_ATTENTION if adapter.on_sparse_forward else adapter.native_attention
    model = load_model(args.model, dtype=args.dtype, attn_implementation=attention, config=config).to(args.device)
    return model.eval()


def retention_name(ratio: float) -> str:
    freq = round(1 / ratio)
    return f"1/{freq}" if abs(freq * ratio - 1) < 1e-6 else f"{ratio:g}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    args.device = resolve_device(args.device)
    init_distributed()  # the trainer's step averages its metrics over ranks: here a world of one
    if args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = fresh_model(args)
    config = text_config(model.config)
    num_layers = get_adapter(model).num_layers(model)
    num_params = sum(p.numel() for p in model.parameters())  # before a pattern takes S indexers off the tree
    seq_len = args.seq_len or config.max_position_embeddings
    check_seq_len(model.config, seq_len)

    validation = load_packed(seq_len=seq_len, tokenizer=tokenizer, split="validation")
    val_batches = [b["input_ids"].to(args.device) for b in islice(
        build_dataloader(validation, args.batch_size, seed=args.seed, shuffle=False, drop_last=False),
        args.eval_batches)]
    train_data = load_packed(seq_len=seq_len, tokenizer=tokenizer, split="train", max_records=args.max_train_records)
    calib_batches = [b["input_ids"].to(args.device) for b in islice(
        build_dataloader(train_data, args.batch_size, seed=args.seed + 1), args.calib_batches)]
    if not val_batches or not calib_batches:
        raise ValueError("Too little data for one validation and one calibration batch at this --seq-len.")
    print(f"Model {args.model}: {num_layers} layers, index_topk {config.index_topk}; "
          f"{sum(b.shape[0] for b in val_batches)} validation sequences and "
          f"{sum(b.shape[0] for b in calib_batches)} calibration sequences of {seq_len} tokens.")

    ratios = sorted(set(args.ratios), reverse=True)
    uniform = {r: IndexCachePattern.from_ratio(num_layers, r) for r in ratios}

    # (a) once: it does not depend on the ratio.
    all_full = measure(model, IndexCachePattern.all_full(num_layers), val_batches)
    # (c) one greedy run down to the fewest F layers; its steps nest, giving every other ratio's pattern.
    fewest = min(len(p.full_layers) for p in uniform.values())
    search = greedy_search(model, calib_batches, num_full=fewest)
    switched = [step.layer for step in search.steps]

    def searched(num_full: int) -> IndexCachePattern:
        pattern = IndexCachePattern.all_full(num_layers)
        for layer in switched[:num_layers - num_full]:
            pattern = pattern.with_shared(layer)
        return pattern

    results = {}
    for ratio in ratios:
        pattern = uniform[ratio]
        name = retention_name(ratio)
        print(f"--- retention {name}: uniform {pattern}")
        rows = {"a": all_full, "b": measure(model, pattern, val_batches),
                "c": measure(model, searched(len(pattern.full_layers)), val_batches)}
        rows["d"] = distilled_row(args, pattern, True, train_data, val_batches, f"(d) distil {pattern}")
        rows["e"] = distilled_row(args, pattern, False, train_data, val_batches, f"(e) distil {pattern}, own layer only")
        results[f"{ratio:g}"] = {"retention": name, "ratio": ratio,
                                 "rows": {key: {"label": ROWS[key], **row} for key, row in rows.items()}}
        print(format_table({f"{ratio:g}": results[f"{ratio:g}"]}))
        # Written after every ratio, so that a run killed by a time limit keeps the ratios it finished.
        summary = {
            "command": command(argv),
            "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
            "environment": run_environment(args.device),
            "model": {"path": args.model, "architecture": type(model).__name__, "num_layers": num_layers,
                      "decoder_layers": config.num_hidden_layers, "index_topk": config.index_topk,
                      "parameters": num_params, **model_recipe(args.model)},
            "data": {"seq_len": seq_len, "validation_sequences": sum(b.shape[0] for b in val_batches),
                     "calibration_sequences": sum(b.shape[0] for b in calib_batches),
                     "train_sequences": len(train_data), "tokens_per_distill_step": args.batch_size * seq_len},
            "recall_definition": RECALL_DEFINITION,
            "search": {"all_full_calibration_loss": search.all_full_loss, "switch_order": switched,
                       "steps": [{"layer": s.layer, "pattern": s.pattern, "calibration_loss": s.loss}
                                 for s in search.steps]},
            "results": results,
            "complete": ratio == ratios[-1],
            "wall_seconds": time.perf_counter() - started,
        }
        Path(f"{out}.json").write_text(json.dumps(summary, indent=2))
        Path(f"{out}.md").write_text(markdown(summary))
    print(f"Wrote {out}.json and {out}.md in {summary['wall_seconds'] / 60:.1f} minutes.")
    return summary


# ------------------------------------------------------------------------------------------------ the report
def format_table(results: dict) -> str:
    lines = ["| retention | row | pattern | F | val LM loss | Δ vs (a) | mean recall |",
             "|---|---|---|---|---|---|---|"]
    for result in results.values():
        base = result["rows"]["a"]["lm_loss"]
        for key, row in result["rows"].items():
            lines.append(f"| {result['retention']} | ({key}) {row['label']} | `{row['pattern']}` | {row['num_full']} | "
                         f"{row['lm_loss']:.4f} | {row['lm_loss'] - base:+.4f} | {row['recall']:.3f} |")
    return "\n".join(lines)


def orderings(results: dict) -> str:
    """The paper's orderings, checked on our measurements (derived from the JSON, nothing assumed)."""
    lines = []
    for result in results.values():
        loss = {k: r["lm_loss"] for k, r in result["rows"].items()}
        gap = {k: v - loss["a"] for k, v in loss.items()}
        lines.append(
            f"- {result['retention']}: loss gap to (a): (b) {gap['b']:+.4f}, (c) {gap['c']:+.4f}, "
            f"(d) {gap['d']:+.4f}, (e) {gap['e']:+.4f}. (c) {'<' if loss['c'] < loss['b'] else '≥'} (b); "
            f"(d) {'<' if loss['d'] < loss['e'] else '≥'} (e) in loss (lower is better).")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    data, model, env = summary["data"], summary["model"], summary["environment"]
    args = summary["args"]
    return f"""# IndexCache in miniature: our measurements

Model `{model['path']}` ({model.get('architecture', 'GlmMoeDsaForCausalLM')}, {layers_text(model)}, index_topk {model['index_topk']},
{model['parameters'] / 1e6:.2f}M parameters), {env['device']}, torch {env['torch']}, transformers
{env['transformers']}; {summary['wall_seconds'] / 60:.1f} minutes{'' if summary['complete'] else
' (INCOMPLETE: the run stopped before its last ratio)'}.

```
{summary['command']}
```
{recipe_text(model)}
## Our table (measured)
Validation: {data['validation_sequences']} sequences of {data['seq_len']} tokens from the standard library's
held-out files; LM loss in nats per token (lower is better). Greedy search calibrated on
{data['calibration_sequences']} training sequences. Distillation (d), (e): the trainer's step, {args['distill_steps']} steps of
{data['tokens_per_distill_step']} tokens ({args['dense_fraction']:.0%} dense at lr {args['dense_lr']:g}, then
sparse at lr {args['sparse_lr']:g}), each from the same weights and on the same batches. Every row is trained
and scored under the pattern it shows; (e) differs from (d) only in its loss, each F indexer's own layer alone.

{format_table(summary['results'])}

**Mean attention-mass recall.** {summary['recall_definition']}

Search switch order (F → S): {summary['search']['switch_order']}.

The paper's orderings on these figures:
{orderings(summary['results'])}

## Reference
{PAPER_REFERENCE}
All our figures, per layer too, with the search steps and the distillation curves: the JSON next to this file.
"""


def model_recipe(path: str) -> dict:
    """The commands that made the model, from the pretrain.json `scripts/pretrain_tiny.py` writes beside it."""
    recipe = Path(path) / "pretrain.json"
    if not recipe.is_file():
        return {}
    summary = json.loads(recipe.read_text())
    return {"pretrain_command": summary["command"], "pretrain_rerun_command": summary["rerun_command"]}


def recipe_text(model: dict) -> str:
    if "pretrain_command" not in model:
        return ""
    return f"""The model was made by (the same steps, without the timing that planned them, on the second line):
```
{model['pretrain_command']}
{model['pretrain_rerun_command']}
```
"""


def layers_text(model: dict) -> str:
    """The pattern's length, and the decoder layers where the pattern covers only some (glm5_next)."""
    decoder = model.get("decoder_layers", model["num_layers"])
    if decoder == model["num_layers"]:
        return f"{decoder} layers"
    return f"{decoder} decoder layers, of which {model['num_layers']} own an indexer and carry the pattern"


def command(argv: list[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join(["scripts/reproduce_table.py", *argv])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL_DIR,
                        help="a DSA model folder (default: the embedded model, scripts/pretrain_tiny.py's output)")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125],
                        help="retention ratios (fraction of indexers kept)")
    parser.add_argument("--distill-steps", type=int, default=400, help="optimizer steps per distillation run")
    parser.add_argument("--dense-fraction", type=float, default=0.5, help="share of the steps in the dense stage")
    parser.add_argument("--dense-lr", type=float, default=1e-3)
    parser.add_argument("--sparse-lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (evaluation and training)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (8 x 8 covers the split)")
    parser.add_argument("--calib-batches", type=int, default=4, help="training-split batches for the search")
    parser.add_argument("--max-train-records", type=int, help="keep only the first training files (quick runs)")
    parser.add_argument("--kl-backend", help="IndexerKLLoss backend (default: the kernels' choice)")
    parser.add_argument("--dtype", default="float32", help="dtype the model is loaded in")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(not 0 < r <= 1 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1].")
    if not 0 <= args.dense_fraction <= 1:
        parser.error("--dense-fraction must lie in [0, 1].")
    if args.distill_steps < 1:
        parser.error("--distill-steps must be at least 1.")
    return args


if __name__ == "__main__":
    main()
