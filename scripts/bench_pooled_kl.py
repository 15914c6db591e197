#!/usr/bin/env python
"""Cost of the pooled indexer's KL (GLM-5.3-Flash, `indexcache_train/kernels/pooled.py`) against the
token-level KL at the same shapes, forward + backward, dense and sparse.

  token     `indexer_kl_loss` with one key per token (the GLM-5 / DeepSeek-V3.2 loss)
  pooled    the pooled loss as the trainer runs it: the pool keys [B, L/P, Di] broadcast to their tokens
            (`pool_to_tokens`), the same kernels on the candidate support (`pool_size=P`), and the
            backward through the broadcast into the pool keys
  reference `reference_pooled_indexer_kl_loss`, materialising [B, L, L] (skipped above --reference-max)

Sparse mode: each row selects top-k / P complete pools spread over those it can see, plus its visible tail,
as the native indexer writes them; the token loss gets the same slots. On CUDA the kernels are Triton, on a
CPU the chunked torch path (the interpreter's timings mean nothing).

  python scripts/bench_pooled_kl.py --device cpu --out outputs/bench_pooled_cpu       # small CPU shapes
  python scripts/bench_pooled_kl.py --device cuda --lengths 8192 32768 65536 --heads 64 --head-dim 256 \\
      --index-heads 32 --index-dim 128 --topk 2048 --out outputs/bench_pooled_h200    # GLM-5.3-Flash-like
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from indexcache_train.benchmarking import fmt_gib, fmt_seconds, timed, write_results  # noqa: E402
from indexcache_train.kernels import indexer_kl_loss  # noqa: E402
from indexcache_train.kernels.pooled import pool_to_tokens  # noqa: E402
from indexcache_train.kernels.reference import reference_pooled_indexer_kl_loss  # noqa: E402


def make_inputs(L, a, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    B, P = a.batch, a.pool
    return dict(
        index_q=rand(B, L, a.index_heads, a.index_dim, scale=a.index_dim ** -0.5).requires_grad_(),
        token_keys=rand(B, L, a.index_dim).requires_grad_(),
        pool_keys=rand(B, L // P, a.index_dim).requires_grad_(),
        index_w=rand(B, L, a.index_heads, scale=a.index_heads ** -0.5).requires_grad_(),
        teacher_q=rand(a.groups, B, a.heads, L, a.head_dim),
        teacher_k=rand(a.groups, B, a.kv_heads or a.heads, L, a.head_dim),
        scale=a.head_dim ** -0.5,
    )


def pooled_selection(B, L, topk, P, device):
    """[B, L, topk + P - 1]: topk / P complete pools per row, evenly spread with a random phase (all of them
    when fewer are visible), expanded to tokens, then the visible tail; -1 elsewhere. No L x L tensor."""
    kept = topk // P
    t = torch.arange(L, device=device)[:, None]
    complete = (t + 1) // P
    j = torch.arange(kept, device=device)[None, :]
    phase = torch.rand(L, 1, generator=torch.Generator(device=device).manual_seed(0), device=device)
    spread = torch.floor((j + phase) * complete / kept).long()
    pools = torch.where(complete >= kept, spread, torch.where(j < complete, j, -1))  # [L, kept]
    tokens = (pools[..., None] * P + torch.arange(P, device=device)).flatten(1)
    tokens = torch.where(pools.repeat_interleave(P, dim=1) >= 0, tokens, -1)
    i = torch.arange(P - 1, device=device)[None, :]
    tail = torch.where(i < (t + 1) % P, complete * P + i, -1)
    return torch.cat([tokens, tail], dim=1).to(torch.int32)[None].expand(B, -1, -1).contiguous()


def process_seconds(fn, repeats):
    """Median CPU time of this process per call (after one untimed call): on a shared CPU, where wall time
    mostly measures the other processes, the figure to compare."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def run_shape(mode, L, a, device, backend):
    x = make_inputs(L, a, device, torch.bfloat16 if device == "cuda" else torch.float32)
    topk = pooled_selection(a.batch, L, a.topk, a.pool, device) if mode == "sparse" else None
    leaves = [x["index_q"], x["token_keys"], x["pool_keys"], x["index_w"]]

    def backward(loss):
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss.detach()

    def token():
        return backward(indexer_kl_loss(x["index_q"], x["token_keys"], x["index_w"], x["teacher_q"], x["teacher_k"],
                                        x["scale"], topk_indices=topk, backend=backend))

    def pooled():
        keys = pool_to_tokens(x["pool_keys"], a.pool, L)
        return backward(indexer_kl_loss(x["index_q"], keys, x["index_w"], x["teacher_q"], x["teacher_k"],
                                        x["scale"], topk_indices=topk, backend=backend, pool_size=a.pool))

    def reference():
        kl, _ = reference_pooled_indexer_kl_loss(x["index_q"], x["pool_keys"], x["index_w"], x["teacher_q"],
                                                 x["teacher_k"], x["scale"], pool_size=a.pool, topk_indices=topk)
        return backward(kl)

    row = {"mode": mode, "L": L, "pool": a.pool, "groups": a.groups, "backend": backend,
           "token": timed(token, repeats=a.repeats), "pooled": timed(pooled, repeats=a.repeats)}
    if L <= a.reference_max:
        row["reference"] = timed(reference, repeats=a.repeats)
    if "seconds" in row["token"] and "seconds" in row["pooled"]:
        row["pooled_over_token"] = row["pooled"]["seconds"] / row["token"]["seconds"]
    if device == "cpu":
        row["token_cpu_s"], row["pooled_cpu_s"] = process_seconds(token, a.repeats), process_seconds(pooled, a.repeats)
        row["pooled_over_token_cpu"] = row["pooled_cpu_s"] / row["token_cpu_s"]
    return row


