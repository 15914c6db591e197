#!/usr/bin/env python
"""Prefill latency on the sparse forward: all-F against the 1/2, 1/4 and 1/8 IndexCache patterns, and the
indexer's share of an all-F prefill (the paper's Table 1 in miniature).

The stack is an 8-layer GlmMoeDsa shaped like DeepSeek-V3.2 (`benchmarking.dsv32_shaped_config`; 8 layers so
that 1/8 exists), random weights, bf16, batch 1. A prefill is a no-grad forward of the whole sequence that
returns the last position's logits (`logits_to_keep=1`), timed as the median of --repeats runs after a
warm-up. The indexer's share is the time its forwards take (CUDA events around each indexer call) over the
whole all-F prefill, in one more run.

  python scripts/bench_prefill.py --out outputs/prefill          # 64K, 128K, 200K
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from indexcache_train import IndexCachePattern, apply_indexcache, use_sparse_forward
from indexcache_train.adapters import get_adapter
from indexcache_train.benchmarking import dsv32_shaped_config, fmt_seconds, synchronize, timed, write_results

NUM_LAYERS = 8
RATIOS = {"1/2": 2, "1/4": 4, "1/8": 8}


def indexer_seconds(model, prefill) -> float:
    """Seconds spent inside the indexers' forwards during one `prefill()`."""
    starts, ends = [], []

    def record(events):
        def hook(*_):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
        return hook

    hooks = []
    for indexer in get_adapter(model).all_indexers(model):
        hooks += [indexer.register_forward_pre_hook(record(starts)), indexer.register_forward_hook(record(ends))]
    try:
        prefill()
        synchronize()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(start.elapsed_time(end) for start, end in zip(starts, ends)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 204800])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/prefill")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(dsv32_shaped_config(NUM_LAYERS), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    use_sparse_forward(model)
    patterns = {"all F": IndexCachePattern.all_full(NUM_LAYERS)}
    patterns.update({name: IndexCachePattern.uniform(NUM_LAYERS, freq) for name, freq in RATIOS.items()})
    rows = []
    for length in args.lengths:
        input_ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")

        def prefill():
            with torch.no_grad():
                return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits

        row = {"length": length}
        for name, pattern in patterns.items():
            apply_indexcache(model, pattern)
            row[name] = {"pattern": str(pattern), **timed(prefill, repeats=args.repeats)}
        apply_indexcache(model, patterns["all F"])
        row["indexer_share"] = indexer_seconds(model, prefill) / row["all F"]["seconds"]
        rows.append(row)
        print(row, flush=True)
        markdown = table(rows, patterns)  # written after every length, so that a run cut short keeps them
        write_results(args.out, "bench_prefill", rows, markdown, num_layers=NUM_LAYERS)
    print(markdown)


def table(rows: list[dict], patterns: dict) -> str:
    header = " | ".join(f"{name} ({patterns[name]})" for name in patterns)
    lines = [f"| L | {header} | " + " | ".join(f"speed-up {n}" for n in RATIOS) + " | indexer share, all F |",
             "|---|" + "---|" * (len(patterns) + len(RATIOS) + 1)]
    for row in rows:
        times = " | ".join(fmt_seconds(row[name]) for name in patterns)
        speedups = " | ".join(f"{row['all F']['seconds'] / row[n]['seconds']:.2f}x" for n in RATIOS)
        lines.append(f"| {row['length'] // 1024}K | {times} | {speedups} | {row['indexer_share']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
