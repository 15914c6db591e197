"""Plain PyTorch reference of the multi-layer indexer KL loss. It materialises every [L, L] tensor and is
meant for tests and for the naive baseline of `scripts/bench_kl.py`, never for training.

Student logits  I[b,t,s] = sum_h w[b,t,h] * relu(q_I[b,t,h] . k_I[b,s])
Teacher         p[b,t,s] = mean_{g,h} softmax_s(scale * q_T[g,b,h,t] . k_T[g,b,h // (H/Hk),s])
Loss            mean_{b,t} KL(p[b,t] || softmax_s(I[b,t]))

Dense mode: the support of row t is every s <= t. Sparse mode: it is the set of valid entries of
topk_indices[b,t] (-1 marks an empty slot), for the teacher's heads and the student alike. The rows may be a
block of the keys' sequence, row t at position query_start + t: then s <= query_start + t. Over compressed
entries (DeepSeek-V4, compress rate m) the keys are the L // m entries and the causal rule is s < (t + 1) // m.
"""

import math

import torch


def support_mask(batch: int, seq_len: int, device, topk_indices: torch.Tensor | None = None, *,
                 num_keys: int | None = None, query_start: int = 0) -> torch.Tensor:
    """Boolean [B, L, T] (T = num_keys, default L): True where key s is in the support of query row t, at
    position query_start + t."""
    num_keys = seq_len if num_keys is None else num_keys
    position = query_start + torch.arange(seq_len, device=device)
    causal = torch.arange(num_keys, device=device)[None, :] <= position[:, None]
    if topk_indices is None:
        return causal.expand(batch, seq_len, num_keys)
    valid = topk_indices >= 0
    selected = torch.zeros(batch, seq_len, num_keys + 1, dtype=torch.bool, device=device)
    # Empty slots scatter into a spare column that is dropped afterwards.
    selected.scatter_(-1, torch.where(valid, topk_indices.long(), num_keys), True)
    return selected[..., :num_keys] & causal


def student_logits(index_q: torch.Tensor, index_k: torch.Tensor, index_weights: torch.Tensor) -> torch.Tensor:
    """I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]), as [B, L, T]."""
    scores = torch.einsum("bthd,bsd->bths", index_q, index_k).relu()
    return torch.einsum("bth,bths->bts", index_weights, scores)


