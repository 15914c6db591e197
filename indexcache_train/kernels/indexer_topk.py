"""The lightning indexer's selection, fused: its logits a tile at a time, then a top-k per block of queries.

For query t (absolute position query_start + t) and key s, with the softmax scale folded into q and the
1/sqrt(Hi) head scale folded into w (as `DSAAdapter.indexer_projections` returns them):

    I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h,:] . k[b,s,:])     if s <= query_start + t,  else -inf

in fp32 (bf16/fp16 operands give exact products, accumulated in fp32), and the selection of each query is the
`topk(min(index_topk, T))` of its row, as transformers' `GlmMoeDsaIndexer` / `DeepseekV32Indexer` rank it.
The native forward holds [B, L, Hi, T] fp32 scores; neither path here ever holds a per-head [chunk, Hi, T].

Triton path: a program computes one [BLOCK_M queries, BLOCK_N keys] tile. It loads the key tile once, then
loops over the heads: s = q_h . k^T on the tensor cores (fp32 accumulation), relu, times w[:, h], added into
an fp32 tile in registers; the causal mask and one store end it. Tiles wholly above the diagonal store -inf
without computing. Programs of one query tile run side by side (the key tile index is the fastest grid axis),
so the tile's q, Hi x larger than a key tile, is read from HBM once and served from L2 to the others.
Cost: 2*Hi*Di flops per visible (t, s) pair, `indexer_logits_flops`. bf16/fp16 q and k run on the tensor
cores; fp32 ones take tl.dot's exact fp32 path (no tensor cores, register-bound: for tests), so pass bf16.

Torch path: the same maths a few query rows at a time, all heads in one matmul and the heads summed by a
[1, Hi] @ [Hi, T] matmul per row, as the native forward sums them; its temporaries stay near 32 MiB.

`indexer_topk` computes the logits of `chunk_rows` queries at a time over only the keys that the chunk's last
query sees, ranks them with `torch.topk`, and marks slots that hold a masked key (rows with fewer than k
visible keys) with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexer_kl import pick_backend
from .common import common_dtype, interpreting, lastdim_contiguous

# Elements of the fp32 [B, chunk, T] logits block per top-k step: 1 GiB on a GPU, where larger chunks keep
# the launches full; 256 MiB on CPU, whose torch path gains nothing from larger chunks.
_CHUNK_BUDGET_ELEMS = {"cuda": 1 << 28, "cpu": 1 << 26}
# Elements of the torch path's per-row-block head scores [B, rows, Hi, T'] (32 MiB fp32).
_TORCH_TEMP_ELEMS = 1 << 23
_INTERPRET = interpreting()


# --------------------------------------------------------------------------------------------- Triton ----
@triton.jit
def _indexer_logits_kernel(
    q_ptr, k_ptr, w_ptr, out_ptr,
    C, T, Hi, query_start,
    s_q_b, s_q_c, s_q_h,
    s_k_b, s_k_t,
    s_w_b, s_w_c, s_w_h,
    s_o_b, s_o_c,
    Di: tl.constexpr, DIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    col_ok = cols < T
    # int64 offsets: C * T passes 2^31 for long chunks, and T * Di for long sequences.
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if n0 > query_start + tl.minimum(m0 + BLOCK_M, C) - 1:
        # Above the causal diagonal for every row of the tile: nothing to compute.
        tl.store(out_ptr + b * s_o_b + rows64[:, None] * s_o_c + cols64[None, :],
                 tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32), mask=out_mask)
    else:
        d = tl.arange(0, DIP)
        d_ok = d < Di
        k = tl.load(k_ptr + b * s_k_b + cols64[:, None] * s_k_t + d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if CAST_FP32:  # the interpreter's bf16 dot is wrong
            k = k.to(tl.float32)
        k_t = tl.trans(k)
        q_ptrs = q_ptr + b * s_q_b + rows64[:, None] * s_q_c + d[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        w_ptrs = w_ptr + b * s_w_b + rows64 * s_w_c
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for h in range(Hi):
            q = tl.load(q_ptrs + h * s_q_h, mask=q_mask, other=0.0)
            if CAST_FP32:
                q = q.to(tl.float32)
            w = tl.load(w_ptrs + h * s_w_h, mask=row_ok, other=0.0).to(tl.float32)
            s = tl.dot(q, k_t, input_precision="ieee")
            acc += tl.maximum(s, 0.0) * w[:, None]
        acc = tl.where(cols[None, :] > query_start + rows[:, None], float("-inf"), acc)
        # The output pointers are formed only now: held through the head loop they cost ~20 registers.
        tl.store(out_ptr + b * s_o_b + rows64[:, None] * s_o_c + cols64[None, :], acc, mask=out_mask)


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). On a GPU `triton.autotune` picks among them once per (Hi, Di,
# dtypes); the interpreter runs one small tile, so that small test shapes still span several tiles.
# Each head step reads a [BLOCK_M, Di] q tile from L2 for 2*BLOCK_M*BLOCK_N*Di flops (1/BLOCK_N bytes a flop):
# at BLOCK_N = 128 that is ~5.5 TB/s of L2 reads at 700 TFLOP/s, hence also 64 x 256 tiles. Compiled for sm_90
# (bf16, Di = 128; not yet timed), none spills: 128 x 128 and 64 x 256 at 8 warps take ~195-210 registers (one
# CTA per SM); 128 x 64 at 8 warps / 2 stages (125 registers, 80 KB) and 64 x 128 at 4 warps fit two per SM.
GPU_CONFIGS = ((128, 128, 8, 3), (128, 128, 8, 2), (64, 256, 8, 3), (64, 256, 8, 2), (128, 64, 8, 2),
               (64, 128, 4, 3))
INTERPRETER_CONFIG = (32, 32, 4, 1)
_autotuned_logits_kernel = triton.autotune(
    configs=[_config(*c) for c in ((INTERPRETER_CONFIG,) if _INTERPRET else GPU_CONFIGS)], key=["Hi", "Di"],
)(_indexer_logits_kernel)


def _logits_triton(index_q, index_k, index_weights, query_start, config=None):
    """`config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner (tests, measurements)."""
    B, C, Hi, Di = index_q.shape
    T = index_k.shape[1]
    # tl.dot needs one operand dtype; fp64 has no tensor-core path, and the logits are fp32 anyway.
    index_q, index_k = common_dtype(lastdim_contiguous(index_q), lastdim_contiguous(index_k))
    if index_q.dtype == torch.float64:
        index_q, index_k = index_q.float(), index_k.float()
    out = torch.empty(B, C, T, dtype=torch.float32, device=index_q.device)
    if C == 0:  # no program to launch
        return out
    args = (index_q, index_k, index_weights, out, C, T, Hi, query_start,
            *index_q.stride()[:3], *index_k.stride()[:2], *index_weights.stride(), *out.stride()[:2])
    meta = dict(Di=Di, DIP=max(16, triton.next_power_of_2(Di)), CAST_FP32=index_q.device.type != "cuda")
    if config is None:
        def grid(m):
            return triton.cdiv(T, m["BLOCK_N"]), triton.cdiv(C, m["BLOCK_M"]), B
        _autotuned_logits_kernel[grid](*args, **meta)
    else:
        block_m, block_n, num_warps, num_stages = config
        _indexer_logits_kernel[(triton.cdiv(T, block_n), triton.cdiv(C, block_m), B)](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out


# ---------------------------------------------------------------------------------------------- torch ----
def _logits_torch(index_q, index_k, index_weights, query_start):
    B, C, Hi, Di = index_q.shape
    T = index_k.shape[1]
    out = torch.full((B, C, T), float("-inf"), dtype=torch.float32, device=index_q.device)
    key_t = index_k.float().transpose(1, 2)  # [B, Di, T], a view when k is fp32
    rows = max(1, _TORCH_TEMP_ELEMS // (B * Hi * T))
    for r0 in range(0, C, rows):
        r1 = min(C, r0 + rows)
        n, visible = r1 - r0, min(T, query_start + r1)  # keys past the block's last query are all masked
        scores = torch.matmul(index_q[:, r0:r1].float().reshape(B, n * Hi, Di), key_t[:, :, :visible])
        scores = scores.relu_().view(B, n, Hi, visible)
        block = torch.matmul(index_weights[:, r0:r1, None].float(), scores).squeeze(2)  # [B, n, visible]
        del scores
        position = torch.arange(query_start + r0, query_start + r1, device=out.device)
        block.masked_fill_(torch.arange(visible, device=out.device) > position[:, None], float("-inf"))
        out[:, r0:r1, :visible] = block
    return out


# ------------------------------------------------------------------------------------------- dispatch ----
def _check_inputs(index_q, index_k, index_weights, query_start) -> None:
    if index_q.dim() != 4 or index_k.dim() != 3 or index_weights.dim() != 3:
        raise ValueError(
            "Expected index_q [B, C, Hi, Di], index_k [B, T, Di] and index_weights [B, C, Hi]; got "
            f"{tuple(index_q.shape)}, {tuple(index_k.shape)} and {tuple(index_weights.shape)}."
        )
    B, C, Hi, Di = index_q.shape
    T = index_k.shape[1]
    if index_k.shape != (B, T, Di) or index_weights.shape != (B, C, Hi):
        raise ValueError(
            f"index_k must be {(B, 'T', Di)} and index_weights {(B, C, Hi)} to match index_q "
            f"{tuple(index_q.shape)}; got {tuple(index_k.shape)} and {tuple(index_weights.shape)}."
        )
    if min(B, Hi, Di, T) == 0:
        raise ValueError(f"Empty inputs: B={B}, Hi={Hi}, Di={Di}, T={T} must all be >= 1.")
    for name, tensor in (("index_q", index_q), ("index_k", index_k), ("index_weights", index_weights)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {tensor.dtype}.")
        if tensor.device != index_q.device:
            raise ValueError(f"{name} is on {tensor.device} but index_q is on {index_q.device}.")
    if not isinstance(query_start, int) or query_start < 0 or query_start + C > T:
        raise ValueError(
            f"query_start={query_start!r} must be an int with 0 <= query_start and query_start + C <= T: the C={C} "
            f"queries sit at positions query_start .. query_start + C - 1 of the T={T} keys."
        )


def _logits(index_q, index_k, index_weights, query_start, backend):
    fn = _logits_triton if backend == "triton" else _logits_torch
    return fn(index_q.detach(), index_k.detach(), index_weights.detach(), query_start)


def indexer_logits(index_q, index_k, index_weights, *, query_start=0, backend=None) -> torch.Tensor:
    """index_q [B, C, Hi, Di] (a block of C query rows, softmax scale already folded in, any float dtype),
    index_k [B, T, Di], index_weights [B, C, Hi] (head scale folded in; fp32 or bf16).
    Returns fp32 [B, C, T]: sum_h w * relu(q_h . k_s) for s <= query_start + t, -inf elsewhere."""
    _check_inputs(index_q, index_k, index_weights, query_start)
    backend = pick_backend(index_q.device, backend)
    with torch.no_grad():
        return _logits(index_q, index_k, index_weights, query_start, backend)


def default_chunk_rows(batch: int, num_keys: int, device: torch.device) -> int:
    """Queries per top-k step: the fp32 [B, chunk, T] block within `_CHUNK_BUDGET_ELEMS`, in whole 128-row
    tiles where it allows."""
    budget = _CHUNK_BUDGET_ELEMS["cuda" if device.type == "cuda" else "cpu"]
    rows = max(1, budget // (batch * num_keys))
    return rows // 128 * 128 if rows >= 128 else rows


def indexer_topk(index_q, index_k, index_weights, topk, *, query_start=0, chunk_rows=None, backend=None):
    """int32 [B, L, min(topk, T)]: each query's top-k keys by the logits above, computed chunk_rows queries at a
    time (default: `default_chunk_rows`, which bounds the fp32 [B, chunk, T] block to 1 GiB on a GPU and to
    256 MiB on CPU); a slot whose key is not
    visible (fewer than topk keys s <= t) is -1. Ties may be ordered differently from torch.topk on the
    native scores."""
    _check_inputs(index_q, index_k, index_weights, query_start)
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}.")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}.")
    backend = pick_backend(index_q.device, backend)
    B, L = index_q.shape[:2]
    T = index_k.shape[1]
    k = min(topk, T)
    chunk_rows = chunk_rows or default_chunk_rows(B, T, index_q.device)
    selected = torch.full((B, L, k), -1, dtype=torch.int32, device=index_q.device)
    with torch.no_grad():
        for r0 in range(0, L, chunk_rows):
            r1 = min(L, r0 + chunk_rows)
            visible = query_start + r1  # no query of the chunk sees a key past its last one
            logits = _logits(index_q[:, r0:r1], index_k[:, :visible], index_weights[:, r0:r1], query_start + r0,
                             backend)
            values, indices = logits.topk(min(k, visible), dim=-1, sorted=False)
            del logits
            selected[:, r0:r1, :indices.shape[-1]] = indices.masked_fill_(values == float("-inf"), -1)
    return selected


def indexer_logits_flops(B, L, Hi, Di, query_start=0, C=None) -> int:
    """Flops of the logits, 2*Hi*Di per visible (t, s) pair, for the C queries at positions query_start ..
    query_start + C - 1 (default: through L - 1) of a length-L sequence; 2*Hi*Di*B*L*(L+1)/2 for all of it."""
    C = L - query_start if C is None else C
    pairs = C * query_start + C * (C + 1) // 2
    return 2 * Hi * Di * B * pairs
