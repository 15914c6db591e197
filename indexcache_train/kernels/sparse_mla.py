"""Forward-only sparse MLA attention in the absorbed form (FlashMLA-style sparse prefill): a Triton kernel, its
launch helper and a chunked torch path with the same semantics.

Absorbed MLA. Token s has a latent c[s] (kv_lora_rank dims) and a rope key k_R[s] shared by all heads; head h
expands them to k_h[s] = [W_K[h] c[s] ; k_R[s]] and v_h[s] = W_V[h] c[s] (kv_b_proj.weight, per head). Since
    q_h . k_h[s] = (W_K[h]^T q_N,h) . c[s] + q_R,h . k_R[s],
the absorbed query q[h] = [W_K[h]^T q_N,h ; q_R,h] scores against ONE latent key kv[s] = [c[s] ; k_R[s]] for
every head (MQA, D = kv_lora_rank + rope dims, e.g. 512 + 64), and o_h = W_V[h] (sum_s p_h[s] c[s]): the value
is kv[s, :value_dim] and the caller applies W_V[h] to the output.

For query row (b, t), at position query_start + t, and its slots j = 0..K-1 with idx_j = indices[b, t, j]:
    valid_j = 0 <= idx_j <= min(query_start + t, T - 1)        (drops -1 padding and past-the-causal-limit keys)
    z[h, j] = scale * q[b,t,h] . kv[b, idx_j]                   (valid slots only)
    lse[h]  = log sum_j exp z[h, j]                              (-inf for a row with no valid slot)
    out[h]  = sum_j exp(z[h, j] - lse[h]) kv[b, idx_j, :value_dim]   (0 for a row with no valid slot)
The sum runs over slots: a key listed twice counts twice (an indexer's top-k never repeats one).

Triton path: one program per (query row, block of BH heads). The row's query block stays resident; the kernel
walks the slots in blocks of BK, gathers the BK selected kv rows ONCE for all BH heads, scores them with
tl.dot (the value part [BH, DV] x [DV, BK] plus the rope tail [BH, DR] x [DR, BK], so both tiles are powers of
two; with SPLIT, inside a branch, so that the two warpgroups split the slots instead of both computing the whole
tile, see the kernel), keeps a base-2 online softmax in fp32 (log2(e) folded into the scale) and accumulates
acc[BH, DV] += p.to(bf16) @ kv[:, :DV] in fp32. Only the blocks between the first and the last valid slot are
visited: a branch inside the loop would stop Triton's software pipelining, and the masked loads of an
all-invalid block in between move no memory. Under TRITON_INTERPRET=1 (CPU) every load is cast to fp32,
since the interpreter's bf16 dot is wrong.

H200 (bf16, H = 128, D = 512 + 64, value_dim = 512, K = 2048, B = 1; TFLOP/s counted as 2*H*K*(D + value_dim)
per row; do_bench median of one call on the representative block of L = 64K: 8192 query rows at query_start =
57344 against T = 65536 keys, random distinct causal selections with ~10% -1; a bf16 8192^3 matmul: 734):
    variant (BK, warps, stages)                                           TFLOP/s
    plain (64, 8, 2)  [previous default]                                    183-184
    plain (32, 8, 2) / (32, 8, 3)                                           167 / 169
    SPLIT (64, 8, 1)  [chosen by the autotuner]                             192-193
    SPLIT (32, 8, 2) / (32, 8, 3)                                           170 / 174-175
    transposed scores S^T = kv @ q^T, BK = 128 (keys along M), (128, 8, 1)  174 (152 B spilled)
    SPLIT (64, 16, 1) / transposed (128, 16, 1), 128 registers a thread      128 / 59 (spills)
    same keys for every row (slots 0..K-1, L2-resident): SPLIT / plain      219 / 200
Whole sequences in blocks of 8192 rows (autotuned): 219 at L = 16K, 203 at 64K, 194 at 200K (196 at 64K before).
Not tried for lack of room: SPLIT with BK = 64 and 2 stages needs 248 KiB (the pipeliner stages the branch's
scores through shared memory); tl.range(warp_specialize=True) leaves the loop unspecialised (it needs TMA
loads, and Hopper has no TMA gather). With the keys L2-resident the kernel gains only ~14%, so it is bound by
its own serial loop (gather, scores, softmax, layout exchange of p through shared memory, p @ V, one CTA per SM),
not by the gathers' bandwidth; FlashMLA's producer warpgroup is what Triton does not give here.

FlashMLA path. Where DeepSeek's FlashMLA is installed (`flash_mla`, built from github.com/deepseek-ai/FlashMLA)
and the call is one its sparse prefill kernel takes (bf16, 64 or 128 heads, D = 512 + 64 or 512, value_dim 512,
K a multiple of 128, a Hopper or Blackwell GPU), the default backend on CUDA is `flash_mla_sparse_fwd`: a
warp-specialised kernel (a producer warpgroup gathers the next slot block while two consumers score and
accumulate), which Triton cannot express on Hopper. FlashMLA drops -1 slots but applies no causal limit, so
slots past a row's limit are set to -1 first; its log-sum-exp of a row with no valid slot is +inf, turned into
-inf here. Otherwise the Triton kernel runs.

The torch path gathers the selected keys for chunks of query rows
(never an [L, T] tensor), computes in fp32 and is differentiable; the Triton and FlashMLA paths have no backward.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import LOG2E, interpreting, lastdim_contiguous
from .indexer_kl import pick_backend


# Elements per intermediate tensor of the torch path (a chunk's gathered keys).
_TORCH_BUDGET_ELEMS = 1 << 23
# The torch path scores every key instead of gathering the selected ones when T <= this many times K.
_DENSE_SCORING_RATIO = 16
# Triton reads TRITON_INTERPRET when a kernel is defined; the autotuner runs only compiled (with more than one
# config it fails under the interpreter).
_INTERPRET = interpreting()
# Autotuned (BK, num_warps, num_stages, SPLIT) on a GPU, by the size of the [BH, DV] fp32 accumulator. A large
# one (64 heads x 512) needs 8 warps for 128 registers per thread; BK = 64 x 576 bf16 is 72 KiB of shared memory
# per stage beside the 72 KiB query block. SPLIT = 1 computes the scores with the warpgroups split over the slots
# (see the kernel); under it Triton's pipeliner stages the scores through shared memory, so BK = 64 fits one
# stage only (sm_90: 168 KiB, 44 B spilled) and BK = 32 two (160 KiB, no spill). SPLIT = 0 is the plain
# formulation: Triton lays a dot that feeds another dot out with every warp along M, so both warpgroups compute
# the whole [64, BK] score tile (BK = 64, 2 stages: 216 KiB, ~60 B spilled). Measured on an H200, see the
# module doc. A small accumulator (16 x 64) runs on one warpgroup, where SPLIT changes nothing.
GPU_CONFIGS_LARGE_ACC = ((64, 8, 1, 1), (32, 8, 3, 1), (64, 8, 2, 0))
GPU_CONFIGS_SMALL_ACC = ((64, 4, 2, 0), (32, 4, 2, 0), (128, 4, 2, 0), (64, 8, 2, 0))
# Small tiles under the interpreter, so that the CPU tests walk several slot blocks; SPLIT = 1 runs the GPU's
# large-head formulation.
INTERPRET_CONFIG = (16, 4, 1, 1)


# --------------------------------------------------------------------------------------------- Triton ----
@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
    L, H, T, K, query_start, scale_log2,
    s_q_b, s_q_l, s_q_h,
    s_kv_b, s_kv_t,
    s_i_b, s_i_l, s_i_k,
    s_o_b, s_o_l, s_o_h,
    s_lse_b, s_lse_l,
    DV: tl.constexpr, DR: tl.constexpr, BDV: tl.constexpr, BDR: tl.constexpr,
    BH: tl.constexpr, BK: tl.constexpr, IDX64: tl.constexpr, CAST_FP32: tl.constexpr, SPLIT: tl.constexpr,
):
    # Head blocks of one row are neighbours in launch order, so the second one finds the row's kv in L2.
    pid = tl.program_id(0).to(tl.int64)
    n_hblocks = tl.cdiv(H, BH)
    row = pid // n_hblocks
    b = row // L
    t = row % L
    limit = tl.minimum(query_start + t, T - 1)

    offs_h = (pid % n_hblocks) * BH + tl.arange(0, BH)
    hmask = offs_h < H
    offs_v = tl.arange(0, BDV)
    offs_r = tl.arange(0, BDR)
    offs_k = tl.arange(0, BK)

    q_rows = q_ptr + b * s_q_b + t * s_q_l + offs_h[:, None] * s_q_h
    qv = tl.load(q_rows + offs_v[None, :], mask=hmask[:, None] & (offs_v[None, :] < DV), other=0.0)
    if CAST_FP32:
        qv = qv.to(tl.float32)
    if DR > 0:
        qr = tl.load(q_rows + DV + offs_r[None, :], mask=hmask[:, None] & (offs_r[None, :] < DR), other=0.0)
        if CAST_FP32:
            qr = qr.to(tl.float32)

    # Slot range [lo, hi) holding every valid slot of the row: the main loop visits only its blocks.
    idx_row = idx_ptr + b * s_i_b + t * s_i_l
    lo = K
    hi = 0
    for k0 in range(0, K, BK):
        slots = k0 + offs_k
        idx = tl.load(idx_row + slots * s_i_k, mask=slots < K, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx <= limit)
        lo = tl.minimum(lo, tl.min(tl.where(valid, slots, K), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(valid, slots + 1, 0), axis=0))

    kv_b = kv_ptr + b * s_kv_b
    m = tl.full((BH,), -1e30, dtype=tl.float32)  # finite start: an all-invalid block gives no NaN
    lsum = tl.zeros((BH,), dtype=tl.float32)
    acc = tl.zeros((BH, BDV), dtype=tl.float32)
    for k0 in range(lo // BK * BK, hi, BK):
        slots = k0 + offs_k
        idx = tl.load(idx_row + slots * s_i_k, mask=slots < hi, other=-1)
        if IDX64:  # 32-bit row offsets save address arithmetic whenever one batch's kv spans < 2^31 elements
            idx = idx.to(tl.int64)
        valid = (idx >= 0) & (idx <= limit)
        kv_rows = kv_b + idx[:, None] * s_kv_t
        kvv = tl.load(kv_rows + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < DV), other=0.0)
        if CAST_FP32:
            kvv = kvv.to(tl.float32)
        if DR > 0:
            kvr = tl.load(kv_rows + DV + offs_r[None, :], mask=valid[:, None] & (offs_r[None, :] < DR), other=0.0)
            if CAST_FP32:
                kvr = kvr.to(tl.float32)
        if SPLIT:
            # The scores are computed inside an scf.if (K > 0 always holds here): Triton's layout choice for a
            # dot looks for another dot in the SSA uses of its result and does not follow them out of a region,
            # so it no longer sees p @ V downstream and splits the warps over the slots ([4, 2]) instead of
            # stacking them all along the BH = 64 heads, where both warpgroups compute the whole tile. The two
            # parts are scaled apart so that the rope dot does not become the other's accumulator (which would
            # put that one back in the chain).
            if K > 0:
                z = tl.dot(qv, tl.trans(kvv), input_precision="ieee") * scale_log2
                if DR > 0:
                    z += tl.dot(qr, tl.trans(kvr), input_precision="ieee") * scale_log2
                z = tl.where(valid[None, :], z, float("-inf"))
            else:
                z = tl.zeros((BH, BK), dtype=tl.float32)
        else:
            z = tl.dot(qv, tl.trans(kvv), input_precision="ieee")
            if DR > 0:
                z = tl.dot(qr, tl.trans(kvr), z, input_precision="ieee")
            z = tl.where(valid[None, :], z * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(z - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kvv.dtype), kvv, acc * alpha[:, None], input_precision="ieee")
        m = m_new

    has = lsum > 0
    out = acc / tl.where(has, lsum, 1.0)[:, None]  # a row with no valid slot has acc = 0
    out_ptrs = out_ptr + b * s_o_b + t * s_o_l + offs_h[:, None] * s_o_h + offs_v[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & (offs_v[None, :] < DV))
    lse = tl.where(has, (m + tl.log2(tl.where(has, lsum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b * s_lse_b + t * s_lse_l + offs_h, lse, mask=hmask)


def _prune_configs(configs, named_args, **meta):
    large = meta["BH"] * meta["BDV"] > 64 * 128
    wanted = GPU_CONFIGS_LARGE_ACC if large else GPU_CONFIGS_SMALL_ACC
    return [c for c in configs if (c.kwargs["BK"], c.num_warps, c.num_stages, c.kwargs["SPLIT"]) in wanted]


# On a GPU the slot block, warps and stages are autotuned per shape (and dtype): the first call of each shape
# compiles and times its configs.
_autotuned_kernel = None if _INTERPRET else triton.autotune(
    configs=[triton.Config({"BK": bk, "SPLIT": split}, num_warps=w, num_stages=s)
             for bk, w, s, split in dict.fromkeys(GPU_CONFIGS_LARGE_ACC + GPU_CONFIGS_SMALL_ACC)],
    key=["H", "K", "DV", "DR"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_sparse_mla_fwd_kernel)


def _sparse_mla_triton(q, kv, indices, scale, value_dim, query_start=0, *, out=None, lse=None, config=None):
    """Launch the kernel; fills and returns (out [B, L, H, value_dim] in q.dtype, lse [B, L, H] fp32).
    `out` / `lse` may be preallocated (any strides with a contiguous last dim). `config` = (BK, num_warps,
    num_stages, SPLIT) skips the autotuner; CPU tensors (interpreter) use INTERPRET_CONFIG unless given one."""
    B, L, H, D = q.shape
    T, K = kv.shape[1], indices.shape[-1]
    q, kv = lastdim_contiguous(q), lastdim_contiguous(kv)
    if out is None:
        out = torch.empty(B, L, H, value_dim, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
    interpret = _INTERPRET or q.device.type != "cuda"  # CPU tensors only run under TRITON_INTERPRET=1
    DR = D - value_dim
    BH = min(64, max(16, triton.next_power_of_2(H)))  # tl.dot needs M >= 16: pad the heads of a small model
    grid = (B * L * triton.cdiv(H, BH),)
    args = (q, kv, indices, out, lse, L, H, T, K, query_start, float(scale) * LOG2E,
            *q.stride()[:3], *kv.stride()[:2], *indices.stride(), *out.stride()[:3], *lse.stride()[:2])
    meta = dict(DV=value_dim, DR=DR, BDV=max(16, triton.next_power_of_2(value_dim)),
                BDR=max(16, triton.next_power_of_2(max(DR, 1))), BH=BH,
                IDX64=T * kv.stride(1) >= 2 ** 31, CAST_FP32=interpret)
    if interpret and config is None:
        config = INTERPRET_CONFIG
    if config is None:
        _autotuned_kernel[grid](*args, **meta)
    else:
        bk, warps, stages, split = config
        _sparse_mla_fwd_kernel[grid](*args, **meta, BK=bk, SPLIT=split, num_warps=warps, num_stages=stages)
    return out, lse


# ---------------------------------------------------------------------------------------------- torch ----
def _sparse_mla_torch(q, kv, indices, scale, value_dim, query_start=0):
    """Chunks of query rows, softmax over each row's selected slots; differentiable. Computes in (at least)
    fp32; returns (out in q.dtype, lse fp32). When the selection is a large share of the keys (T <=
    `_DENSE_SCORING_RATIO` K: short sequences, as on a CPU) the products run as two matrix products over all
    keys, with the scores gathered to the slots and the probabilities scattered back, which beats gathering K
    keys per query; otherwise each row's selected keys are gathered once for all heads."""
    B, L, H, D = q.shape
    T, K = kv.shape[1], indices.shape[-1]
    dense = T <= _DENSE_SCORING_RATIO * K
    cdt = torch.promote_types(q.dtype, torch.float32)
    kv = kv.to(cdt)
    rows = max(1, _TORCH_BUDGET_ELEMS // (H * T if dense else K * max(D, H)))
    outs, lses = [], []
    for b in range(B):
        for t0 in range(0, L, rows):
            t = torch.arange(t0, min(L, t0 + rows), device=q.device)
            idx = indices[b, t].long()  # [n, K]
            valid = (idx >= 0) & (idx <= (query_start + t).clamp_max(T - 1)[:, None])
            slots = torch.where(valid, idx, 0)[:, None, :].expand(-1, H, -1)  # [n, H, K]
            query = q[b, t].to(cdt)  # [n, H, D]
            if dense:
                z = torch.matmul(query, kv[b].T).gather(-1, slots) * scale
            else:
                keys = kv[b].index_select(0, slots[:, 0].reshape(-1)).view(len(t), K, D)  # [n, K, D]
                z = torch.matmul(query, keys.transpose(1, 2)) * scale
            z = z.masked_fill(~valid[:, None, :], float("-inf"))
            lse = torch.logsumexp(z, dim=-1)  # -inf for a row with no valid slot
            p = torch.exp(z - lse.clamp_min(torch.finfo(cdt).min)[..., None])  # 0 (not NaN) in such a row
            if dense:  # a repeated slot adds into its key, as the gather does
                spread = p.new_zeros(len(t), H, T).scatter_add_(-1, slots, p)
                outs.append(torch.matmul(spread, kv[b, :, :value_dim]))
            else:
                outs.append(torch.matmul(p, keys[..., :value_dim]))
            lses.append(lse)
    out = torch.cat(outs).view(B, L, H, value_dim).to(q.dtype)
    return out, torch.cat(lses).view(B, L, H).float()


# ------------------------------------------------------------------------------------------- FlashMLA ----
BACKENDS = ("flashmla", "triton", "torch")
FLASHMLA_HEADS = (64, 128)
FLASHMLA_SLOT_MULTIPLE = 128  # its kernel walks the slots two blocks of 64 at a time, unchecked at the edge


@functools.cache
def flashmla_available() -> bool:
    try:
        import flash_mla  # noqa: F401
    except ImportError:
        return False
    return True


def flashmla_unsupported(q, indices, value_dim) -> str | None:
    """Why FlashMLA's sparse prefill cannot take this call, or None when it can."""
    _, _, heads, dim = q.shape
    if not flashmla_available():
        return "flash_mla is not installed (build it from https://github.com/deepseek-ai/FlashMLA)"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] not in (9, 10):
        return "FlashMLA's sparse prefill runs on Hopper (sm_90a) and Blackwell (sm_100) GPUs only"
    if q.dtype != torch.bfloat16:
        return f"FlashMLA takes bf16; got {q.dtype}"
    if heads not in FLASHMLA_HEADS:
        return f"FlashMLA takes {FLASHMLA_HEADS} heads; got {heads}"
    if value_dim != 512 or dim not in (512, 576):
        return f"FlashMLA takes value_dim 512 and D 512 or 576; got {value_dim} and {dim}"
    if indices.shape[-1] % FLASHMLA_SLOT_MULTIPLE:
        return f"FlashMLA takes K a multiple of {FLASHMLA_SLOT_MULTIPLE}; got {indices.shape[-1]}"
    return None


