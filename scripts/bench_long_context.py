#!/usr/bin/env python
"""The long-context frozen forward on one GPU: forward and distillation-step time and peak memory of the
sparse forward (`use_sparse_forward`: sparse MLA attention + fused selection) against transformers' native
path (`sdpa`: an L x L mask per layer, dense masked attention, torch indexer), in the same run.

The stack is a 4-layer GlmMoeDsa shaped like DeepSeek-V3.2 (`benchmarking.dsv32_shaped_config`), random
weights, bf16, batch 1 of random tokens. Per L and path:
  forward all F   a no-grad forward of the inner model (no LM head), every layer running its indexer;
  forward FSSS    the same with the 1/4 pattern;
  sparse step     `IndexerDistillation` sparse stage, pattern FSSS: forward, loss, backward, AdamW;
  dense step      the same, dense stage (only up to --dense-max);
each the median of --repeats runs after a warm-up run (Triton compiles there); peak is
`torch.cuda.max_memory_allocated` over the timed runs, weights included. The native path runs until it is
out of memory (and up to --native-max).

  python scripts/bench_long_context.py --out outputs/long_context                     # 16K .. 200K
  python scripts/bench_long_context.py --lengths 16384 --repeats 1 --out /tmp/lc      # a quick look
"""

from __future__ import annotations

import argparse
import gc

import torch
from transformers import AutoModelForCausalLM

from indexcache_train import apply_indexcache, use_sparse_forward
from indexcache_train.benchmarking import dsv32_shaped_config, fmt_gib, fmt_seconds, timed, write_results
from indexcache_train.distill import IndexerDistillation

PATTERN = "FSSS"


def distillation_step(model, stage: str, input_ids: torch.Tensor):
    distillation = IndexerDistillation(model, PATTERN, stage=stage, recall_rows=0)
    distillation.freeze()
    # lr 0: the optimiser does all its work but the weights stay, so both paths' losses compare at every L.
    optimizer = torch.optim.AdamW([p for p in distillation.parameters() if p.requires_grad], lr=0.0)

    def step():
        loss, _ = distillation(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(model, length: int, path: str, args) -> dict:
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda",
                              generator=torch.Generator("cuda").manual_seed(length))
    use_sparse_forward(model, enabled=path == "ours")
    row = {"length": length, "path": path}
    for name, pattern in (("forward_all_f", "FFFF"), ("forward_fsss", PATTERN)):
        apply_indexcache(model, pattern)
        with torch.no_grad():
            row[name] = timed(lambda: model.model(input_ids=input_ids, use_cache=False), repeats=args.repeats)
        gc.collect()
    if row["forward_fsss"].get("oom"):  # the steps run the same forward
        print(row, flush=True)
        return row
    row["sparse_step"] = timed(distillation_step(model, "sparse", input_ids), repeats=args.repeats)
    gc.collect()
    if length <= args.dense_max:
        row["dense_step"] = timed(distillation_step(model, "dense", input_ids), repeats=args.repeats)
        gc.collect()
    print(row, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| L | path | forward, all F | forward, FSSS | sparse step | dense step | peak, sparse step (GiB) "
             "| sparse-step loss |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sparse = row.get("sparse_step")
        loss = f"{sparse['value']:.6g}" if sparse and "value" in sparse else ""
        lines.append(f"| {row['length'] // 1024}K | {row['path']} | {fmt_seconds(row['forward_all_f'])} "
                     f"| {fmt_seconds(row['forward_fsss'])} | {fmt_seconds(sparse)} "
                     f"| {fmt_seconds(row.get('dense_step'))} | {fmt_gib(sparse)} | {loss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 204800])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--native-max", type=int, default=65536, help="longest L for the native path")
    parser.add_argument("--dense-max", type=int, default=131072, help="longest L for the dense step")
    parser.add_argument("--out", default="outputs/long_context")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(dsv32_shaped_config(4), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in model.parameters())
    lengths = sorted(args.lengths)
    # Ours at every L first, then the native path until it is out of memory; results are written after
    # every row, so that a run cut short keeps what it measured.
    plan = [(length, "ours") for length in lengths]
    plan += [(length, "native") for length in lengths if length <= args.native_max]
    rows = []
    for length, path in plan:
        if path == "native" and any(r["path"] == "native" and r["forward_fsss"].get("oom") for r in rows):
            break
        rows.append(measure(model, length, path, args))
        rows.sort(key=lambda r: (r["length"], r["path"] != "ours"))
        markdown = table(rows)
        write_results(args.out, "bench_long_context", rows, markdown, params=params, pattern=PATTERN,
                      model=model.config.to_dict())
    print(markdown)


if __name__ == "__main__":
    main()
