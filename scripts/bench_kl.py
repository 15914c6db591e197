#!/usr/bin/env python
"""Benchmark of the fused multi-layer indexer KL loss (dense and sparse modes) on one CUDA GPU.

Per shape it measures, forward + backward of the loss (median of CUDA-event timings, warm-up excluded):
  fused    `indexcache_train.kernels.indexer_kl_loss` (Triton; dense or sparse by `topk_indices`)
  naive    `reference_indexer_kl_loss`, which materialises every L x L tensor ("OOM" when it does not fit)
  chunked  the chunked torch path (`indexer_kl_loss(..., backend="torch")`)
  floor    `F.scaled_dot_product_attention` causal forward over the same G teacher layers (V = K's shape)
and reports peak memory (`torch.cuda.max_memory_allocated`, reset before each; "extra" = above the inputs),
achieved TFLOP/s and the ratio to the floor. FLOPs counted (causal pairs P = B L (L+1) / 2):
  floor      G * H * 4 * D * P                         (QK^T and PV)
  fused      dense: `dense_flops` = G*H*2*D*P*2 (LSE pass + loss pass) + 6*Hi*2*Di*P (student, see dense.py)
             sparse: G*H*2*D*(B*L*k)*2 + 3*Hi*2*Di*(B*L*k) (teacher LSE + probabilities, student a/dQ/dK)

Examples:
  python scripts/bench_kl.py --quick --out outputs/bench_quick
  python scripts/bench_kl.py --out outputs/bench_full                      # everything, ~8 min on an H200
  python scripts/bench_kl.py --mode dense --lengths 8192 --groups 2 --breakdown
  python scripts/bench_kl.py --tune --lengths 8192 --groups 2              # tile sweep of the dense kernels
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from indexcache_train.benchmarking import GIB, free_memory
from indexcache_train.kernels import dense, indexer_kl_loss
from indexcache_train.kernels.reference import reference_indexer_kl_loss

# Baselines are skipped above these lengths (naive: O(L^2) memory; chunked: O(L^2) time at ~0.3 TFLOP/s).
NAIVE_MAX = {"dense": 8192, "sparse": 8192}
CHUNKED_MAX = {"dense": 16384, "sparse": 4096}


# ------------------------------------------------------------------------------------------- inputs ----
def make_inputs(L, G, args, device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16

    def rand(*shape, scale=1.0):
        # Filled in slices: an fp32 copy of a 128K-token teacher would take 72 GiB on its own.
        out = torch.empty(*shape, device=device, dtype=dt)
        for part in out.view(-1).split(1 << 28):
            part.copy_(torch.randn(part.numel(), generator=gen, device=device, dtype=torch.float32) * scale)
        return out

    B, Hi, Di, H, Hk, D = args.batch, args.index_heads, args.index_dim, args.heads, args.kv_heads, args.head_dim
    iq = rand(B, L, Hi, Di, scale=Di ** -0.5).requires_grad_()
    ik = rand(B, L, Di).requires_grad_()
    iw = rand(B, L, Hi, scale=Hi ** -0.5).requires_grad_()
    tq = rand(G, B, H, L, D)
    tk = rand(G, B, Hk, L, D)
    return iq, ik, iw, tq, tk, D ** -0.5


def make_topk(B, L, k, device="cuda", seed=0):
    """Valid top-k sets without an L x L tensor: row t < k takes 0..t (then -1); row t >= k takes k keys
    spread evenly over [0, t] with a random phase (distinct since the spacing (t+1)/k >= 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(L, device=device)[:, None].float()
    j = torch.arange(k, device=device)[None, :].float()
    phase = torch.rand(L, 1, generator=gen, device=device)
    spread = torch.floor((j + phase) * (t + 1) / k).long()
    dense_rows = torch.where(j <= t, j, -1.0).long()
    spread = torch.minimum(spread, t.long())  # float rounding may give t + 1 when the phase is near 1
    idx = torch.where(t >= k, spread, dense_rows)
    return idx.to(torch.int32)[None].expand(B, L, k).contiguous()


# ------------------------------------------------------------------------------------------- timing ----
def warm_up(fn, clear=None, max_calls=5, tolerance=0.2):
    """Call `fn` until two calls in a row take times within `tolerance` of each other, at most `max_calls`
    times. Compilation, autotuning, the allocator's growth and the first cuBLAS/SDPA calls of a process all
    fall in these calls: a single warm-up call left the first timed row of a fresh process 30x too slow."""
    previous = None
    for _ in range(max_calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if clear is not None:
            clear()
        if previous is not None and abs(elapsed - previous) <= tolerance * previous:
            return
        previous = elapsed


def measure(fn, budget_s, clear=None):
    """(median seconds, peak bytes allocated, extra bytes above what was allocated before the calls).
    Warm-up calls first (`warm_up`), then as many timed calls as fit in budget_s (1..20)."""
    warm_up(fn, clear)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    start = time.perf_counter()
    while True:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
        if len(times) >= 20 or time.perf_counter() - start + times[-1] > budget_s:
            break
    peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), peak, peak - base


def guarded(fn, budget_s, clear=None):
    try:
        return measure(fn, budget_s, clear)
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        free_memory()


# ------------------------------------------------------------------------------------------- losses ----
def loss_step(loss_fn, inputs, topk):
    """One forward + backward of `loss_fn` (a KL loss with `indexer_kl_loss`'s signature) on `inputs`."""
    iq, ik, iw, tq, tk, scale = inputs

    def step():
        for x in (iq, ik, iw):
            x.grad = None
        loss_fn(iq, ik, iw, tq, tk, scale, topk_indices=topk).backward()
    return step


def chunked_kl_loss(*args, **kwargs):
    return indexer_kl_loss(*args, **kwargs, backend="torch")


def sdpa_step(inputs):
    _, _, _, tq, tk, _ = inputs
    gqa = tq.shape[2] != tk.shape[2]

    def step():
        with torch.no_grad():
            for g in range(tq.shape[0]):
                F.scaled_dot_product_attention(tq[g], tk[g], tk[g], is_causal=True, enable_gqa=gqa)
    return step


# ------------------------------------------------------------------------------------------- FLOPs -----
def floor_flops(L, G, a):
    return G * a.heads * 4 * a.head_dim * a.batch * L * (L + 1) / 2


def fused_flops(L, G, a, k=None):
    if k is None:
        return dense.dense_flops(a.batch, L, G, a.heads, a.head_dim, a.index_heads, a.index_dim)
    sel = a.batch * (L * k - k * (k - 1) / 2)  # valid (t, s) pairs: rows t < k hold t+1 keys
    return G * a.heads * 2 * a.head_dim * sel * 2 + 3 * a.index_heads * 2 * a.index_dim * sel


# ------------------------------------------------------------------------------------------- runs ------
def fmt_time(r):
    return r if isinstance(r, str) else f"{r[0] * 1e3:.1f} ms"


def fmt_mem(r):
    return "" if isinstance(r, str) else f"{r[1] / GIB:.1f} ({r[2] / GIB:.1f})"


def run_shape(mode, L, G, a):
    k = a.topk if mode == "sparse" else None
    row = {"mode": mode, "L": L, "G": G, "B": a.batch, "H": a.heads, "Hk": a.kv_heads, "D": a.head_dim,
           "Hi": a.index_heads, "Di": a.index_dim, "k": k}
    inputs = make_inputs(L, G, a)
    topk = make_topk(a.batch, L, k) if k else None
    budget = a.budget

    leaves = list(inputs[:3])

    def clear():
        for x in leaves:
            x.grad = None

    # For an absorbed-MLA teacher (Hk = 1, D = 576) SDPA has no fused kernel: its "floor" would be the
    # math backend, slower than the fused loss and out of memory from 32K.
    row["floor"] = "skipped" if a.skip_floor else guarded(sdpa_step(inputs), budget)
    row["fused"] = guarded(loss_step(indexer_kl_loss, inputs, topk), budget, clear)
    if a.skip_naive or L > NAIVE_MAX[mode]:
        row["naive"] = "skipped"
    else:
        row["naive"] = guarded(loss_step(reference_indexer_kl_loss, inputs, topk), budget, clear)
    if a.skip_chunked or L > CHUNKED_MAX[mode]:
        row["chunked"] = "skipped"
    else:
        row["chunked"] = guarded(loss_step(chunked_kl_loss, inputs, topk), budget, clear)
    fl, ff = floor_flops(L, G, a), fused_flops(L, G, a, k)
    row["floor_tflops"] = None if isinstance(row["floor"], str) else fl / row["floor"][0] / 1e12
    row["fused_tflops"] = None if isinstance(row["fused"], str) else ff / row["fused"][0] / 1e12
    row["ratio"] = (None if isinstance(row["fused"], str) or isinstance(row["floor"], str)
                    else row["fused"][0] / row["floor"][0])
    leaves.clear()
    del inputs, topk
    free_memory()
    return row


def markdown(rows):
    head = ("| mode | L | G | fused | fused peak GiB (extra) | fused TFLOP/s | fused / floor | naive | naive GiB | "
            "chunked | chunked GiB | SDPA floor | floor TFLOP/s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append("| " + " | ".join([
            r["mode"] + (f" k={r['k']}" if r["k"] else ""), f"{r['L'] // 1024}K", str(r["G"]),
            fmt_time(r["fused"]), fmt_mem(r["fused"]),
            "" if r["fused_tflops"] is None else f"{r['fused_tflops']:.0f}",
            "" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            fmt_time(r["naive"]), fmt_mem(r["naive"]), fmt_time(r["chunked"]), fmt_mem(r["chunked"]),
            fmt_time(r["floor"]), "" if r["floor_tflops"] is None else f"{r['floor_tflops']:.0f}",
        ]) + " |")
    return "\n".join(out)


