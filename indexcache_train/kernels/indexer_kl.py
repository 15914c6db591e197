"""The multi-layer indexer KL loss: public entry points.

For an F layer whose indexer serves G layers (itself and its S layers), with student logits
I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]) and teacher attention p^g[t] of each served layer g:

    indexer_kl_loss      = mean_t KL(p_bar[t] || softmax(I[t])),          p_bar = mean_g p^g
    IndexerKLLoss.loss() = mean_t (1/G) sum_g KL(p^g[t] || softmax(I[t]))  (paper Eq. 1)

Both have the same gradient, d/dI = softmax(I) - p_bar, because the loss is linear in each p^g; they differ
by the constant Jensen gap. That linearity is what lets the trainer stream served layers one at a time.

The kernels (`dense.py`, `sparse.py`) compute the loss and the gradients of the index tensors in the same
pass ("gradient in the forward"). `_PrecomputedGradient` hands those to autograd, whose backward only
scales them by grad_output, so `engine.backward(loss)` sees an ordinary loss.
"""

from __future__ import annotations

import torch

from .common import interpreting
from .dense import dense_kl_accumulate
from .pooled import pool_candidates
from .sparse import sparse_kl_accumulate

BACKENDS = ("triton", "torch")


class _PrecomputedGradient(torch.autograd.Function):
    """A loss whose gradients w.r.t. the index tensors were computed in its forward."""

    @staticmethod
    def forward(ctx, loss, index_q, index_k, index_weights, d_index_q, d_index_k, d_index_weights):
        ctx.save_for_backward(d_index_q, d_index_k, d_index_weights)
        ctx.dtypes = (index_q.dtype, index_k.dtype, index_weights.dtype)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple((grad_output * g).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (None, *grads, None, None, None)


def pick_backend(device: torch.device, backend: str | None = None) -> str:
    """Triton on CUDA, the chunked torch path on CPU. `backend="triton"` on CPU tensors runs the kernels in
    Triton's interpreter, which needs TRITON_INTERPRET=1 before the kernels are imported (tests do that)."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown KL backend {backend!r}; choose from {BACKENDS}.")
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("The Triton backend on CPU tensors needs TRITON_INTERPRET=1, set before import.")
    return backend


def _check_index_tensors(index_q, index_k, index_weights, num_keys: int | None = None) -> None:
    if index_q.dim() != 4 or index_k.dim() != 3 or index_weights.dim() != 3:
        raise ValueError(
            "Expected index_q [B, L, Hi, Di], index_k [B, L, Di] and index_weights [B, L, Hi]; got "
            f"{tuple(index_q.shape)}, {tuple(index_k.shape)} and {tuple(index_weights.shape)}."
        )
    batch, seq_len, heads, dim = index_q.shape
    num_keys = seq_len if num_keys is None else num_keys
    if index_k.shape != (batch, num_keys, dim) or index_weights.shape != (batch, seq_len, heads):
        raise ValueError(
            f"index_k must be {(batch, num_keys, dim)} and index_weights {(batch, seq_len, heads)} to match "
            f"index_q {tuple(index_q.shape)}; got {tuple(index_k.shape)} and {tuple(index_weights.shape)}."
        )
    if seq_len == 0:
        raise ValueError("The sequence is empty (L = 0).")
    for name, tensor in (("index_k", index_k), ("index_weights", index_weights)):
        if tensor.device != index_q.device:
            raise ValueError(f"{name} is on {tensor.device} but index_q is on {index_q.device}.")


def _check_teacher(index_q, teacher_q, teacher_k, num_keys: int | None = None) -> None:
    """teacher_q [G, B, H, n, D] for the n query rows of index_q, teacher_k [G, B, Hk, num_keys, D]."""
    batch, seq_len = index_q.shape[:2]
    num_keys = seq_len if num_keys is None else num_keys
    if teacher_q.dim() != 5 or teacher_k.dim() != 5:
        raise ValueError(
            "Expected teacher_q [G, B, H, L, D] and teacher_k [G, B, Hk, L, D]; got "
            f"{tuple(teacher_q.shape)} and {tuple(teacher_k.shape)}."
        )
    groups, tb, heads, tl, dim = teacher_q.shape
    if (tb, tl) != (batch, seq_len) or teacher_k.shape[:2] != (groups, batch) or teacher_k.shape[3:] != (num_keys, dim):
        raise ValueError(
            f"Teacher shapes {tuple(teacher_q.shape)} / {tuple(teacher_k.shape)} do not fit B={batch}, L={seq_len}."
        )
    if heads % teacher_k.shape[2]:
        raise ValueError(f"H={heads} query heads is not a multiple of Hk={teacher_k.shape[2]} key heads.")
    if teacher_q.device != index_q.device or teacher_k.device != index_q.device:
        raise ValueError("The teacher tensors must be on the index tensors' device.")


def check_topk_indices(topk_indices: torch.Tensor, batch: int, seq_len: int) -> None:
    """Sparse supports: [B, L, k] integers, -1 for an empty slot, else 0 <= s <= t, each key at most once.

    A row's top-k is a set, as in the reference and in Megatron-LM's loss. The kernels sum over the slots, so a
    repeated key would count twice in the loss and its gradients; such a row is rejected rather than silently
    weighted (mark the repeats -1 instead).
    """
    if topk_indices.dtype not in (torch.int32, torch.int64) or topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be an int32/int64 [B, L, k] tensor; got {topk_indices.dtype} "
                         f"{tuple(topk_indices.shape)}.")
    if topk_indices.shape[:2] != (batch, seq_len):
        raise ValueError(f"topk_indices is {tuple(topk_indices.shape)}, expected ({batch}, {seq_len}, k).")
    query = torch.arange(seq_len, device=topk_indices.device)[None, :, None]
    bad = (topk_indices < -1) | (topk_indices > query)
    if bad.any():
        b, t, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"topk_indices[{b}, {t}, {j}] = {int(topk_indices[b, t, j])} is outside [-1, {t}]: query t may only "
            "select keys s <= t, and -1 marks an empty slot."
        )
    ordered = topk_indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if repeated.any():
        b, t, j = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(
            f"topk_indices[{b}, {t}] selects key {int(ordered[b, t, j])} more than once: a top-k is a set of keys, "
            "and a repeat would count twice in the loss. Mark the repeated slots -1."
        )


class IndexerKLLoss:
    """The layer-by-layer form: feed the served layers one at a time, so that only one teacher layer is held.

        kl = IndexerKLLoss(index_q, index_k, index_weights, num_layers=G, topk_indices=None)
        for layer in served_layers:            # as each layer's attention runs
            kl.add_layer(teacher_q, teacher_k, scale)   # [B, H, L, D], [B, Hk, L, D]; freed by the caller after
        loss = kl.loss()                       # mean over layers and rows; backward gives the index gradients

    A layer may also arrive in blocks of query rows, `add_layer(teacher_q_rows, teacher_k, scale,
    query_start=r0)` with teacher_q [B, H, n, D] for rows r0 .. r0 + n - 1 and all keys, so that a long
    sequence's teacher never exists whole; the layer is complete once all L rows have been added.

    Context parallel: index_q and index_weights may hold a shard of the sequence's query rows and index_k,
    the teacher keys and (sparse mode) the top-k all T keys of the sequence; `total_rows` is then B * T, the
    rows the mean is over, so that the shards' losses and gradients sum to the whole sequence's. In dense
    mode each block of rows names the sequence position of its first row (`query_position`), which sets
    its causal limit; a shard of several runs of positions comes as one block per run.

    Pooled indexer (`pool_size` P > 1, `pooled.py`): index_k holds each token's pool key (`pool_to_tokens`), and
    row t's support is the pools complete at t, cut from the selection in sparse mode; the gradients are the
    pooled KL's, the value is that KL plus a teacher-only term.
    """

    def __init__(self, index_q, index_k, index_weights, *, num_layers: int, topk_indices=None,
                 backend: str | None = None, check_indices: bool = True, total_rows: int | None = None,
                 pool_size: int = 1):
        sharded = total_rows is not None
        _check_index_tensors(index_q, index_k, index_weights, index_k.shape[1] if sharded else None)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        _check_pool_size(pool_size, sharded)
        batch, seq_len = index_q.shape[:2]
        if sharded:
            check_indices = False  # its causal check takes the rows for the keys' first ones
        if topk_indices is not None and check_indices:  # the range check syncs with the device
            check_topk_indices(topk_indices, batch, seq_len)
        if topk_indices is not None and pool_size > 1:
            topk_indices = pool_candidates(topk_indices, pool_size)
        self.pool_size = pool_size
        self.index_tensors = (index_q, index_k, index_weights)
        self.num_layers, self.topk_indices = num_layers, topk_indices
        self.backend = pick_backend(index_q.device, backend)
        detached = [t.detach() for t in self.index_tensors]
        self.grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in detached]
        self.layer_losses: list[torch.Tensor] = []
        self._rows = batch * seq_len if total_rows is None else total_rows
        self._open_rows, self._open_total = 0, None  # a layer arriving in row blocks

    def add_layer(self, teacher_q: torch.Tensor, teacher_k: torch.Tensor, teacher_scale: float,
                  query_start: int = 0, teacher_lse: torch.Tensor | None = None,
                  query_position: int | None = None) -> torch.Tensor | None:
        """Add one served layer (or a block of its query rows, see the class docstring): teacher_q
        [B, H, n, D] and teacher_k [B, Hk, T, D]. In sparse mode `teacher_lse` [B, H, n] (fp32, natural log)
        may carry each head's log-sum-exp over the selection, as the sparse attention computed it, which
        saves the kernel a pass. In dense mode `query_position` is the sequence position of the block's first
        row, whose query sees keys s <= query_position (default query_start: the rows are the keys' first
        ones); in sparse mode the top-k already holds the keys' positions. Returns the layer's mean KL once
        it is complete, else None."""
        if len(self.layer_losses) == self.num_layers:
            raise RuntimeError(f"All {self.num_layers} served layers were already added.")
        if teacher_q.dim() != 4 or teacher_k.dim() != 4:
            raise ValueError("add_layer takes one layer: teacher_q [B, H, L, D] and teacher_k [B, Hk, L, D].")
        index_q, index_k, index_weights = (t.detach() for t in self.index_tensors)
        seq_len, block = index_q.shape[1], teacher_q.shape[2]
        rows = slice(query_start, query_start + block)
        if block != seq_len:
            if query_start != self._open_rows or query_start + block > seq_len:
                raise ValueError(f"Row block {query_start}..{query_start + block - 1} does not continue the "
                                 f"{self._open_rows} rows added so far of L = {seq_len}.")
        _check_teacher(index_q[:, rows], teacher_q.unsqueeze(0), teacher_k.unsqueeze(0), num_keys=index_k.shape[1])
        if teacher_lse is not None and (self.topk_indices is None or teacher_lse.shape != teacher_q.shape[:3]):
            raise ValueError(f"teacher_lse is for sparse mode and must be {tuple(teacher_q.shape[:3])} [B, H, n].")
        d_q, d_k, d_w = self.grads
        topk = None if self.topk_indices is None else self.topk_indices[:, rows]
        # Each layer's KL is linear in its target; weight 1/G per layer gives the group's mean.
        grad_scale = 1.0 / (self._rows * self.num_layers)
        with torch.no_grad():
            total = _accumulate(index_q[:, rows], index_k, index_weights[:, rows], teacher_q.detach().unsqueeze(0),
                                teacher_k.detach().unsqueeze(0), teacher_scale, topk, grad_scale,
                                d_q[:, rows], d_k, d_w[:, rows], self.backend,
                                None if teacher_lse is None else teacher_lse.float().unsqueeze(0),
                                query_start if query_position is None else query_position, self.pool_size)
        self._open_total = total if self._open_total is None else self._open_total + total
        self._open_rows += block
        if self._open_rows < seq_len:
            return None
        layer_loss = self._open_total / self._rows
        self._open_rows, self._open_total = 0, None
        self.layer_losses.append(layer_loss)
        return layer_loss

    def loss(self) -> torch.Tensor:
        if len(self.layer_losses) != self.num_layers:
            raise RuntimeError(f"{len(self.layer_losses)} of {self.num_layers} served layers were added.")
        value = torch.stack(self.layer_losses).mean()
        return _PrecomputedGradient.apply(value, *self.index_tensors, *self.grads)


def _check_pool_size(pool_size: int, sharded: bool = False) -> None:
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"pool_size must be a positive integer, got {pool_size!r}.")
    if pool_size > 1 and sharded:
        raise ValueError("A pooled indexer's KL does not take a shard of the query rows (total_rows=).")


def _accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale, topk_indices,
                grad_scale, d_q, d_k, d_w, backend, teacher_lse=None, query_position=0,
                pool_size: int = 1) -> torch.Tensor:
    use_triton = backend == "triton"
    if topk_indices is None:
        return dense_kl_accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale,
                                   grad_scale, d_q, d_k, d_w, use_triton=use_triton, query_start=query_position,
                                   kpool=pool_size)
    return sparse_kl_accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale,
                                topk_indices, grad_scale, d_q, d_k, d_w, use_triton=use_triton,
                                teacher_lse=teacher_lse)


def indexer_kl_loss(index_q, index_k, index_weights, teacher_q, teacher_k, teacher_scale: float, *,
                    topk_indices=None, backend: str | None = None, pool_size: int = 1) -> torch.Tensor:
    """mean over the B*L query rows of KL(p_bar || softmax(I)), with gradients for the three index tensors.

    index_q [B, L, Hi, Di], index_k [B, L, Di], index_weights [B, L, Hi]: the indexer, its scales folded in.
    teacher_q [G, B, H, L, D], teacher_k [G, B, Hk, L, D]: the served layers' attention (H % Hk == 0), each
    head's probabilities softmax(teacher_scale * q . k) over s <= t, or over `topk_indices` [B, L, k] in
    sparse mode (-1 marks an empty slot). p_bar averages them over layers and heads. The teacher gets no
    gradient. fp32 or bf16 inputs; nothing of size L x L is stored. `pool_size` > 1: a pooled indexer, as in
    `IndexerKLLoss`.
    """
    _check_index_tensors(index_q, index_k, index_weights)
    _check_teacher(index_q, teacher_q, teacher_k)
    _check_pool_size(pool_size)
    batch, seq_len = index_q.shape[:2]
    if topk_indices is not None:
        check_topk_indices(topk_indices, batch, seq_len)
        topk_indices = pool_candidates(topk_indices, pool_size) if pool_size > 1 else topk_indices
    backend = pick_backend(index_q.device, backend)
    index_tensors = (index_q, index_k, index_weights)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in index_tensors]
    with torch.no_grad():
        total = _accumulate(*(t.detach() for t in index_tensors), teacher_q.detach(), teacher_k.detach(),
                            teacher_scale, topk_indices, 1.0 / (batch * seq_len), *grads, backend,
                            pool_size=pool_size)
    return _PrecomputedGradient.apply(total / (batch * seq_len), *index_tensors, *grads)
