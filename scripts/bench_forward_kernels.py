#!/usr/bin/env python
"""Throughput of the sparse forward's two kernels on one GPU, against baselines measured in the same run.

  sparse MLA attention  `kernels.sparse_mla_attention`, absorbed form: H heads x (kv_lora + rope) queries
                        against one latent key per token, k selected keys per query; counted as
                        2 H L k (kv_lora + rope + kv_lora) FLOPs. Our Triton kernel, and FlashMLA's sparse
                        prefill beside it where `flash_mla` is installed. Baseline: SDPA (flash) dense causal
                        attention over the same heads in the expanded form (qk 192, v 128), which is what a
                        dense kernel would do instead.
  indexer selection     `kernels.indexer_logits` over the whole causal sequence in blocks of query rows,
                        counted as 2 Hi Di per causal (t, s) pair; then `kernels.indexer_topk` (logits and
                        torch.topk). Baseline: the native torch scoring of one block of query rows.
  matmul ceiling        an 8192^3 bf16 matrix product, the rate both are compared with.

Every configuration is warmed up (Triton compiles there) and timed as the median of --repeats runs.

  python scripts/bench_forward_kernels.py --out outputs/forward_kernels
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from indexcache_train.benchmarking import fmt_seconds, timed, write_results
from indexcache_train.kernels import indexer_logits, indexer_topk, sparse_mla_attention
from indexcache_train.kernels.indexer_topk import indexer_logits_flops
from indexcache_train.kernels.sparse_mla import flashmla_unsupported, sparse_mla_flops

HEADS, LORA, ROPE, NOPE, VALUE = 128, 512, 64, 128, 128  # DeepSeek-V3.2's MLA
INDEX_HEADS, INDEX_DIM, TOPK = 64, 128, 2048
BLOCK_ROWS = 8192  # query rows per call, as the sparse forward chunks them


def causal_topk_indices(length: int, topk: int, device) -> torch.Tensor:
    """Random distinct keys s <= t per query (every key while t < k), [1, L, k] int32, -1 padded."""
    rows = []
    for start in range(0, length, 4096):
        t = torch.arange(start, min(start + 4096, length), device=device)
        noise = torch.rand(len(t), length, device=device)
        noise = noise.masked_fill(torch.arange(length, device=device)[None] > t[:, None], -1.0)
        picked = noise.topk(topk, dim=-1)
        rows.append(torch.where(picked.values >= 0, picked.indices, -1).int())
    return torch.cat(rows)[None]


def bench_attention(length: int, repeats: int) -> dict:
    device = "cuda"
    q = torch.randn(1, length, HEADS, LORA + ROPE, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, length, LORA + ROPE, device=device, dtype=torch.bfloat16)
    indices = causal_topk_indices(length, TOPK, device)
    scale = (NOPE + ROPE) ** -0.5

    def attention(backend):
        for start in range(0, length, BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            sparse_mla_attention(q[:, rows], kv, indices[:, rows], scale, value_dim=LORA, query_start=start,
                                 backend=backend)

    flops = sparse_mla_flops(1, length, HEADS, LORA + ROPE, LORA, TOPK)
    result = {}
    backends = ["triton"] + (["flashmla"] if flashmla_unsupported(q, indices, LORA) is None else [])
    for backend in backends:
        key = "sparse_mla" if backend == "triton" else f"sparse_mla_{backend}"
        result[key] = timed(lambda: attention(backend), repeats=repeats)
        result[f"{key}_tflops"] = flops / result[key]["seconds"] / 1e12
    return result


def bench_dense_attention(length: int, repeats: int) -> dict:
    """The baseline: what a dense kernel does instead, SDPA over the expanded heads."""
    device = "cuda"
    query = torch.randn(1, HEADS, length, NOPE + ROPE, device=device, dtype=torch.bfloat16)
    key = torch.randn_like(query)
    value = torch.randn(1, HEADS, length, VALUE, device=device, dtype=torch.bfloat16)
    return {"sdpa_dense": timed(lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True),
                                repeats=repeats)}


def bench_selection(length: int, repeats: int) -> dict:
    device = "cuda"
    q = torch.randn(1, length, INDEX_HEADS, INDEX_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, length, INDEX_DIM, device=device, dtype=torch.bfloat16)
    w = torch.randn(1, length, INDEX_HEADS, device=device) * INDEX_HEADS**-0.5 * INDEX_DIM**-0.5

    def logits_only():
        for start in range(0, length, BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            indexer_logits(q[:, rows], k, w[:, rows], query_start=start)

    result = {"logits": timed(logits_only, repeats=repeats),
              "topk": timed(lambda: indexer_topk(q, k, w, TOPK), repeats=repeats)}
    flops = indexer_logits_flops(1, length, INDEX_HEADS, INDEX_DIM)
    result["logits_tflops"] = flops / result["logits"]["seconds"] / 1e12

    def native_block():  # transformers' scoring of the last 1024 query rows: [B, C, Hi, L] fp32 scores
        rows = slice(length - 1024, length)
        scores = torch.matmul(q[:, rows].float(), k.float().transpose(-1, -2).unsqueeze(1)).relu()
        return torch.matmul(w[:, rows].unsqueeze(-2), scores).squeeze(-2).topk(TOPK, dim=-1)

    block = timed(native_block, repeats=repeats)
    # 1024 of the L rows, each as long as the sequence: scaled to the whole causal sequence by pairs.
    if not block.get("oom"):
        pairs_block, pairs_all = 1024 * length, length * (length + 1) / 2
        result["native_scaled_s"] = block["seconds"] * pairs_all / pairs_block
    return result


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    seconds = timed(lambda: a @ b, warmup=3, repeats=10)["seconds"]
    return 2 * 8192**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 204800])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/forward_kernels")
    args = parser.parse_args()

    ceiling = matmul_ceiling()
    rows = []
    for length in args.lengths:
        row = {"length": length, **bench_attention(length, args.repeats),
               **bench_dense_attention(length, args.repeats), **bench_selection(length, args.repeats)}
        rows.append(row)
        print(row, flush=True)
    lines = [f"bf16 matmul ceiling (8192^3): {ceiling:.0f} TFLOP/s", "",
             "| L | sparse MLA, Triton | TFLOP/s | vs matmul | sparse MLA, FlashMLA | TFLOP/s | SDPA dense causal "
             "| indexer logits | TFLOP/s | vs matmul | logits + top-k | native scoring (scaled) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        native = f"{r['native_scaled_s']:.2f} s" if "native_scaled_s" in r else "OOM"
        flashmla = (f"{fmt_seconds(r['sparse_mla_flashmla'])} | {r['sparse_mla_flashmla_tflops']:.0f}"
                    if "sparse_mla_flashmla" in r else "not installed | ")
        lines.append(f"| {r['length'] // 1024}K | {fmt_seconds(r['sparse_mla'])} | {r['sparse_mla_tflops']:.0f} "
                     f"| {r['sparse_mla_tflops'] / ceiling:.0%} | {flashmla} | {fmt_seconds(r['sdpa_dense'])} "
                     f"| {fmt_seconds(r['logits'])} | {r['logits_tflops']:.0f} | {r['logits_tflops'] / ceiling:.0%} "
                     f"| {fmt_seconds(r['topk'])} | {native} |")
    markdown = "\n".join(lines)
    print(markdown)
    write_results(args.out, "bench_forward_kernels", rows, markdown, matmul_tflops=ceiling)


if __name__ == "__main__":
    main()
