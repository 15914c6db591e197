"""Dense mode of the fused multi-layer indexer KL loss: Triton kernels, their launch helper, and a chunked
torch implementation with the same semantics. Entry point: `dense_kl_accumulate`.

Maths, for batch b, query row t and key s <= t0 + t (the causal support, t0 = `query_start` the position of
row 0 among the keys: 0 when the rows are all the keys; everything below is 0 elsewhere):

  student   a[t,h,s] = q_I[b,t,h] . k_I[b,s]                         (Hi heads of dim Di, scales folded in)
            I[t,s]   = sum_h w[b,t,h] * relu(a[t,h,s])
            log q[t,s] = I[t,s] - lseI[t],   lseI[t] = log sum_{s<=t0+t} exp I[t,s]
  teacher   z[g,h,t,s] = teacher_scale * q_T[g,b,h,t] . k_T[g,b,h // (H/Hk),s]
            p[t,s]   = (1/(G*H)) sum_{g,h} exp(z[g,h,t,s] - lseT[g,h,t])
  loss      sum_t KL(p[t] || q[t]) = sum_t sum_s p (log p - log q)     (0 log 0 = 0)

Gradients of that sum (c = grad_scale, added into the caller's fp32 accumulators):
  dI[t,s]        = q[t,s] - p[t,s]                                     (never through -p/q)
  dW[b,t,h]     += c * sum_s dI[t,s] * relu(a[t,h,s])
  dQ[b,t,h,:]   += c * sum_s dI[t,s] * w[t,h] * [a[t,h,s] > 0] * k_I[b,s,:]
  dK[b,s,:]     += c * sum_{t0+t>=s} sum_h dI[t,s] * w[t,h] * [a[t,h,s] > 0] * q_I[b,t,h,:]

All LSEs are stored base 2 (FlashMLA / Triton-tutorial convention): lse2 = log2 sum 2^(x * log2 e), so that
probabilities are exp2(x * log2 e - lse2); the loss converts back to nats with ln 2 at the end.

Triton path (nothing L x L is stored; memory is O(L) plus one [B, C, t0 + L] fp32 scratch of at most ~1 GiB):
  1. `_student_lse_kernel` (pass A): lseI[b, t] for all rows, flash style (online max/sum), split over key
     blocks for parallelism, the splits merged by a log-sum-exp in torch.
  2. `_teacher_lse_kernel`: lseT[g, b, h, t], an LSE-only flash-attention forward.
  3. For each chunk of C query rows:
     a. `_dense_loss_kernel` (pass B): per (query block, key block) tile, rebuilds I and q from lseI, and
        p from all G*H teacher heads and lseT; accumulates the row loss; writes dI = q - p to the scratch.
     b. `_dense_dq_kernel`: per (query block, index head): dW and dQ, reading dI and recomputing a.
     c. `_dense_dk_kernel`: per (key block, head split): dK, reading dI and recomputing a.
  Since every tile of pass B only needs the two LSEs, tiles are independent and the key blocks of one query
  block are spread over several programs (KSPLIT): the chunk's rows alone would not fill the GPU at 128K.

FLOPs (causal: P = L t0 + L (L+1) / 2 pairs per head; 2 FLOPs per multiply-add), see `dense_flops`:
  teacher: 2 passes (LSE, pass B) x G x H x 2D x P
  student: 6 x Hi x 2Di x P   (pass A, pass B, the dq kernel's a and dQ, the dk kernel's a and dK)

Pools (`kpool` = P > 1, a pooled indexer, see `pooled.py`): the support of row t is s <= t - (t + 1) mod P
instead of s <= t (`_visible`), everything else unchanged.

Numerics: fp32 for logits, probabilities, LSEs and accumulators; bf16/fp16 inputs feed `tl.dot` natively on
a GPU (fp32 inputs use TF32 there). Under TRITON_INTERPRET=1 every load is cast to fp32, since the
interpreter's bf16 dot and arithmetic are wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E, interpreting
from .pooled import visible_limit

# The constants, usable inside @triton.jit functions (Triton only reads constexpr globals).
_LOG2E_C = tl.constexpr(LOG2E)
_LN2_C = tl.constexpr(LN2)

# Bytes of the [B, C, t0 + L] fp32 dI scratch of the Triton path (sets the query-chunk size C).
_SCRATCH_BYTES = 1 << 30
# Elements of the largest intermediate of the torch path ([B, H, C, t0 + L] scores per layer).
_TORCH_BUDGET_ELEMS = 1 << 27


def dense_flops(batch: int, seq_len: int, groups: int, heads: int, head_dim: int, index_heads: int,
                index_dim: int, query_start: int = 0) -> float:
    """FLOPs of one `dense_kl_accumulate` call on the Triton path (the causal pairs of `seq_len` query rows
    at positions query_start .. query_start + seq_len - 1)."""
    pairs = batch * (seq_len * query_start + seq_len * (seq_len + 1) / 2)
    teacher = 2 * groups * heads * 2 * head_dim * pairs      # LSE pass + pass B, each one QK^T per head
    student = 6 * index_heads * 2 * index_dim * pairs        # see module docstring
    return teacher + student


# --------------------------------------------------------------------------------------------- Triton ----
def _interpreter_settings(device: torch.device) -> bool:
    """Interpreter tiles and fp32 casts: under TRITON_INTERPRET=1 or for CPU tensors."""
    return interpreting() or device.type != "cuda"


def _split_dim(dim: int) -> tuple[int, int]:
    """Cover a head dim with two power-of-two tiles (>= 16 for tl.dot): 192 -> 128 + 64, 40 -> 32 + 16."""
    first = max(16, 1 << (dim.bit_length() - 1))
    rest = dim - first
    return first, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def _load_rows(row_ptrs, row_mask, d0, BD: tl.constexpr, D, CAST_FP32: tl.constexpr):
    """A [rows, BD] tile (row_ptrs: [rows, 1] pointers to each row's start, unit stride along d), zero-padded
    past D."""
    d = d0 + tl.arange(0, BD)
    x = tl.load(row_ptrs + d[None, :], mask=row_mask[:, None] & (d[None, :] < D), other=0.0)
    if CAST_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_cols(col_ptrs, col_mask, d0, BD: tl.constexpr, D, CAST_FP32: tl.constexpr):
    """The transposed [BD, cols] tile (col_ptrs: [cols] pointers to each key's start): the B operand of
    q @ k^T."""
    d = d0 + tl.arange(0, BD)
    x = tl.load(col_ptrs[None, :] + d[:, None], mask=col_mask[None, :] & (d[:, None] < D), other=0.0)
    if CAST_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _visible(offs_m, offs_n, KPOOL: tl.constexpr):
    """[rows, keys] support: s <= t, or with pools of KPOOL keys (KPOOL > 1) s <= t - (t + 1) % KPOOL, the
    last key of the last pool that ends at or before t (see `visible_limit`)."""
    if KPOOL == 1:
        return offs_n[None, :] <= offs_m[:, None]
    return offs_n[None, :] <= (offs_m - (offs_m + 1) % KPOOL)[:, None]


@triton.jit
def _index_logits(iq_rows, s_iq_h, iw_rows, s_iw_h, m_mask, kt1, kt2, HI, DI,
                  BDI1: tl.constexpr, BDI2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAST_FP32: tl.constexpr):
    """I tile [BLOCK_M, BLOCK_N] = sum_h w[:, h] * relu(q_h @ k^T). The key tile (kt1, kt2 = k^T split along
    Di) is shared by all Hi heads and stays on chip; only q_h streams, so the loop is a pipelined GEMM chain."""
    logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(HI):
        q1 = _load_rows(iq_rows + h * s_iq_h, m_mask, 0, BDI1, DI, CAST_FP32)
        a = tl.dot(q1, kt1)
        if BDI2 > 0:
            q2 = _load_rows(iq_rows + h * s_iq_h, m_mask, BDI1, BDI2, DI, CAST_FP32)
            a = tl.dot(q2, kt2, a)
        w = tl.load(iw_rows + h * s_iw_h, mask=m_mask, other=0.0).to(tl.float32)
        logits += w[:, None] * tl.maximum(a, 0.0)
    return logits


@triton.jit
def _student_lse_kernel(
    iq_ptr, ik_ptr, iw_ptr, m_ptr, l_ptr,
    L, Q0, HI, DI,
    s_iq_b, s_iq_t, s_iq_h, s_ik_b, s_ik_t, s_iw_b, s_iw_t, s_iw_h,
    KSPLIT, BDI1: tl.constexpr, BDI2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr, KPOOL: tl.constexpr,
):
    """Pass A: partial (max, sum) of 2^(I log2 e) over key blocks split, split+j*KSPLIT, ... <= diagonal.
    Grid (KSPLIT, query blocks [heaviest first], B); the splits of a block run side by side and share its q.
    L query rows at key positions Q0 .. Q0 + L - 1."""
    split = tl.program_id(0)
    qb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit address arithmetic (tensors beyond 2^31 elements)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < L
    pos_m = Q0 + offs_m
    iq_rows = iq_ptr + b * s_iq_b + offs_m.to(tl.int64)[:, None] * s_iq_t
    iw_rows = iw_ptr + b * s_iw_b + offs_m * s_iw_t
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_kb = tl.cdiv(Q0 + tl.minimum((qb + 1) * BLOCK_M, L), BLOCK_N)
    for kb in range(split, n_kb, KSPLIT):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Q0 + L
        kcols = ik_ptr + b * s_ik_b + offs_n * s_ik_t
        kt1 = _load_cols(kcols, n_mask, 0, BDI1, DI, CAST_FP32)
        kt2 = kt1
        if BDI2 > 0:
            kt2 = _load_cols(kcols, n_mask, BDI1, BDI2, DI, CAST_FP32)
        logits = _index_logits(iq_rows, s_iq_h, iw_rows, s_iw_h, m_mask, kt1, kt2, HI, DI,
                               BDI1, BDI2, BLOCK_M, BLOCK_N, CAST_FP32)
        x = tl.where(_visible(pos_m, offs_n, KPOOL), logits * _LOG2E_C, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m_i = m_new
    out = split * tl.num_programs(2) * L + b * L + offs_m
    tl.store(m_ptr + out, m_i, mask=m_mask)
    tl.store(l_ptr + out, l_i, mask=m_mask)


@triton.jit
def _teacher_lse_tile(q1, q2, tk_cols, pos_m, offs_n, num_keys, D, qk_scale2, m_i, l_i,
                      BD1: tl.constexpr, BD2: tl.constexpr, CAUSAL: tl.constexpr, CAST_FP32: tl.constexpr,
                      KPOOL: tl.constexpr):
    n_mask = offs_n < num_keys
    kt1 = _load_cols(tk_cols, n_mask, 0, BD1, D, CAST_FP32)
    s = tl.dot(q1, kt1)
    if BD2 > 0:
        kt2 = _load_cols(tk_cols, n_mask, BD1, BD2, D, CAST_FP32)
        s = tl.dot(q2, kt2, s)
    s = s * qk_scale2
    if CAUSAL:
        s = tl.where(_visible(pos_m, offs_n, KPOOL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _teacher_lse_kernel(
    tq_ptr, tk_ptr, lse_ptr,
    L, Q0, H, REP, D, qk_scale2,
    s_tq_g, s_tq_b, s_tq_h, s_tq_t, s_tk_g, s_tk_b, s_tk_h, s_tk_t,
    BD1: tl.constexpr, BD2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr, KPOOL: tl.constexpr,
):
    """lseT (base 2) of one (layer, batch, head, query block): an LSE-only flash-attention forward.
    q stays in registers, k streams; the off-diagonal key blocks run without a mask, the diagonal ones with.
    Every causal row has its diagonal key, so the running max is finite after the first diagonal block; with
    pools (KPOOL > 1) the first KPOOL - 1 rows have no key, get lse = -inf, and every use of them is masked."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < L
    q_rows = tq_ptr + g * s_tq_g + b * s_tq_b + h * s_tq_h + offs_m[:, None] * s_tq_t
    q1 = _load_rows(q_rows, m_mask, 0, BD1, D, CAST_FP32)
    q2 = q1
    if BD2 > 0:
        q2 = _load_rows(q_rows, m_mask, BD1, BD2, D, CAST_FP32)
    k_base = tk_ptr + g * s_tk_g + b * s_tk_b + (h // REP) * s_tk_h
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_m = Q0 + offs_m
    lo = (Q0 + qb * BLOCK_M) // BLOCK_N * BLOCK_N   # keys below lo are <= every row of the block
    hi = Q0 + tl.minimum((qb + 1) * BLOCK_M, L)
    for start_n in range(0, lo, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_i, l_i = _teacher_lse_tile(q1, q2, k_base + offs_n * s_tk_t, pos_m, offs_n, Q0 + L, D, qk_scale2,
                                     m_i, l_i, BD1, BD2, False, CAST_FP32, KPOOL)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_i, l_i = _teacher_lse_tile(q1, q2, k_base + offs_n * s_tk_t, pos_m, offs_n, Q0 + L, D, qk_scale2,
                                     m_i, l_i, BD1, BD2, True, CAST_FP32, KPOOL)
    lse = m_i + tl.log2(l_i)
    tl.store(lse_ptr + (bh + g * tl.num_programs(1)) * L + offs_m, lse, mask=m_mask)


@triton.jit
def _teacher_probs(q_rows, m_mask, kt1, kt2, lse_ptrs, D, qk_scale2,
                   BD1: tl.constexpr, BD2: tl.constexpr, CAST_FP32: tl.constexpr):
    """One teacher head's probabilities on a tile, exp2(scale * log2e * q . k - lse2), unmasked."""
    q1 = _load_rows(q_rows, m_mask, 0, BD1, D, CAST_FP32)
    z = tl.dot(q1, kt1)
    if BD2 > 0:
        q2 = _load_rows(q_rows, m_mask, BD1, BD2, D, CAST_FP32)
        z = tl.dot(q2, kt2, z)
    lse = tl.load(lse_ptrs, mask=m_mask, other=0.0)
    return tl.exp2(z * qk_scale2 - lse[:, None])


@triton.jit
def _dense_loss_kernel(
    iq_ptr, ik_ptr, iw_ptr, lse_i_ptr, tq_ptr, tk_ptr, lse_t_ptr, di_ptr, loss_ptr,
    L, Q0, t0, t1, HI, DI, G, H, REP, D, qk_scale2, inv_gh,
    s_iq_b, s_iq_t, s_iq_h, s_ik_b, s_ik_t, s_iw_b, s_iw_t, s_iw_h,
    s_tq_g, s_tq_b, s_tq_h, s_tq_t, s_tk_g, s_tk_b, s_tk_h, s_tk_t, s_di_b, s_di_t,
    BDI1: tl.constexpr, BDI2: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr,
    KSPLIT, KV_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr, KPOOL: tl.constexpr,
):
    """Pass B over the chunk's rows [t0, t1), at key positions Q0 + t0 .. Q0 + t1 - 1. Grid (KSPLIT, query
    blocks of the chunk, B). For one tile the head mean p needs every teacher head before the (non-linear) loss
    can be taken, so the G*H heads are the inner loop (q_h and, unless Hk = 1, k_h stream through it) and the
    [BM, BN] p accumulator stays in registers. With Hk = 1 the key tile is loaded once per layer and shared by
    all heads."""
    split = tl.program_id(0)
    qb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit address arithmetic (tensors beyond 2^31 elements)
    offs_m = t0 + qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < t1
    pos_m = Q0 + offs_m
    lse_i = tl.load(lse_i_ptr + b * L + offs_m, mask=m_mask, other=0.0)
    iq_rows = iq_ptr + b * s_iq_b + offs_m.to(tl.int64)[:, None] * s_iq_t
    iw_rows = iw_ptr + b * s_iw_b + offs_m * s_iw_t
    row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_kb = tl.cdiv(Q0 + tl.minimum(t0 + (qb + 1) * BLOCK_M, t1), BLOCK_N)
    for kb in range(split, n_kb, KSPLIT):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Q0 + t1
        valid = _visible(pos_m, offs_n, KPOOL) & m_mask[:, None]
        # ---- teacher: p = (1/GH) sum_{g,h} exp2(z * log2e - lse2)
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(G):
            g64 = tl.cast(g, tl.int64)
            q_g = tq_ptr + g64 * s_tq_g + b * s_tq_b + offs_m[:, None] * s_tq_t
            k_g = tk_ptr + g64 * s_tk_g + b * s_tk_b + offs_n * s_tk_t
            lse_g = lse_t_ptr + (g * tl.num_programs(2) + b) * H * L + offs_m
            if KV_SHARED:
                kt1 = _load_cols(k_g, n_mask, 0, BD1, D, CAST_FP32)
                kt2 = kt1
                if BD2 > 0:
                    kt2 = _load_cols(k_g, n_mask, BD1, BD2, D, CAST_FP32)
                for h in range(H):
                    p += _teacher_probs(q_g + tl.cast(h, tl.int64) * s_tq_h, m_mask, kt1, kt2, lse_g + h * L, D,
                                        qk_scale2, BD1, BD2, CAST_FP32)
            else:
                for h in range(H):
                    k_h = k_g + tl.cast(h // REP, tl.int64) * s_tk_h
                    kt1 = _load_cols(k_h, n_mask, 0, BD1, D, CAST_FP32)
                    kt2 = kt1
                    if BD2 > 0:
                        kt2 = _load_cols(k_h, n_mask, BD1, BD2, D, CAST_FP32)
                    p += _teacher_probs(q_g + tl.cast(h, tl.int64) * s_tq_h, m_mask, kt1, kt2, lse_g + h * L, D,
                                        qk_scale2, BD1, BD2, CAST_FP32)
        p = tl.where(valid, p * inv_gh, 0.0)
        # ---- student: log2 q = I log2e - lseI2
        kcols = ik_ptr + b * s_ik_b + offs_n * s_ik_t
        ikt1 = _load_cols(kcols, n_mask, 0, BDI1, DI, CAST_FP32)
        ikt2 = ikt1
        if BDI2 > 0:
            ikt2 = _load_cols(kcols, n_mask, BDI1, BDI2, DI, CAST_FP32)
        logits = _index_logits(iq_rows, s_iq_h, iw_rows, s_iw_h, m_mask, ikt1, ikt2, HI, DI,
                               BDI1, BDI2, BLOCK_M, BLOCK_N, CAST_FP32)
        log2_q = tl.where(valid, logits * _LOG2E_C - lse_i[:, None], 0.0)
        q = tl.where(valid, tl.exp2(log2_q), 0.0)
        # p = 0 (outside the support, or underflow) contributes 0 log 0 = 0.
        row_loss += tl.sum(tl.where(p > 0.0, p * (tl.log2(tl.maximum(p, 1e-30)) - log2_q), 0.0), axis=1)
        di_ptrs = di_ptr + b * s_di_b + (offs_m - t0)[:, None] * s_di_t + offs_n[None, :]
        tl.store(di_ptrs, q - p, mask=m_mask[:, None] & n_mask[None, :])
    pid = (b * tl.num_programs(1) + qb) * KSPLIT + split
    tl.store(loss_ptr + pid, tl.sum(row_loss, axis=0) * _LN2_C)


@triton.jit
def _dense_dq_kernel(
    iq_ptr, ik_ptr, iw_ptr, di_ptr, dq_ptr, dw_ptr,
    Q0, t0, t1, DI, grad_scale,
    s_iq_b, s_iq_t, s_iq_h, s_ik_b, s_ik_t, s_iw_b, s_iw_t, s_iw_h, s_di_b, s_di_t,
    s_dq_b, s_dq_t, s_dq_h, s_dw_b, s_dw_t, s_dw_h,
    BDI1: tl.constexpr, BDI2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr, KPOOL: tl.constexpr,
):
    """dW and dQ of one (index head, query block): a flash-attention-backward dQ loop, q_h and dQ_h on chip,
    key tiles and dI tiles streaming. Grid (Hi, query blocks, B) with the head fastest, so the Hi programs
    of a query block run together and read the same dI tiles from L2."""
    h = tl.program_id(0)
    qb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit address arithmetic (tensors beyond 2^31 elements)
    offs_m = t0 + qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < t1
    q_rows = iq_ptr + b * s_iq_b + offs_m.to(tl.int64)[:, None] * s_iq_t + h * s_iq_h
    q1 = _load_rows(q_rows, m_mask, 0, BDI1, DI, CAST_FP32)
    q2 = q1
    if BDI2 > 0:
        q2 = _load_rows(q_rows, m_mask, BDI1, BDI2, DI, CAST_FP32)
    w = tl.load(iw_ptr + b * s_iw_b + offs_m * s_iw_t + h * s_iw_h, mask=m_mask, other=0.0).to(tl.float32)
    dq1 = tl.zeros((BLOCK_M, BDI1), dtype=tl.float32)
    dq2 = dq1  # placeholder when Di fits one tile
    if BDI2 > 0:
        dq2 = tl.zeros((BLOCK_M, BDI2), dtype=tl.float32)
    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_m = Q0 + offs_m
    hi = Q0 + tl.minimum(t0 + (qb + 1) * BLOCK_M, t1)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Q0 + t1
        k_rows = ik_ptr + b * s_ik_b + offs_n[:, None] * s_ik_t
        k1 = _load_rows(k_rows, n_mask, 0, BDI1, DI, CAST_FP32)
        a = tl.dot(q1, tl.trans(k1))
        if BDI2 > 0:
            k2 = _load_rows(k_rows, n_mask, BDI1, BDI2, DI, CAST_FP32)
            a = tl.dot(q2, tl.trans(k2), a)
        valid = _visible(pos_m, offs_n, KPOOL) & m_mask[:, None]
        g = tl.load(di_ptr + b * s_di_b + (offs_m - t0)[:, None] * s_di_t + offs_n[None, :], mask=valid,
                    other=0.0)
        dw += tl.sum(g * tl.maximum(a, 0.0), axis=1)
        ds = tl.where(a > 0.0, g * w[:, None], 0.0).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1)
        if BDI2 > 0:
            dq2 = tl.dot(ds, k2, dq2)
    # Each (rows, head) belongs to exactly one program across all chunks: a plain read-add-write suffices.
    dq_rows = dq_ptr + b * s_dq_b + offs_m.to(tl.int64)[:, None] * s_dq_t + h * s_dq_h
    d = tl.arange(0, BDI1)
    ptrs = dq_rows + d[None, :]
    msk = m_mask[:, None] & (d[None, :] < DI)
    tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + grad_scale * dq1, mask=msk)
    if BDI2 > 0:
        d2 = BDI1 + tl.arange(0, BDI2)
        ptrs2 = dq_rows + d2[None, :]
        msk2 = m_mask[:, None] & (d2[None, :] < DI)
        tl.store(ptrs2, tl.load(ptrs2, mask=msk2, other=0.0) + grad_scale * dq2, mask=msk2)
    dw_ptrs = dw_ptr + b * s_dw_b + offs_m * s_dw_t + h * s_dw_h
    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=m_mask, other=0.0) + grad_scale * dw, mask=m_mask)


@triton.jit
def _dense_dk_kernel(
    iq_ptr, ik_ptr, iw_ptr, di_ptr, dk_ptr,
    Q0, t0, t1, HI, DI, grad_scale,
    s_iq_b, s_iq_t, s_iq_h, s_ik_b, s_ik_t, s_iw_b, s_iw_t, s_iw_h, s_di_b, s_di_t, s_dk_b, s_dk_t,
    HEADS_PER_PROG, BDI1: tl.constexpr, BDI2: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAST_FP32: tl.constexpr, KPOOL: tl.constexpr,
):
    """dK of one key block over the chunk's query blocks and a slice of the index heads (dK needs a sum over
    all heads, so the heads are the inner loop: each dI tile is loaded once and reused by every head).
    Grid (key blocks [heaviest first], B, head splits); head splits add with fp32 atomics."""
    kb = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h0 = tl.program_id(2) * HEADS_PER_PROG
    h1 = tl.minimum(h0 + HEADS_PER_PROG, HI)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Q0 + t1
    k_rows = ik_ptr + b * s_ik_b + offs_n[:, None] * s_ik_t
    k1 = _load_rows(k_rows, n_mask, 0, BDI1, DI, CAST_FP32)
    kt1 = tl.trans(k1)
    kt2 = kt1
    if BDI2 > 0:
        kt2 = tl.trans(_load_rows(k_rows, n_mask, BDI1, BDI2, DI, CAST_FP32))
    dk1 = tl.zeros((BLOCK_N, BDI1), dtype=tl.float32)
    dk2 = dk1  # placeholder when Di fits one tile
    if BDI2 > 0:
        dk2 = tl.zeros((BLOCK_N, BDI2), dtype=tl.float32)
    qb0 = tl.maximum(kb * BLOCK_N - Q0 - t0, 0) // BLOCK_M  # the first query block that sees the key block
    for qb in range(qb0, tl.cdiv(t1 - t0, BLOCK_M)):
        offs_m = t0 + qb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < t1
        valid = _visible(Q0 + offs_m, offs_n, KPOOL) & m_mask[:, None]
        g = tl.load(di_ptr + b * s_di_b + (offs_m - t0)[:, None] * s_di_t + offs_n[None, :], mask=valid,
                    other=0.0)
        q_rows = iq_ptr + b * s_iq_b + offs_m.to(tl.int64)[:, None] * s_iq_t
        w_rows = iw_ptr + b * s_iw_b + offs_m * s_iw_t
        for h in range(h0, h1):
            q1 = _load_rows(q_rows + h * s_iq_h, m_mask, 0, BDI1, DI, CAST_FP32)
            a = tl.dot(q1, kt1)
            if BDI2 > 0:
                q2 = _load_rows(q_rows + h * s_iq_h, m_mask, BDI1, BDI2, DI, CAST_FP32)
                a = tl.dot(q2, kt2, a)
            w = tl.load(w_rows + h * s_iw_h, mask=m_mask, other=0.0).to(tl.float32)
            dst = tl.trans(tl.where(a > 0.0, g * w[:, None], 0.0).to(q1.dtype))
            dk1 = tl.dot(dst, q1, dk1)
            if BDI2 > 0:
                dk2 = tl.dot(dst, q2, dk2)
    dk_rows = dk_ptr + b * s_dk_b + offs_n[:, None] * s_dk_t
    d = tl.arange(0, BDI1)
    msk = n_mask[:, None] & (d[None, :] < DI)
    if ATOMIC:
        tl.atomic_add(dk_rows + d[None, :], grad_scale * dk1, mask=msk)
    else:
        tl.store(dk_rows + d[None, :], tl.load(dk_rows + d[None, :], mask=msk, other=0.0) + grad_scale * dk1,
                 mask=msk)
    if BDI2 > 0:
        d2 = BDI1 + tl.arange(0, BDI2)
        msk2 = n_mask[:, None] & (d2[None, :] < DI)
        if ATOMIC:
            tl.atomic_add(dk_rows + d2[None, :], grad_scale * dk2, mask=msk2)
        else:
            tl.store(dk_rows + d2[None, :],
                     tl.load(dk_rows + d2[None, :], mask=msk2, other=0.0) + grad_scale * dk2, mask=msk2)


# ------------------------------------------------------------------------------------- launch helper ----
# Tile configs: (BLOCK_M, BLOCK_N, num_warps, num_stages). Interpreter configs use large tiles (fast on CPU).
# Chosen by `scripts/bench_kl.py --tune` on an H200 (L = 8K, G = 2, H = 128, D = 192, Hi = 64, Di = 128).
GPU_CONFIGS = {
    "student_lse": (128, 128, 8, 3),
    "teacher_lse": (128, 64, 4, 2),
    "loss": (128, 128, 8, 2),
    "dq": (64, 64, 4, 3),
    "dk": (64, 64, 4, 3),
}
# Head dims above 256 (absorbed MLA, 512 + 64) need narrower key tiles to fit in shared memory.
GPU_CONFIGS_WIDE = {"teacher_lse": (64, 32, 4, 3), "loss": (128, 32, 8, 1)}
CPU_CONFIGS = {name: (32, 32, 4, 1) for name in GPU_CONFIGS}


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _dense_kl_triton(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, grad_scale,
                     d_index_q, d_index_k, d_index_weights, *, query_start=0, chunk_rows=None, configs=None,
                     ksplit=None, head_splits=None, kpool: int = 1) -> torch.Tensor:
    interp = _interpreter_settings(index_q.device)
    cfg = dict(CPU_CONFIGS if interp else GPU_CONFIGS)
    if not interp and teacher_q.shape[-1] > 256:
        cfg.update(GPU_CONFIGS_WIDE)
    cfg.update(configs or {})
    # The teacher LSE kernel runs the keys below its query block unmasked: with pools, that needs every query
    # block to start on a pool boundary.
    if any(cfg[name][0] % kpool for name in cfg):
        raise ValueError(f"Pools of {kpool} keys need query tiles that are multiples of it; got {cfg}.")
    cast = interp

    def prep(x, like=None):
        if not interp and x.dtype == torch.float64:
            x = x.float()
        if like is not None and x.dtype != like.dtype:
            x = x.to(like.dtype)
        return _unit_stride(x)

    iq = prep(index_q)
    ik = prep(index_k, iq)
    iw = _unit_stride(index_weights)
    tq = prep(teacher_q)
    tk = prep(teacher_k, tq)
    B, L, HI, DI = iq.shape
    G, _, H, _, D = tq.shape
    HK = tk.shape[2]
    Q0 = int(query_start)
    visible = Q0 + L  # the keys any row sees: the rest of index_k is never read
    dev = iq.device
    bdi1, bdi2 = _split_dim(DI)
    bd1, bd2 = _split_dim(D)
    qk_scale2 = float(teacher_scale) * LOG2E
    n_sm = _num_sms(dev)

    def kw(name):
        bm, bn, warps, stages = cfg[name]
        extra = {} if interp else {"num_warps": warps, "num_stages": stages}
        return bm, bn, extra

    # ---- pass A: lseI (base 2)
    bm, bn, extra = kw("student_lse")
    nqb = triton.cdiv(L, bm)
    ks = ksplit or max(1, min(triton.cdiv(visible, bn), triton.cdiv(4 * n_sm, B * nqb)))
    m_part = torch.empty(ks, B, L, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    _student_lse_kernel[(ks, nqb, B)](
        iq, ik, iw, m_part, l_part, L, Q0, HI, DI,
        iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
        iw.stride(0), iw.stride(1), iw.stride(2),
        BDI1=bdi1, BDI2=bdi2, KSPLIT=ks, BLOCK_M=bm, BLOCK_N=bn, CAST_FP32=cast, KPOOL=kpool, **extra)
    m_max = m_part.amax(0)
    lse_i = m_max + torch.log2((l_part * torch.exp2(m_part - m_max)).sum(0))
    del m_part, l_part

    # ---- teacher LSE (base 2)
    bm, bn, extra = kw("teacher_lse")
    lse_t = torch.empty(G, B, H, L, device=dev, dtype=torch.float32)
    _teacher_lse_kernel[(triton.cdiv(L, bm), B * H, G)](
        tq, tk, lse_t, L, Q0, H, H // HK, D, qk_scale2,
        tq.stride(0), tq.stride(1), tq.stride(2), tq.stride(3),
        tk.stride(0), tk.stride(1), tk.stride(2), tk.stride(3),
        BD1=bd1, BD2=bd2, BLOCK_M=bm, BLOCK_N=bn, CAST_FP32=cast, KPOOL=kpool, **extra)

    # ---- per chunk of query rows: pass B, then dQ/dW, then dK
    align = 128
    if chunk_rows is None:
        chunk_rows = max(align, _SCRATCH_BYTES // (4 * B * visible) // align * align)
    assert chunk_rows % max(cfg[n][0] for n in ("loss", "dq", "dk")) == 0, "chunk_rows must be a multiple of BLOCK_M"
    C = min(chunk_rows, triton.cdiv(L, align) * align)
    scratch = torch.empty(B, C, visible, device=dev, dtype=torch.float32)
    losses = []
    for t0 in range(0, L, C):
        t1 = min(L, t0 + C)
        bm, bn, extra = kw("loss")
        nqb = triton.cdiv(t1 - t0, bm)
        ks = ksplit or max(1, min(triton.cdiv(Q0 + t1, bn), triton.cdiv(4 * n_sm, B * nqb)))
        loss_part = torch.empty(B * nqb * ks, device=dev, dtype=torch.float32)
        _dense_loss_kernel[(ks, nqb, B)](
            iq, ik, iw, lse_i, tq, tk, lse_t, scratch, loss_part,
            L, Q0, t0, t1, HI, DI, G, H, H // HK, D, qk_scale2, 1.0 / (G * H),
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
            iw.stride(0), iw.stride(1), iw.stride(2),
            tq.stride(0), tq.stride(1), tq.stride(2), tq.stride(3),
            tk.stride(0), tk.stride(1), tk.stride(2), tk.stride(3), scratch.stride(0), scratch.stride(1),
            BDI1=bdi1, BDI2=bdi2, BD1=bd1, BD2=bd2, KSPLIT=ks, KV_SHARED=HK == 1,
            BLOCK_M=bm, BLOCK_N=bn, CAST_FP32=cast, KPOOL=kpool, **extra)
        losses.append(loss_part)

        bm, bn, extra = kw("dq")
        _dense_dq_kernel[(HI, triton.cdiv(t1 - t0, bm), B)](
            iq, ik, iw, scratch, d_index_q, d_index_weights, Q0, t0, t1, DI, float(grad_scale),
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
            iw.stride(0), iw.stride(1), iw.stride(2), scratch.stride(0), scratch.stride(1),
            d_index_q.stride(0), d_index_q.stride(1), d_index_q.stride(2),
            d_index_weights.stride(0), d_index_weights.stride(1), d_index_weights.stride(2),
            BDI1=bdi1, BDI2=bdi2, BLOCK_M=bm, BLOCK_N=bn, CAST_FP32=cast, KPOOL=kpool, **extra)

        bm, bn, extra = kw("dk")
        nkb = triton.cdiv(Q0 + t1, bn)
        hs = head_splits or max(1, min(HI, triton.cdiv(2 * n_sm, B * nkb)))
        hpp = triton.cdiv(HI, hs)
        hs = triton.cdiv(HI, hpp)
        _dense_dk_kernel[(nkb, B, hs)](
            iq, ik, iw, scratch, d_index_k, Q0, t0, t1, HI, DI, float(grad_scale),
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
            iw.stride(0), iw.stride(1), iw.stride(2), scratch.stride(0), scratch.stride(1),
            d_index_k.stride(0), d_index_k.stride(1),
            BDI1=bdi1, BDI2=bdi2, HEADS_PER_PROG=hpp, ATOMIC=hs > 1,
            BLOCK_M=bm, BLOCK_N=bn, CAST_FP32=cast, KPOOL=kpool, **extra)
    return torch.cat(losses).double().sum().float()


# ---------------------------------------------------------------------------------------- torch path ----
def _dense_kl_torch(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale: float,
                    grad_scale: float, d_index_q, d_index_k, d_index_weights, *, query_start: int = 0,
                    chunk_rows: int | None = None, kpool: int = 1) -> torch.Tensor:
    """Same contract as `dense_kl_accumulate`, in plain torch over chunks of C query rows: the largest
    intermediate is one layer's [B, H, C, T] scores (and [B, C, Hi, T] for the student, T the keys the chunk
    sees). Computes in fp32 (fp64 inputs stay fp64); each chunk's rows are complete, so softmaxes need no LSE
    pass."""
    B, L, HI, DI = index_q.shape
    G, _, H, _, D = teacher_q.shape
    HK = teacher_k.shape[2]
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    if chunk_rows is None:
        chunk_rows = max(1, _TORCH_BUDGET_ELEMS // (B * max(H, HI) * (query_start + L)))
    total = torch.zeros((), dtype=torch.float64, device=index_q.device)
    ik_all = index_k.to(dtype)
    for t0 in range(0, L, chunk_rows):
        t1 = min(L, t0 + chunk_rows)
        keys = query_start + t1  # no row of the chunk sees a key past its last row's position
        positions = torch.arange(query_start + t0, keys, device=index_q.device)
        causal = visible_limit(positions, kpool)[:, None] >= torch.arange(keys, device=index_q.device)[None, :]
        # teacher target p [B, C, keys]
        p = torch.zeros(B, t1 - t0, keys, dtype=dtype, device=index_q.device)
        for g in range(G):
            q = teacher_q[g, :, :, t0:t1].to(dtype)                                          # [B, H, C, D]
            k = teacher_k[g, :, :, :keys].to(dtype).repeat_interleave(H // HK, dim=1)      # [B, H, keys, D]
            z = torch.matmul(q, k.transpose(-1, -2)) * teacher_scale
            z.masked_fill_(~causal, float("-inf"))
            p += torch.softmax(z, dim=-1).nan_to_num_(0.0).sum(1)  # a row with no visible pool gives 0
            del z
        p /= G * H
        # student
        q_i = index_q[:, t0:t1].to(dtype)                                                    # [B, C, Hi, Di]
        w = index_weights[:, t0:t1].to(dtype)                                                # [B, C, Hi]
        k_i = ik_all[:, :keys]                                                               # [B, keys, Di]
        relu_a = torch.einsum("bchd,bsd->bchs", q_i, k_i).clamp_min_(0)  # the largest tensor: one, in place
        logits = torch.einsum("bch,bchs->bcs", w, relu_a).masked_fill(~causal, float("-inf"))
        log_q = torch.log_softmax(logits, dim=-1)
        inside = p > 0
        kl = torch.where(inside, p * (p.clamp_min(torch.finfo(dtype).tiny).log() - log_q.masked_fill(~inside, 0)),
                         0.0)
        total += kl.sum().double()
        d_i = (log_q.exp() - p).masked_fill(~causal, 0.0)                                   # [B, C, keys]
        d_index_weights[:, t0:t1] += grad_scale * torch.einsum("bcs,bchs->bch", d_i, relu_a).float()
        ds = (d_i[:, :, None, :] * w[..., None]).masked_fill_(relu_a == 0, 0.0)             # [B, C, Hi, keys]
        d_index_q[:, t0:t1] += grad_scale * torch.einsum("bchs,bsd->bchd", ds, k_i).float()
        d_index_k[:, :keys] += grad_scale * torch.einsum("bchs,bchd->bsd", ds, q_i).float()
    return total.float()


# ------------------------------------------------------------------------------------------ public ----
def dense_kl_accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale: float,
                        grad_scale: float, d_index_q, d_index_k, d_index_weights, *, use_triton: bool,
                        query_start: int = 0, chunk_rows: int | None = None, kpool: int = 1) -> torch.Tensor:
    """Adds grad_scale * d(sum over rows of KL)/d(index tensor) into the three fp32 accumulators (same shapes
    as the index tensors, contiguous fp32, possibly non-zero: added to, not overwritten), and returns the
    sum over all B*L rows of KL(p || q) as an fp32 0-dim tensor (no autograd graph).

    index_q [B, L, Hi, Di], index_k [B, T, Di], index_weights [B, L, Hi]; teacher_q [G, B, H, L, D],
    teacher_k [G, B, Hk, T, D] (head h uses key head h // (H/Hk)). Query row t sits at position
    query_start + t of the T keys and sees keys s <= query_start + t (query_start + L <= T): the rows may be
    a block of the keys' sequence, a context-parallel rank's chunk say; with query_start = 0 and T = L they are
    all of it. `use_triton` picks the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the chunked
    torch path. `chunk_rows` overrides the number of query rows per chunk (a multiple of 128 on the Triton
    path). `kpool` > 1 narrows the support of the row at position t to the keys of the pools of `kpool` keys
    that end at or before t (`pooled.visible_limit`; rows without one give 0): with index_k holding each
    token's pool key, that is the pooled indexer's KL (`pooled.py`)."""
    num_rows, num_keys = index_q.shape[1], index_k.shape[1]
    if not isinstance(query_start, int) or query_start < 0 or query_start + num_rows > num_keys:
        raise ValueError(f"query_start={query_start!r} must be an int with 0 <= query_start and query_start + L "
                         f"<= T: the L={num_rows} query rows sit at positions query_start .. query_start + L - 1 "
                         f"of the T={num_keys} keys.")
    with torch.no_grad():
        fn = _dense_kl_triton if use_triton else _dense_kl_torch
        return fn(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, grad_scale, d_index_q,
                  d_index_k, d_index_weights, query_start=query_start, chunk_rows=chunk_rows, kpool=kpool)