def kernel_breakdown(fn):
    """CUDA time per kernel name over one call of fn (torch profiler), in ms."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0)
        if t:
            times[evt.key] = times.get(evt.key, 0.0) + t / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


TUNE_CANDIDATES = {
    "student_lse": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    "teacher_lse": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2)],
    "loss": [(128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2)],
    "dq": [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
    "dk": [(64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
}
KERNEL_OF = {"student_lse": "_student_lse_kernel", "teacher_lse": "_teacher_lse_kernel",
             "loss": "_dense_loss_kernel", "dq": "_dense_dq_kernel", "dk": "_dense_dk_kernel"}


def tune(L, G, a):
    """Time each dense kernel under each candidate tile config (others at their defaults)."""
    iq, ik, iw, tq, tk, scale = make_inputs(L, G, a)
    accs = [torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (iq, ik, iw)]
    results = {}
    for name, cands in TUNE_CANDIDATES.items():
        results[name] = []
        for cfg in cands:
            def call():
                dense._dense_kl_triton(iq.detach(), ik.detach(), iw.detach(), tq, tk, scale, 1.0, *accs,
                                       configs={name: cfg})
            try:
                ms = sum(v for k, v in kernel_breakdown(call).items() if KERNEL_OF[name] in k) or "not found"
            except Exception as e:  # out of shared memory / registers for this tile
                ms = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            results[name].append((cfg, ms))
            print(f"tune {name} {cfg}: {ms if isinstance(ms, str) else f'{ms:.2f} ms'}", flush=True)
    best = {n: min((c for c in r if not isinstance(c[1], str)), key=lambda c: c[1])[0] for n, r in results.items()
            if any(not isinstance(c[1], str) for c in r)}
    print("best configs:", json.dumps(best), flush=True)
    return {"L": L, "G": G, "results": {n: [[list(c), m] for c, m in r] for n, r in results.items()},
            "best": best}


def write(out, report, meta):
    if not out:
        return
    base = out
    for suffix in (".md", ".json"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    if "table" in report:
        with open(base + ".md", "w") as f:
            f.write(f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}\n\n"
                    f"Command: `{' '.join(meta['argv'])}`\n\n{report['table']}\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["dense", "sparse", "both"], default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=None, help="teacher key heads (default: = heads, MHA)")
    p.add_argument("--head-dim", type=int, default=192)
    p.add_argument("--index-heads", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-chunked", action="store_true")
    p.add_argument("--skip-floor", action="store_true", help="no SDPA floor (meaningless for Hk=1, D>256)")
    p.add_argument("--quick", action="store_true", help="L in {4K, 8K}, G in {1, 2}")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per measurement")
    p.add_argument("--breakdown", nargs="*", default=None, metavar="L:G",
                   help="per-kernel CUDA time of the fused dense path at these shapes (default 8192:2)")
    p.add_argument("--tune", action="store_true", help="tile sweep of the dense kernels instead of the table")
    p.add_argument("--configs", type=str, default=None, help="JSON {kernel: [BM, BN, warps, stages]} override")
    p.add_argument("--out", type=str, default=None, help="write OUT.md and OUT.json")
    a = p.parse_args()
    a.kv_heads = a.kv_heads or a.heads
    if a.quick:
        a.lengths, a.groups = [4096, 8192], [1, 2]
    if not torch.cuda.is_available():
        sys.exit("bench_kl.py needs a CUDA device.")
    if a.configs:
        dense.GPU_CONFIGS.update({k: tuple(v) for k, v in json.loads(a.configs).items()})
    dev = torch.cuda.get_device_properties(0)
    meta = {"device": dev.name, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "argv": sys.argv, "configs": dense.GPU_CONFIGS}
    print(json.dumps(meta), flush=True)
    report = {"meta": meta}

    if a.tune:
        report["tune"] = [tune(L, G, a) for L in a.lengths for G in a.groups]
    else:
        modes = ["dense", "sparse"] if a.mode == "both" else [a.mode]
        rows = []
        for L in a.lengths:
            for mode in modes:
                for G in a.groups:
                    t = time.perf_counter()
                    try:
                        row = run_shape(mode, L, G, a)
                    except Exception as e:  # keep the rest of the table
                        row = {"mode": mode, "L": L, "G": G, "error": f"{type(e).__name__}: {e}"[:300]}
                        print(json.dumps(row), flush=True)
                        report.setdefault("errors", []).append(row)
                        free_memory()
                        continue
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], f"  [{time.perf_counter() - t:.0f}s]", flush=True)
                    report["rows"], report["table"] = rows, markdown(rows)
                    write(a.out, report, meta)  # after every row, so a time-out keeps what was measured
        report["rows"] = rows
        table = markdown(rows)
        report["table"] = table
        if a.breakdown is not None and "dense" in modes:
            report["breakdown"] = {}
            for shape in a.breakdown or ["8192:2"]:
                L, G = (int(x) for x in shape.split(":"))
                inputs = make_inputs(L, G, a)
                bd = kernel_breakdown(loss_step(indexer_kl_loss, inputs, None))
                report["breakdown"][f"L={L},G={G}"] = bd
                print(f"breakdown L={L} G={G} (ms):", json.dumps({k: round(v, 2) for k, v in bd.items()}),
                      flush=True)
                del inputs
                torch.cuda.empty_cache()
        print()
        print(table, flush=True)
    write(a.out, report, meta)


if __name__ == "__main__":
    main()