def markdown(rows):
    cpu = "token_cpu_s" in rows[0]
    extra = "CPU time token / pooled (ratio)" if cpu else "peak GiB token / pooled"
    lines = [f"| mode | L | P | G | token | pooled | pooled / token | reference (materialising) | {extra} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['pooled_over_token']:.2f}" if "pooled_over_token" in r else ""
        last = (f"{r['token_cpu_s']:.2f} s / {r['pooled_cpu_s']:.2f} s ({r['pooled_over_token_cpu']:.2f})" if cpu
                else f"{fmt_gib(r['token'])} / {fmt_gib(r['pooled'])}")
        lines.append(f"| {r['mode']} | {r['L']} | {r['pool']} | {r['groups']} | {fmt_seconds(r['token'])} | "
                     f"{fmt_seconds(r['pooled'])} | {ratio} | {fmt_seconds(r.get('reference'))} | {last} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["dense", "sparse", "both"], default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--groups", type=int, default=2, help="served layers per F indexer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="teacher key heads (default: = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--index-heads", type=int, default=4)
    p.add_argument("--index-dim", type=int, default=32)
    p.add_argument("--pool", type=int, default=16, help="index_kpool (GLM-5.3-Flash: 16)")
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-max", type=int, default=2048, help="longest L for the materialising reference")
    p.add_argument("--out", type=str, required=True, help="folder for bench_pooled_kl.json and .md")
    a = p.parse_args()
    if any(L % a.pool or L <= a.topk for L in a.lengths) or a.topk % a.pool:
        p.error("every length must be a multiple of --pool and exceed --topk, a multiple of --pool")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backend = "triton" if a.device == "cuda" else "torch"
    modes = ["dense", "sparse"] if a.mode == "both" else [a.mode]
    rows = []
    for mode in modes:
        for L in a.lengths:
            rows.append(run_shape(mode, L, a, a.device, backend))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    write_results(a.out, "bench_pooled_kl", rows, table, args=vars(a))


if __name__ == "__main__":
    main()
