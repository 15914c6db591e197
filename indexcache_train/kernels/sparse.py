"""Sparse mode of the fused multi-layer indexer KL loss: Triton kernels, their launch helper, and a chunked
torch implementation with the same semantics.

Notation, for one query row r = (b, t) and its selection S_r = {topk_indices[b, t, j] >= 0}:

  student   a[h, s] = q_I[b,t,h] . k_I[b,s]                      (Hi heads of dim Di)
            I[s]    = sum_h w[b,t,h] * relu(a[h, s])
            q[s]    = softmax_{s in S_r} I[s]
  teacher   z[g,h,s] = teacher_scale * q_T[g,b,h,t] . k_T[g,b,h // (H/Hk),s]
            p[s]    = (1/(G*H)) sum_{g,h} softmax_{s in S_r} z[g,h,s]   (each head renormalised over S_r)
  loss_r    = sum_{s in S_r} p[s] (log p[s] - log q[s])              (0 log 0 = 0; 0 for an empty row)

Gradient, with c = grad_scale (the caller's 1/(B*L) times the upstream gradient):
  dI[s]          = c * (q[s] - p[s])                                  (never through -p/q)
  dW[b,t,h]     += sum_s dI[s] * relu(a[h,s])
  dQ[b,t,h,:]   += sum_s dI[s] * w[h] * [a[h,s] > 0] * k_I[b,s,:]
  dK[b,s,:]     += sum_{t: s in S_t} sum_h dI[t,s] * w[t,h] * [a[t,h,s] > 0] * q_I[b,t,h,:]

Triton path, per query row, in two kernels:
  1. `_sparse_teacher_kernel`: for each layer g and block of heads, pass 1 gathers the selected teacher keys
     chunk by chunk and keeps an online (base-2) log-sum-exp per head (skipped when the caller passes the
     LSE the sparse attention kernel already computed, `teacher_lse`); pass 2 recomputes the scores and adds
     (1/(G*H)) * sum_h exp2(z - lse_h) into a [rows, k] fp32 buffer p. With Hk = 1 (absorbed MLA, FlashMLA's
     form) one gather of k_T[idx] serves every head and the scores are one tl.dot with the heads as the M
     dimension; with H/Hk < 16 (MHA) each head gathers its own keys and the scores are a broadcast-reduce.
  2. `_sparse_student_kernel`: pass 1 = online LSE of I; pass 2 recomputes I, reads p, accumulates the loss,
     dW and dQ in registers and scatters dK with fp32 atomics.
Only the p buffer (rows x k fp32, bounded by chunking the rows) is materialised; everything else is O(row).
All logits, probabilities, LSEs and accumulators are fp32; bf16/fp16 inputs feed tl.dot natively on a GPU.
Under TRITON_INTERPRET=1 (CPU) every load is cast to fp32, since the interpreter's bf16 dot is wrong.
"""

import torch
import triton
import triton.language as tl

from .common import LOG2E, common_dtype, lastdim_contiguous


# Rows per launch of the Triton path: bounds the p buffer to ~256 MiB fp32.
_PBAR_BUDGET_ELEMS = 1 << 26
# Elements per intermediate tensor in the torch path.
_TORCH_BUDGET_ELEMS = 1 << 23


# --------------------------------------------------------------------------------------------- Triton ----
@triton.jit
def _teacher_chunk_scores(tq_row, s_tq_h, tk_base, s_tk_h, s_tk_l, heads, hmask, R, idx, valid, D,
                          BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          USE_DOT: tl.constexpr, CAST_FP32: tl.constexpr):
    """Raw teacher scores q_T[h] . k_T[kv(h), idx[s]] for a block of heads x a chunk of slots, [BH, BK] fp32."""
    acc = tl.zeros((BH, BK), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        q = tl.load(tq_row + heads[:, None] * s_tq_h + d[None, :], mask=hmask[:, None] & dmask[None, :], other=0.0)
        if CAST_FP32:
            q = q.to(tl.float32)
        if USE_DOT:
            # All heads of the block share one kv head (tk_base points at it): one gather feeds the whole block.
            k = tl.load(tk_base + idx[:, None] * s_tk_l + d[None, :],
                        mask=valid[:, None] & dmask[None, :], other=0.0)
            if CAST_FP32:
                k = k.to(tl.float32)
            acc = tl.dot(q, tl.trans(k), acc, input_precision="ieee")
        else:
            # Each head has its own keys (MHA / small GQA groups): a batched mat-vec, no tensor cores to use.
            khv = heads // R
            k = tl.load(tk_base + khv[:, None, None] * s_tk_h + idx[None, :, None] * s_tk_l + d[None, None, :],
                        mask=hmask[:, None, None] & valid[None, :, None] & dmask[None, None, :], other=0.0)
            acc += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32), axis=2)
    return acc