def _sparse_mla_flashmla(q, kv, indices, scale, value_dim, query_start=0):
    """FlashMLA's sparse prefill, one batch row at a time (it takes no batch dimension); same outputs as the
    Triton path."""
    from flash_mla import flash_mla_sparse_fwd

    L, T = q.shape[1], kv.shape[1]
    limit = (query_start + torch.arange(L, device=q.device)).clamp_max(T - 1)[:, None]
    outs, lses = [], []
    for b in range(q.shape[0]):
        idx = indices[b]
        slots = torch.where((idx >= 0) & (idx <= limit), idx, -1).to(torch.int32)
        out, _, lse = flash_mla_sparse_fwd(lastdim_contiguous(q[b]), lastdim_contiguous(kv[b]).unsqueeze(1),
                                           slots.unsqueeze(1), float(scale), d_v=value_dim)
        outs.append(out)
        lses.append(lse.masked_fill_(lse == float("inf"), float("-inf")))
    if len(outs) == 1:  # the sparse forward's case: FlashMLA's own output, without a copy into a second buffer
        return outs[0][None], lses[0][None]
    return torch.stack(outs), torch.stack(lses)


def _pick_attention_backend(q, indices, value_dim, backend: str | None) -> str:
    if backend is None:
        if flashmla_unsupported(q, indices, value_dim) is None:
            return "flashmla"
        return pick_backend(q.device)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown sparse MLA backend {backend!r}; choose from {BACKENDS}.")
    if backend == "flashmla":
        reason = flashmla_unsupported(q, indices, value_dim)
        if reason is not None:
            raise ValueError(f"backend='flashmla' cannot run this call: {reason}. Use backend='triton'.")
        return backend
    return pick_backend(q.device, backend)


