"""The KL of a pooled indexer (GLM-5.3-Flash's `Glm5NextTextIndexer`), reduced to the token-level kernels.

A pooled indexer scores pools of P consecutive keys, pool c = keys cP .. cP + P - 1 (counted from the first key
of the sequence), each through one compressed key (per channel d, a learned softmax over the pool's tokens):

    K[c, d]  = sum_{i<P} softmax_i(g[cP+i, d] + ape[i, d]) * k[cP+i, d],     g = W_gate h
    J[t, c]  = sum_h w[t,h] relu(q[t,h] . K[c])

Query t may pick pool c only once the pool is complete, cP + P - 1 <= t: its candidates are the keys
s <= lambda(t) = t - (t + 1) mod P. The keys after lambda(t), the visible tail (fewer than P), are never
scored: the native indexer appends them to every selection (`index_kpool_always_select_tail`) or drops them,
but does not choose them, so the distillation leaves them out too.

Target: each served layer's head-mean attention over the candidate keys, each head renormalised over them
(dense stage: every visible complete pool; sparse stage: the selected pools), summed into pools,
P_bar[t, c] = sum_{s in c} p_bar[t, s]. The loss is mean_t KL(P_bar[t] || softmax_c J[t]).

Reduction to the token kernels. Give every key s of pool c the pool's key, k'[s] = K[c(s)], so that the
token logit I[t, s] = J[t, c(s)]. Over the candidate keys softmax_s I = q[c(s)] / P (every pool has P keys), so

    sum_s p(log p - log softmax_s I) = KL(P_bar || q) + sum_c P_bar[c] KL(p(.|c) || uniform_P)

The second term depends on the teacher only. Hence the token-level KL on the candidate support, with
pool keys broadcast to their tokens, has exactly the pooled KL's gradients:
dI[t, s] = q[c]/P - p[s], and the key gradient of pool c is the sum over its tokens, which autograd's gather
backward forms, then carries through the compression into W_gate, ape and the indexer's k. Its value is
the pooled KL plus that teacher-only term (the within-pool KL from uniform, >= 0). The kernels only need the
candidate support: a per-row key limit lambda(t) in dense mode (`dense.py`, KPOOL), the selection cut at
lambda(t) in sparse mode (`pool_candidates`). The extra work over a pool-level kernel is P x the student's
logit work per row; the teacher's, which dominates, is the same.
"""

from __future__ import annotations

import torch


def visible_limit(rows: torch.Tensor, pool_size: int) -> torch.Tensor:
    """lambda(t) = t - (t + 1) mod P: the last key of the last complete pool visible to query t (-1 if none)."""
    return rows if pool_size == 1 else rows - (rows + 1) % pool_size


def pool_candidates(topk_indices: torch.Tensor, pool_size: int) -> torch.Tensor:
    """A pooled selection [B, L, k] (pool tokens, visible tail, -1 padding) without the tail: -1 for keys
    after lambda(t), whatever their slot."""
    rows = torch.arange(topk_indices.shape[1], device=topk_indices.device)
    inside = topk_indices <= visible_limit(rows, pool_size)[None, :, None]
    return torch.where(inside, topk_indices, -1).to(topk_indices.dtype)


def pool_to_tokens(pool_keys: torch.Tensor, pool_size: int, seq_len: int) -> torch.Tensor:
    """[B, C, Di] keys of the complete pools -> [B, seq_len, Di], each token holding its pool's key (zeros after
    the last complete pool: no query sees those keys). Differentiable: a pool key's gradient sums its tokens'."""
    batch, pools, dim = pool_keys.shape
    if pools * pool_size > seq_len:
        raise ValueError(f"{pools} pools of {pool_size} keys do not fit {seq_len} tokens.")
    tokens = pool_keys.repeat_interleave(pool_size, dim=1)
    return torch.cat([tokens, pool_keys.new_zeros(batch, seq_len - tokens.shape[1], dim)], dim=1)