@triton.jit
def _teacher_block(tq_row, s_tq_h, tk_base, s_tk_h, s_tk_l, idx_row, s_i_k, p_row, lse_row, s_lse_h, heads,
                   hmask, R, K, D, scale_log2, inv_gh,
                   BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                   USE_DOT: tl.constexpr, CAST_FP32: tl.constexpr, HAS_LSE: tl.constexpr):
    """Both passes for one layer and one block of heads (pass 2 alone when the attention kernel already gave
    each head's log-sum-exp); adds its share of the mean into the row's p."""
    offs_k = tl.arange(0, BK)
    if HAS_LSE:
        lse = tl.load(lse_row + heads * s_lse_h, mask=hmask, other=0.0) * 1.4426950408889634  # to base 2
    else:
        # Pass 1: online log-sum-exp (base 2) of each head over the selected keys.
        m = tl.full((BH,), -1e30, dtype=tl.float32)  # finite start: an all-empty chunk gives no NaN
        lsum = tl.zeros((BH,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            slots = k0 + offs_k
            idx = tl.load(idx_row + slots * s_i_k, mask=slots < K, other=-1).to(tl.int64)
            valid = idx >= 0
            if tl.max(valid.to(tl.int32), axis=0) > 0:  # skip chunks of empty slots entirely
                z = _teacher_chunk_scores(tq_row, s_tq_h, tk_base, s_tk_h, s_tk_l, heads, hmask, R, idx, valid, D,
                                          BH, BK, BD, USE_DOT, CAST_FP32)
                z = tl.where(valid[None, :], z * scale_log2, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=1))
                lsum = lsum * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
                m = m_new
        lse = m + tl.log2(tl.maximum(lsum, 1e-30))  # an empty row has no slot for pass 2 to touch

    # Pass 2: recompute the scores and add this block's share of the head/layer mean into p.
    for k0 in range(0, K, BK):
        slots = k0 + offs_k
        idx = tl.load(idx_row + slots * s_i_k, mask=slots < K, other=-1).to(tl.int64)
        valid = idx >= 0
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            z = _teacher_chunk_scores(tq_row, s_tq_h, tk_base, s_tk_h, s_tk_l, heads, hmask, R, idx, valid, D,
                                      BH, BK, BD, USE_DOT, CAST_FP32)
            keep = hmask[:, None] & valid[None, :]
            prob = tl.where(keep, tl.exp2(z * scale_log2 - lse[:, None]), 0.0)
            part = tl.sum(prob, axis=0) * inv_gh
            old = tl.load(p_row + slots, mask=valid, other=0.0)
            tl.store(p_row + slots, old + part, mask=valid)


@triton.jit
def _row_start(pid, row0, L, K, idx_ptr, s_i_b, s_i_l, pbar_ptr):
    """The query row (b, t) program `pid` of a launch starting at flat row `row0` handles, with pointers to its
    top-k and to its row of the p buffer (one row per program of the launch)."""
    row = (row0 + pid).to(tl.int64)
    b = row // L
    t = row % L
    return b, t, idx_ptr + b * s_i_b + t * s_i_l, pbar_ptr + pid.to(tl.int64) * K


@triton.jit
def _sparse_teacher_kernel(
    tq_ptr, tk_ptr, idx_ptr, pbar_ptr, lse_ptr,
    row0, L, K, G, H, R, D,
    s_tq_g, s_tq_b, s_tq_h, s_tq_l,
    s_tk_g, s_tk_b, s_tk_h, s_tk_l,
    s_i_b, s_i_l, s_i_k,
    s_lse_g, s_lse_b, s_lse_h, s_lse_l,
    scale_log2, inv_gh,
    BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    USE_DOT: tl.constexpr, CAST_FP32: tl.constexpr, HAS_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    b, t, idx_row, p_row = _row_start(pid, row0, L, K, idx_ptr, s_i_b, s_i_l, pbar_ptr)
    offs_h = tl.arange(0, BH)
    # Pointers advance by the (possibly > 2^31) layer / kv-head strides instead of multiplying loop counters.
    tq_row = tq_ptr + b * s_tq_b + t * s_tq_l
    tk_g = tk_ptr + b * s_tk_b
    lse_row = lse_ptr + b * s_lse_b + t * s_lse_l
    for g in range(G):
        if USE_DOT:
            # Blocks never straddle two kv heads, so each chunk's key gather is shared by all heads of a block.
            tk_kh = tk_g
            for kh in range(H // R):
                for h0 in range(0, R, BH):
                    hl = h0 + offs_h
                    heads = (kh * R + hl).to(tl.int64)
                    _teacher_block(tq_row, s_tq_h, tk_kh, s_tk_h, s_tk_l, idx_row, s_i_k, p_row, lse_row, s_lse_h,
                                   heads, hl < R, R, K, D, scale_log2, inv_gh, BH, BK, BD, USE_DOT, CAST_FP32,
                                   HAS_LSE)
                tk_kh += s_tk_h
        else:
            for h0 in range(0, H, BH):
                heads = (h0 + offs_h).to(tl.int64)
                _teacher_block(tq_row, s_tq_h, tk_g, s_tk_h, s_tk_l, idx_row, s_i_k, p_row, lse_row, s_lse_h,
                               heads, heads < H, R, K, D, scale_log2, inv_gh, BH, BK, BD, USE_DOT, CAST_FP32,
                               HAS_LSE)
        tq_row += s_tq_g
        tk_g += s_tk_g
        lse_row += s_lse_g


@triton.jit
def _student_slot_logits(q, w, k_base, s_k_l, idx, valid, offs_d, dmask, CAST_FP32: tl.constexpr):
    """The student's logits over one chunk of a row's selected slots, in base 2: log2(e) * sum_h w[h] *
    relu(q[h] . k_I[idx[s]]), -inf on empty slots. Also returns the gathered keys [BK, DIP] and the per-head
    scores a [HIP, BK], which the gradient pass reuses. Both passes of `_sparse_student_kernel` call it, so
    the LSE of pass 1 and the softmax of pass 2 are taken over the same logits."""
    kk = tl.load(k_base + idx[:, None] * s_k_l + offs_d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
    if CAST_FP32:
        kk = kk.to(tl.float32)
    a = tl.dot(q, tl.trans(kk), input_precision="ieee")  # [HIP, BK]
    logit = tl.sum(w[:, None] * tl.maximum(a, 0.0), axis=0) * 1.4426950408889634
    return tl.where(valid, logit, float("-inf")), kk, a


@triton.jit
def _sparse_student_kernel(
    iq_ptr, ik_ptr, iw_ptr, idx_ptr, pbar_ptr, dq_ptr, dk_ptr, dw_ptr, loss_ptr,
    row0, L, K, Hi, Di,
    s_q_b, s_q_l, s_q_h,
    s_k_b, s_k_l,
    s_w_b, s_w_l,
    s_i_b, s_i_l, s_i_k,
    s_dq_b, s_dq_l, s_dq_h,
    s_dk_b, s_dk_l,
    s_dw_b, s_dw_l,
    grad_scale,
    HIP: tl.constexpr, DIP: tl.constexpr, BK: tl.constexpr, CAST_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    b, t, idx_row, p_row = _row_start(pid, row0, L, K, idx_ptr, s_i_b, s_i_l, pbar_ptr)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, HIP)
    offs_d = tl.arange(0, DIP)
    hmask = offs_h < Hi
    dmask = offs_d < Di

    # The row's indexer query [Hi, Di] and weights stay in registers for both passes.
    q = tl.load(iq_ptr + b * s_q_b + t * s_q_l + offs_h[:, None] * s_q_h + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
    w = tl.load(iw_ptr + b * s_w_b + t * s_w_l + offs_h, mask=hmask, other=0.0).to(tl.float32)
    k_base = ik_ptr + b * s_k_b

    # Pass 1: online log-sum-exp (base 2) of the student logits over the selection.
    m = -1e30
    lsum = 0.0
    for k0 in range(0, K, BK):
        slots = k0 + offs_k
        idx = tl.load(idx_row + slots * s_i_k, mask=slots < K, other=-1).to(tl.int64)
        valid = idx >= 0
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            logit, _, _ = _student_slot_logits(q, w, k_base, s_k_l, idx, valid, offs_d, dmask, CAST_FP32)
            m_new = tl.maximum(m, tl.max(logit, axis=0))
            lsum = lsum * tl.exp2(m - m_new) + tl.sum(tl.exp2(logit - m_new), axis=0)
            m = m_new
    lse = m + tl.log2(tl.maximum(lsum, 1e-30))

    # Pass 2: q = softmax(I), gradient dI = c (q - p), loss, and the three index gradients.
    loss = 0.0
    dq = tl.zeros((HIP, DIP), dtype=tl.float32)
    dw = tl.zeros((HIP,), dtype=tl.float32)
    dk_base = dk_ptr + b * s_dk_b
    for k0 in range(0, K, BK):
        slots = k0 + offs_k
        idx = tl.load(idx_row + slots * s_i_k, mask=slots < K, other=-1).to(tl.int64)
        valid = idx >= 0
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            logit, kk, a = _student_slot_logits(q, w, k_base, s_k_l, idx, valid, offs_d, dmask, CAST_FP32)
            log2q = tl.where(valid, logit - lse, 0.0)  # finite on empty slots, where p is 0: no 0 * inf
            qs = tl.where(valid, tl.exp2(log2q), 0.0)
            p = tl.load(p_row + slots, mask=valid, other=0.0)
            pos = p > 0
            loss += tl.sum(tl.where(pos, p * (tl.log2(tl.where(pos, p, 1.0)) - log2q), 0.0), axis=0) * 0.6931471805599453
            di = tl.where(valid, (qs - p) * grad_scale, 0.0)  # gradient w.r.t. the logits, scaled
            dw += tl.sum(di[None, :] * tl.maximum(a, 0.0), axis=1)
            gm = tl.where(a > 0, di[None, :] * w[:, None], 0.0)  # d/da, [HIP, BK]
            gm = gm.to(q.dtype)
            dq = tl.dot(gm, kk, dq, input_precision="ieee")
            dkc = tl.dot(tl.trans(gm), q, input_precision="ieee")  # [BK, DIP]
            tl.atomic_add(dk_base + idx[:, None] * s_dk_l + offs_d[None, :], dkc,
                          mask=valid[:, None] & dmask[None, :], sem="relaxed")

    # Each row's dQ / dW belong to this program alone: plain read-add-write.
    dq_ptrs = dq_ptr + b * s_dq_b + t * s_dq_l + offs_h[:, None] * s_dq_h + offs_d[None, :]
    qm = hmask[:, None] & dmask[None, :]
    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=qm, other=0.0) + dq, mask=qm)
    dw_ptrs = dw_ptr + b * s_dw_b + t * s_dw_l + offs_h
    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=hmask, other=0.0) + dw, mask=hmask)
    tl.store(loss_ptr + pid, loss)


def _teacher_config(R: int, H: int, K: int, D: int):
    """(BH, BK, BD, USE_DOT, num_warps, num_stages) for the teacher kernel. Picked on an H200 (bf16, k=2048,
    H=128, G=2, whole call): shared-key path BH=64 x BK=128 48.6 ms at L=8K D=576 (128 x 64: 57.9 ms,
    128 x 128: 51.0 ms); per-head path BH=4 x BK=64 x BD=64 at 4 warps 295 ms at L=4K D=192 (16 x 32 x 32 at
    8 warps: 444 ms). The interpreter runs the same tiles (fp32)."""
    BD = min(64, max(16, triton.next_power_of_2(D)))
    BK = min(128 if R >= 16 else 64, max(16, triton.next_power_of_2(K)))
    if R >= 16:
        return min(64, triton.next_power_of_2(R)), BK, BD, True, 8, 2
    return min(4, triton.next_power_of_2(H)), BK, BD, False, 4, 1


def _sparse_kl_triton(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, topk_indices,
                      grad_scale, d_index_q, d_index_k, d_index_weights, config=None, teacher_lse=None):
    B, L, Hi, Di = index_q.shape
    G, _, H, _, D = teacher_q.shape
    Hk = teacher_k.shape[2]
    K = topk_indices.shape[-1]
    R = H // Hk
    interpret = index_q.device.type != "cuda"  # CPU tensors only run under TRITON_INTERPRET=1
    index_q, index_k = common_dtype(lastdim_contiguous(index_q), lastdim_contiguous(index_k))
    index_weights = lastdim_contiguous(index_weights)
    teacher_q, teacher_k = common_dtype(lastdim_contiguous(teacher_q.detach()),
                                         lastdim_contiguous(teacher_k.detach()))
    index_q, index_k, index_weights = index_q.detach(), index_k.detach(), index_weights.detach()
    for acc in (d_index_q, d_index_k, d_index_weights):
        assert acc.dtype == torch.float32 and acc.stride(-1) == 1, "accumulators must be fp32, last dim contiguous"

    BH, BK, BD, use_dot, t_warps, t_stages = config or _teacher_config(R, H, K, D)
    HIP = max(16, triton.next_power_of_2(Hi))
    DIP = max(16, triton.next_power_of_2(Di))
    SBK = min(64, max(16, triton.next_power_of_2(K)))  # H200, Hi x Di = 64 x 128: BK=64 16.5 ms, 32 19.1 ms at 8K

    rows = B * L
    chunk = max(1, min(rows, _PBAR_BUDGET_ELEMS // max(K, 1)))
    pbar = torch.empty(chunk, K, dtype=torch.float32, device=index_q.device)
    # [G, B, H, L]; a 1-element stand-in when pass 1 computes the LSE (its strides are never used then)
    lse = teacher_lse if teacher_lse is not None else pbar.new_zeros(1, 1, 1, 1)
    row_loss = torch.empty(rows, dtype=torch.float32, device=index_q.device)
    for row0 in range(0, rows, chunk):
        n = min(chunk, rows - row0)
        pbar[:n].zero_()
        _sparse_teacher_kernel[(n,)](
            teacher_q, teacher_k, topk_indices, pbar, lse,
            row0, L, K, G, H, R, D,
            *teacher_q.stride()[:4], *teacher_k.stride()[:4], *topk_indices.stride(), *lse.stride(),
            float(teacher_scale) * LOG2E, 1.0 / (G * H),
            BH=BH, BK=BK, BD=BD, USE_DOT=use_dot, CAST_FP32=interpret, HAS_LSE=teacher_lse is not None,
            num_warps=t_warps, num_stages=t_stages,
        )
        _sparse_student_kernel[(n,)](
            index_q, index_k, index_weights, topk_indices, pbar, d_index_q, d_index_k, d_index_weights,
            row_loss[row0:],
            row0, L, K, Hi, Di,
            *index_q.stride()[:3], *index_k.stride()[:2], *index_weights.stride()[:2], *topk_indices.stride(),
            *d_index_q.stride()[:3], *d_index_k.stride()[:2], *d_index_weights.stride()[:2],
            float(grad_scale),
            HIP=HIP, DIP=DIP, BK=SBK, CAST_FP32=interpret, num_warps=8 if HIP * DIP >= 2048 else 4,
        )
    return row_loss.sum(dtype=torch.float64).float()


# ---------------------------------------------------------------------------------------------- torch ----
def _sparse_kl_torch(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, topk_indices,
                     grad_scale, d_index_q, d_index_k, d_index_weights, teacher_lse=None):
    """Chunks of query rows, per-row gathers; never an [L, L] tensor. Computes in (at least) fp32."""
    B, L, Hi, Di = index_q.shape
    G, _, H, _, D = teacher_q.shape
    Hk = teacher_k.shape[2]
    R = H // Hk
    K = topk_indices.shape[-1]
    dev = index_q.device
    cdt = torch.promote_types(index_q.dtype, torch.float32)
    teacher_q, teacher_k = teacher_q.detach(), teacher_k.detach()
    index_q, index_k, index_weights = index_q.detach(), index_k.detach(), index_weights.detach()
    T = index_k.shape[1]  # all keys; the query rows may be a block of them
    flat_dk = d_index_k.view(B * T, Di)

    rows = B * L
    chunk = max(1, _TORCH_BUDGET_ELEMS // max(1, K * max(D, Di, Hi, R)))
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for r0 in range(0, rows, chunk):
        r = torch.arange(r0, min(rows, r0 + chunk), device=dev)
        bv, tv = r // L, r % L
        idx = topk_indices[bv, tv].long()  # [n, K]
        valid = idx >= 0
        idxc = idx.clamp_min(0)
        row_has = valid.any(-1)

        # Teacher target p [n, K]: per layer, per kv head, gather its keys once for the heads that share them.
        p = torch.zeros(idx.shape, dtype=cdt, device=dev)
        for g in range(G):
            for kh in range(Hk):
                keys = teacher_k[g, bv[:, None], kh, idxc].to(cdt)  # [n, K, D]
                qh = teacher_q[g][bv, kh * R:(kh + 1) * R, tv].to(cdt)  # [n, R, D]
                z = torch.einsum("nhd,nkd->nhk", qh, keys) * teacher_scale
                z = z.masked_fill(~valid[:, None, :], float("-inf"))
                if teacher_lse is None:
                    p += torch.softmax(z, dim=-1).nan_to_num(0.0).sum(1)
                else:  # each head's log-sum-exp as the attention kernel computed it
                    lse = teacher_lse[g][bv, kh * R:(kh + 1) * R, tv].to(cdt)  # [n, R]
                    p += torch.exp(z - lse[:, :, None]).nan_to_num(0.0).sum(1)
        p /= G * H

        # Student.
        qi = index_q[bv, tv].to(cdt)  # [n, Hi, Di]
        wi = index_weights[bv, tv].to(cdt)  # [n, Hi]
        ki = index_k[bv[:, None], idxc].to(cdt)  # [n, K, Di]
        a = torch.einsum("nhd,nkd->nhk", qi, ki)
        ra = a.relu()
        logits = torch.einsum("nh,nhk->nk", wi, ra).masked_fill(~valid, float("-inf"))
        log_q = torch.log_softmax(logits, dim=-1)
        log_q = torch.where(row_has[:, None] & valid, log_q, 0.0)
        pos = p > 0
        total += torch.where(pos, p * (p.clamp_min(1e-300).log() - log_q), 0.0).sum(dtype=torch.float64)

        di = torch.where(valid, (log_q.exp() - p) * grad_scale, 0.0)  # [n, K]
        d_index_weights[bv, tv] += torch.einsum("nk,nhk->nh", di, ra).float()
        gm = torch.where(a > 0, di[:, None, :] * wi[:, :, None], 0.0)  # [n, Hi, K]
        d_index_q[bv, tv] += torch.einsum("nhk,nkd->nhd", gm, ki).float()
        dks = torch.einsum("nhk,nhd->nkd", gm, qi).float()  # [n, K, Di]
        target = (bv[:, None] * T + idxc)[valid]
        flat_dk.index_add_(0, target, dks[valid])
    return total.float()


# ------------------------------------------------------------------------------------------- dispatch ----
def sparse_kl_accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale: float,
                         topk_indices, grad_scale: float, d_index_q, d_index_k, d_index_weights, *,
                         use_triton: bool, teacher_lse=None) -> torch.Tensor:
    """Adds grad_scale * d(sum over rows of KL)/d(index tensor) into the three fp32 accumulators
    (same shapes as the index tensors, contiguous fp32, possibly non-zero: ADD, don't overwrite) and returns
    the sum over all B*L rows of KL(p||q) as an fp32 0-dim tensor (no autograd graph).

    index_q [B, L, Hi, Di], index_k [B, T, Di], index_weights [B, L, Hi]; teacher_q [G, B, H, L, D],
    teacher_k [G, B, Hk, T, D]; topk_indices [B, L, k] int32/int64 with -1 for empty slots (validated by
    the caller: valid entries are keys of the row's causal past and are distinct within a row). The L query
    rows may be a block of the T keys' sequence (views along L of the full tensors, accumulators included).
    teacher_lse [G, B, H, L] fp32, optional: each head's natural-log log-sum-exp over the selection, as the
    sparse attention kernel returns it; given, the teacher's first pass is skipped.
    """
    with torch.no_grad():
        if topk_indices.shape[-1] == 0 or index_q.shape[1] == 0:
            return torch.zeros((), dtype=torch.float32, device=index_q.device)
        fn = _sparse_kl_triton if use_triton else _sparse_kl_torch
        return fn(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, topk_indices,
                  grad_scale, d_index_q, d_index_k, d_index_weights, teacher_lse=teacher_lse)