# ------------------------------------------------------------------------------------------- dispatch ----
def _check_inputs(q, kv, indices, value_dim, query_start) -> None:
    if q.dim() != 4 or kv.dim() != 3 or indices.dim() != 3:
        raise ValueError(f"Expected q [B, L, H, D], kv [B, T, D] and indices [B, L, K]; got {tuple(q.shape)}, "
                         f"{tuple(kv.shape)} and {tuple(indices.shape)}.")
    B, L, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"kv {tuple(kv.shape)} must be [B={B}, T, D={D}] to match q {tuple(q.shape)}.")
    if indices.shape[:2] != (B, L):
        raise ValueError(f"indices {tuple(indices.shape)} must be [B={B}, L={L}, K] to match q {tuple(q.shape)}.")
    if kv.shape[1] < 1:
        raise ValueError("kv has no token (T = 0).")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64; got {indices.dtype}.")
    if not q.is_floating_point() or kv.dtype != q.dtype:
        raise ValueError(f"q and kv must share one floating dtype; got {q.dtype} and {kv.dtype}.")
    if not 1 <= value_dim <= D:
        raise ValueError(f"value_dim must be in [1, D={D}]; got {value_dim}.")
    if query_start < 0:
        raise ValueError(f"query_start must be >= 0; got {query_start}.")
    if kv.device != q.device or indices.device != q.device:
        raise ValueError(f"q, kv and indices must share a device; got {q.device}, {kv.device}, {indices.device}.")