def teacher_probs(teacher_q: torch.Tensor, teacher_k: torch.Tensor, teacher_scale: float,
                  support: torch.Tensor) -> torch.Tensor:
    """Head- and layer-averaged attention probabilities over `support`, as [B, L, T]."""
    num_heads, num_kv_heads = teacher_q.shape[2], teacher_k.shape[2]
    keys = teacher_k.repeat_interleave(num_heads // num_kv_heads, dim=2)
    scores = torch.einsum("gbhtd,gbhsd->gbhts", teacher_q, keys) * teacher_scale
    scores = scores.masked_fill(~support[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with an empty support give 0, not NaN
    return probs.mean(dim=(0, 2))


def reference_indexer_kl_loss(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, *,
                              topk_indices=None, query_start: int = 0) -> torch.Tensor:
    """Materialising reference of `indexcache_train.kernels.indexer_kl_loss`, the mean over the B*L query
    rows; index_k [B, T, Di] and teacher_k [G, B, Hk, T, D] may hold more keys than rows, the rows then at
    positions query_start .. query_start + L - 1. Computes in at least fp32."""
    batch, seq_len = index_q.shape[:2]
    support = support_mask(batch, seq_len, index_q.device, topk_indices, num_keys=index_k.shape[1],
                           query_start=query_start)
    return _kl_over_support(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, support)


def compressed_support_mask(batch: int, seq_len: int, compress_rate: int, device,
                            topk_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, L, L // m]: True where compressed entry w is in query t's support, w < (t + 1) // m (and
    selected, in sparse mode)."""
    num_entries = seq_len // compress_rate
    limit = (torch.arange(seq_len, device=device) + 1) // compress_rate
    visible = torch.arange(num_entries, device=device)[None, :] < limit[:, None]
    if topk_indices is None:
        return visible.expand(batch, seq_len, num_entries)
    selected = torch.zeros(batch, seq_len, num_entries + 1, dtype=torch.bool, device=device)
    selected.scatter_(-1, torch.where(topk_indices >= 0, topk_indices.long(), num_entries), True)
    return selected[..., :num_entries] & visible


def reference_compressed_indexer_kl_loss(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, *,
                                         compress_rate: int, topk_indices=None) -> torch.Tensor:
    """Materialising reference of `kernels.compressed.CompressedIndexerKL` (index_k and teacher_k over the
    L // m compressed entries; teacher_q [G, B, H, L, D], teacher_k [G, B, Hk, L // m, D]): the mean over the
    B * L rows, a row without a candidate counting 0."""
    batch, seq_len = index_q.shape[:2]
    support = compressed_support_mask(batch, seq_len, compress_rate, index_q.device, topk_indices)
    return _kl_over_support(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, support)


def _kl_over_support(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, support):
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    index_q, index_k, index_weights = (x.to(dtype) for x in (index_q, index_k, index_weights))
    teacher_q, teacher_k = teacher_q.detach().to(dtype), teacher_k.detach().to(dtype)
    target = teacher_probs(teacher_q, teacher_k, teacher_scale, support)
    # A finite fill keeps a row with an empty support NaN-free in the backward; its target is 0 anyway.
    logits = student_logits(index_q, index_k, index_weights).masked_fill(~support, torch.finfo(dtype).min)
    log_q = torch.log_softmax(logits, dim=-1)
    inside = target > 0
    kl = torch.where(inside, target * (target.clamp_min(1e-30).log() - log_q.masked_fill(~inside, 0.0)), 0.0)
    return kl.sum(-1).mean()


def sparse_mla_attention_reference(q, kv, indices, scale, value_dim, query_start=0):
    """Materialising reference of `indexcache_train.kernels.sparse_mla.sparse_mla_attention` (both outputs):
    dense scores of every query against every key, masked to the selected keys that are causally visible
    (0 <= s <= query_start + t), as transformers' eager path masks them. Equal to the kernel's sum over slots
    for duplicate-free selections. Computes in at least fp32; returns (out [B, L, H, value_dim], lse [B, L, H])."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, kv = q.to(dtype), kv.to(dtype)
    batch, seq_len = q.shape[:2]
    num_keys = kv.shape[1]
    idx = indices.long()
    valid = idx >= 0
    selected = torch.zeros(batch, seq_len, num_keys + 1, dtype=torch.bool, device=q.device)
    # Padding and out-of-range entries scatter into a spare column that is dropped afterwards.
    selected.scatter_(-1, torch.where(valid & (idx < num_keys), idx, num_keys), True)
    position = query_start + torch.arange(seq_len, device=q.device)
    causal = torch.arange(num_keys, device=q.device)[None, :] <= position[:, None]
    support = selected[..., :num_keys] & causal  # [B, L, T]
    scores = torch.einsum("blhd,btd->blht", q, kv) * scale
    scores = scores.masked_fill(~support[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no selected key gives 0, not NaN
    return torch.einsum("blht,btv->blhv", probs, kv[..., :value_dim]), lse


def reference_pooled_indexer_kl_loss(index_q, pool_keys, index_weights, teacher_q, teacher_k, teacher_scale, *,
                                     pool_size: int, topk_indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialising reference of the pooled indexer's KL (`kernels/pooled.py`), over pools.

    pool_keys [B, C, Di] are the compressed keys of the complete pools (pool c = keys cP .. cP + P - 1). Key s
    is a candidate of query t when its pool has ended by t, (s // P) P + P - 1 <= t, and, in sparse mode, when
    topk_indices[b, t] selects it. The teacher is each head's attention over those keys, head- and
    layer-averaged and summed into pools; the student is softmax over the candidate pools of
    J[t, c] = sum_h w[t,h] relu(q[t,h] . K[c]). Returns (mean over rows of KL over pools, mean over rows of the
    teacher-only term by which the token-level form exceeds it). Computes in at least fp32."""
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    index_q, pool_keys, index_weights = (x.to(dtype) for x in (index_q, pool_keys, index_weights))
    teacher_q, teacher_k = teacher_q.detach().to(dtype), teacher_k.detach().to(dtype)
    batch, seq_len = index_q.shape[:2]
    pools = pool_keys.shape[1]
    device = index_q.device
    keys = torch.arange(seq_len, device=device)
    pool_end = (keys // pool_size) * pool_size + pool_size - 1
    ended = pool_end[None, :] <= keys[:, None]  # [t, s]
    support = support_mask(batch, seq_len, device, topk_indices) & ended
    token_target = teacher_probs(teacher_q, teacher_k, teacher_scale, support)  # [B, L, L]
    owner = ((keys[:, None] // pool_size) == torch.arange(pools, device=device)[None, :]).to(dtype)  # [L, C]
    target = token_target @ owner  # [B, L, C]
    pool_support = (support.to(dtype) @ owner) > 0
    scores = torch.einsum("bthd,bcd->bthc", index_q, pool_keys).relu()
    logits = torch.einsum("bth,bthc->btc", index_weights, scores).masked_fill(~pool_support, torch.finfo(dtype).min)
    log_q = torch.log_softmax(logits, dim=-1)
    inside = target > 0
    kl = torch.where(inside, target * (target.clamp_min(1e-30).log() - log_q.masked_fill(~inside, 0.0)), 0.0)

    def plogp(p):
        return torch.where(p > 0, p * p.clamp_min(1e-30).log(), 0.0).sum(-1)

    teacher_term = plogp(token_target) - plogp(target) + math.log(pool_size) * pool_support.any(-1)
    return kl.sum(-1).mean(), teacher_term.mean()
