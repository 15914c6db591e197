"""The multi-layer indexer KL over compressed candidates (DeepSeek-V4's compressed sparse attention).

A CSA layer pools every m = compress_rate tokens into one compressed KV entry; its indexer ranks the
T = L // m entries, and query t sees entry w once its window is complete:

    w < (t + 1) // m                                     (the causal rule; tokens are the case m = 1)

Student logits I[t, w] = sum_h w[t, h] relu(q[t, h] . k[w]) over the indexer's compressed keys. The teacher of
served layer g is the attention mass its heads give each candidate entry, each head's softmax of
scale * q^g[t, h] . c^g[w] taken over the candidates (the entries it may see in the dense stage, its F layer's
top-k in the sparse stage; the layer's sliding window of raw tokens and its sink are attended whatever the
indexer picks, so they are not candidates), then averaged over heads. The loss is

    (1 / (B L)) sum_t (1/G) sum_g KL(p^g[t] || softmax_w I[t])

and the first m - 1 queries, which see no entry yet, add zero.

**Sparse stage**: the top-k holds entry indices with -1 in empty slots, which is what the sparse kernel takes:
one `IndexerKLLoss` over the T entries, its rows counted as B * L (its `total_rows`).

**Dense stage, an exact reduction to the causal kernel**: write t = (r + 1) m - 1 + j with 0 <= j < m. Then
(t + 1) // m = r + 1, so query t sees entries w <= r. For a fixed residue j, the queries r = 0 .. R_j - 1
(R_j = (L - j) // m) against entries 0 .. R_j - 1 are an ordinary causal problem, s <= r: the dense kernel
runs unchanged on m strided slices of the query rows, sum_j R_j^2 / 2 ~ L^2 / (2 m) pairs, exactly the visible
ones. Every row t >= m - 1 falls in one slice; the slices' losses weigh R_j / L and their gradients sum
through autograd's slicing.
"""

from __future__ import annotations

import torch

from .indexer_kl import IndexerKLLoss


def check_compressed_topk(topk_indices: torch.Tensor, compress_rate: int, num_entries: int) -> None:
    """[B, L, k] entry indices: -1 for an empty slot, else 0 <= w < (t + 1) // compress_rate, no repeats."""
    if topk_indices.dtype not in (torch.int32, torch.int64) or topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be an int32/int64 [B, L, k] tensor; got {topk_indices.dtype} "
                         f"{tuple(topk_indices.shape)}.")
    limit = torch.div(torch.arange(topk_indices.shape[1], device=topk_indices.device) + 1, compress_rate,
                      rounding_mode="floor").clamp_max(num_entries)[None, :, None]
    bad = (topk_indices < -1) | (topk_indices >= limit)
    if bad.any():
        b, t, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"topk_indices[{b}, {t}, {j}] = {int(topk_indices[b, t, j])} is outside [-1, {int(limit[0, t, 0]) - 1}]: "
            f"query {t} sees only the entries whose window of {compress_rate} tokens is complete, and -1 marks "
            "an empty slot.")
    ordered = topk_indices.sort(dim=-1).values
    if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
        raise ValueError("topk_indices selects an entry more than once in a row: mark the repeats -1.")


class CompressedIndexerKL:
    """`IndexerKLLoss` over compressed candidates (see the module docstring), fed one served layer at a time:

        kl = CompressedIndexerKL(index_q, index_k, index_weights, compress_rate=m, num_layers=G,
                                 topk_indices=None)      # index_q [B, L, Hi, Di], index_k [B, L // m, Di]
        for layer in served_layers:
            kl.add_layer(teacher_q, teacher_k, scale)    # [B, H, L, D], [B, Hk, L // m, D]
        loss = kl.loss()
    """

    def __init__(self, index_q, index_k, index_weights, *, compress_rate: int, num_layers: int,
                 topk_indices=None, backend: str | None = None, check_indices: bool = True):
        if compress_rate < 1:
            raise ValueError(f"compress_rate must be >= 1, got {compress_rate}.")
        batch, seq_len = index_q.shape[:2]
        num_entries = seq_len // compress_rate
        if index_k.dim() != 3 or index_k.shape[1] != num_entries:
            raise ValueError(f"index_k must hold the {num_entries} compressed entries of L = {seq_len} at compress "
                             f"rate {compress_rate}, [B, {num_entries}, Di]; got {tuple(index_k.shape)}.")
        if num_entries == 0:
            raise ValueError(f"L = {seq_len} is shorter than one window of {compress_rate} tokens: no candidate.")
        self.seq_len, self.num_entries = seq_len, num_entries
        if topk_indices is not None:
            if check_indices:
                check_compressed_topk(topk_indices, compress_rate, num_entries)
            whole = IndexerKLLoss(index_q, index_k, index_weights, num_layers=num_layers, topk_indices=topk_indices,
                                  backend=backend, total_rows=batch * seq_len)
            self.slices = [(slice(None), num_entries, seq_len, whole)]
            return
        self.slices = []
        for residue in range(compress_rate):
            count = (seq_len - residue) // compress_rate
            if count == 0:
                continue
            rows = torch.arange(count, device=index_q.device) * compress_rate + (compress_rate - 1 + residue)
            kl = IndexerKLLoss(index_q[:, rows], index_k[:, :count], index_weights[:, rows], num_layers=num_layers,
                               backend=backend)
            self.slices.append((rows, count, count, kl))

    def add_layer(self, teacher_q: torch.Tensor, teacher_k: torch.Tensor, teacher_scale: float) -> torch.Tensor:
        """Add one served layer: teacher_q [B, H, L, D], teacher_k [B, Hk, L // m, D]. Returns its mean KL."""
        if teacher_k.dim() != 4 or teacher_k.shape[2] != self.num_entries or teacher_q.shape[2:3] != (self.seq_len,):
            raise ValueError(f"Expected teacher_q [B, H, {self.seq_len}, D] and teacher_k [B, Hk, {self.num_entries}, "
                             f"D]; got {tuple(teacher_q.shape)} and {tuple(teacher_k.shape)}.")
        total = 0.0
        for rows, entries, weight, kl in self.slices:
            total = total + kl.add_layer(teacher_q[:, :, rows], teacher_k[:, :, :entries], teacher_scale) * weight
        return total / self.seq_len

    def loss(self) -> torch.Tensor:
        return sum(kl.loss() * weight for _, _, weight, kl in self.slices) / self.seq_len