def sparse_mla_attention(q, kv, indices, scale: float, *, value_dim: int, query_start: int = 0,
                         backend: str | None = None, return_lse: bool = False):
    """Sparse attention of absorbed MLA queries over one shared latent key per token (see the module doc).

    q [B, L, H, D] (absorbed query: kv_lora dims then rope dims, e.g. D = 512 + 64), kv [B, T, D] (one latent
    key per token shared by all heads, MQA), value = kv[..., :value_dim], indices [B, L, K] int32/int64: the
    selected keys of each query; slot j of query row t is valid iff 0 <= indices[b,t,j] <= query_start + t
    (and < T), so -1 padding AND entries past the causal limit are dropped (transformers pads short rows with
    indices > t). Returns out [B, L, H, value_dim] in q.dtype and, if return_lse, lse [B, L, H] fp32
    natural-log of sum_j exp(scale * q.kv) over valid slots (-inf for a row with no valid slot, whose output
    is 0). backend: None -> "flashmla" on CUDA where it is installed and takes the call (`flashmla_unsupported`),
    else "triton"; "torch" on CPU. Only the torch path has a backward.
    """
    _check_inputs(q, kv, indices, value_dim, query_start)
    backend = _pick_attention_backend(q, indices, value_dim, backend)
    B, L, H, _ = q.shape
    if B * L == 0 or indices.shape[-1] == 0:
        out = q.new_zeros(B, L, H, value_dim)
        lse = torch.full((B, L, H), float("-inf"), dtype=torch.float32, device=q.device)
    elif backend in ("triton", "flashmla"):
        if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
            raise ValueError(f"The {backend} sparse MLA kernel is forward-only: use backend='torch' for gradients "
                             "or call it under torch.no_grad().")
        launch = _sparse_mla_triton if backend == "triton" else _sparse_mla_flashmla
        out, lse = launch(q, kv, indices, scale, value_dim, query_start)
    else:
        out, lse = _sparse_mla_torch(q, kv, indices, scale, value_dim, query_start)
    return (out, lse) if return_lse else out


def sparse_mla_flops(B: int, L: int, H: int, D: int, value_dim: int, K: int) -> int:
    """Matmul FLOPs of one call with every slot valid: 2*H*K*D for the scores plus 2*H*K*value_dim for p @ V,
    per query row."""
    return 2 * B * L * H * K * (D + value_dim)
