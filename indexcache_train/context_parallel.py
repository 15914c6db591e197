"""Context parallelism for the frozen sparse forward: the ranks of a CP group split one sequence.

A sequence of L tokens is cut into 2N contiguous chunks for the N ranks of a group, and rank r holds chunks
r and 2N-1-r (zig-zag), so that every rank's queries see about the same number of causal keys: a chunk near
the start, cheap, with its mirror near the end, dear. Each rank runs the model on its own tokens with their
own `position_ids`, so RoPE is that of the one-rank run; every token-wise part (norms, projections, MLP/MoE)
is unchanged. Only the layers that mix tokens change, on the sparse forward (`sparse_forward.py`):

- the attention all-gathers the MLA latent key [c_s, k_rope] (kv_lora + rope per token) of the group into
  sequence order, and each local chunk's queries run the sparse MLA kernel at their global offset
  (`query_start`), so the causal limits are the one-rank ones;
- the indexer all-gathers its keys the same way and ranks each local chunk's queries against all L keys;
  the top-k holds global positions;
- the distillation (`IndexerDistillation(..., context_parallel=)`) gathers the indexer keys it recomputes
  with gradients through `gather_sequence`, whose backward sums the keys' gradients over the group and hands
  each rank those of its own tokens; the KL of the local query rows runs against the global keys and is
  divided by the whole sequence's row count, so that the sum of the ranks' losses (and of their indexer
  gradients) is the one-rank loss (and gradients). In the sparse stage the top-k holds global positions; in
  the dense stage each of a rank's two chunks goes to the dense KL kernels as a block of query rows at its
  offset in the sequence (`query_start`), whose causal limit is s <= offset + t. The teacher's keys (the
  gathered latent, or the per-head keys expanded from it) are already the whole sequence's.
- the sampled recall (`recall_rows`) of the last rows of the sequence: those rows live in the last chunks
  (rank 0's second chunk, then rank 1's, ...); each rank takes the sampled rows it holds and divides by the
  count of all of them. Metrics are summed over the group, so every rank reports the one-rank values.

Both stages and both teacher forms run on the sparse forward; transformers' native path and a KV cache do
not support it.

In a run (`context_parallel_size` in the train, eval and search configs), `parallel_groups` cuts the world into
CP groups of consecutive ranks; the groups are the data-parallel replicas, and every rank of one reads the
same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


def zigzag_ranges(seq_len: int, size: int) -> list[list[tuple[int, int]]]:
    """For each of `size` ranks, its [start, end) token ranges: 2 * size near-equal contiguous chunks, rank r
    taking chunks r and 2 * size - 1 - r. Needs seq_len >= 2 * size, so that no chunk is empty."""
    if size < 1:
        raise ValueError(f"The context-parallel size must be >= 1; got {size}.")
    chunks = 2 * size
    if seq_len < chunks:
        raise ValueError(f"Context parallelism over {size} ranks cuts a sequence into {chunks} chunks; "
                         f"L = {seq_len} is shorter.")
    bounds = [seq_len * i // chunks for i in range(chunks + 1)]
    return [[(bounds[r], bounds[r + 1]), (bounds[chunks - 1 - r], bounds[chunks - r])] for r in range(size)]


@dataclass(frozen=True)
class Segment:
    """A contiguous run of a rank's local tokens: local rows local_start .. local_start + length - 1 are the
    sequence's positions global_start .. global_start + length - 1."""

    local_start: int
    global_start: int
    length: int


class SequenceLayout:
    """Where one sequence of `seq_len` tokens lives on the ranks of a CP group (zig-zag)."""

    def __init__(self, seq_len: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len = seq_len
        self.ranges = zigzag_ranges(seq_len, self.size)
        self.lengths = [sum(end - start for start, end in ranges) for ranges in self.ranges]
        self.max_length = max(self.lengths)
        self.segments: list[Segment] = []
        offset = 0
        for start, end in self.ranges[self.rank]:
            self.segments.append(Segment(offset, start, end - start))
            offset += end - start
        # order[p] = where position p sits in the ranks' padded local blocks, concatenated.
        order = torch.empty(seq_len, dtype=torch.long)
        for rank, ranges in enumerate(self.ranges):
            positions = torch.cat([torch.arange(start, end) for start, end in ranges])
            order[positions] = rank * self.max_length + torch.arange(len(positions))
        self.order = order

    @property
    def local_length(self) -> int:
        return self.lengths[self.rank]

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's token positions in the sequence, [local_length] int64."""
        return torch.cat([torch.arange(start, end, device=device) for start, end in self.ranges[self.rank]])

    def shard(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (the sequence along `dim`)."""
        return tokens.index_select(dim, self.positions(tokens.device))

    def model_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """A transformers forward's `input_ids` and `position_ids` for this rank's tokens of `input_ids` [B, L]:
        at their positions in the sequence, so that RoPE is the one-rank run's."""
        positions = self.positions(input_ids.device).expand(input_ids.shape[0], -1)
        return {"input_ids": self.shard(input_ids), "position_ids": positions}


def gather_sequence(local: torch.Tensor, layout: SequenceLayout, dim: int = 1) -> torch.Tensor:
    """The whole sequence, in order, from every rank's local tokens along `dim`. Differentiable: the gradient
    of the result is summed over the group and each rank gets that of its own tokens."""
    dim = dim % local.dim()
    moved = local.movedim(dim, 0)
    pad = layout.max_length - moved.shape[0]
    if pad:
        moved = torch.cat([moved, moved.new_zeros(pad, *moved.shape[1:])])
    gathered = _GatherPadded.apply(moved.contiguous(), layout.group)  # [size * max_length, ...]
    return gathered.index_select(0, layout.order.to(gathered.device)).movedim(0, dim)


class _GatherPadded(torch.autograd.Function):
    """All-gather of equal-sized blocks along dim 0; the backward is a reduce-scatter (all-reduce, then this
    rank's block, on backends without reduce-scatter such as gloo)."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(block) for _ in range(size)]
        dist.all_gather(parts, block, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        rows = grad.shape[0] // size
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = grad.new_empty(rows, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        return grad[rank * rows:(rank + 1) * rows].clone(), None


class ContextParallel:
    """A CP group (default: the whole world). `activate(seq_len)` lays a sequence out over it and, within the
    block, makes the sparse forward's attention and indexers gather their keys over the group."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Context parallelism needs torch.distributed to be initialised.")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @contextmanager
    def activate(self, seq_len: int) -> Iterator[SequenceLayout]:
        global _active
        if _active is not None:
            raise RuntimeError("A context-parallel layout is already active.")
        _active = SequenceLayout(seq_len, self.group)
        try:
            yield _active
        finally:
            _active = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group of a tensor (no gradient), as a new tensor."""
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor


_active: SequenceLayout | None = None


def active_layout() -> SequenceLayout | None:
    """The layout of the sequence now running context-parallel, or None."""
    return _active


@dataclass(frozen=True)
class ParallelGroups:
    """How a run's ranks divide: CP groups of consecutive ranks, which are the `data_size` data-parallel
    replicas; this rank is in replica `data_rank`, and `context_parallel` is its group (None without CP)."""

    context_parallel: ContextParallel | None
    data_rank: int
    data_size: int


def check_context_parallel_size(size: int, world_size: int, seq_len: int) -> None:
    """The errors a `context_parallel_size` can meet before any model loads."""
    if size < 1:
        raise ValueError(f"context_parallel_size={size} is invalid: it must be at least 1.")
    if world_size % size:
        raise ValueError(f"context_parallel_size={size} does not divide the world size {world_size}: launch a "
                         "multiple of it ranks.")
    if size > 1 and seq_len < 2 * size:
        raise ValueError(f"context_parallel_size={size} cuts each sequence into {2 * size} zig-zag chunks; "
                         f"data.seq_len={seq_len} is shorter.")


def parallel_groups(size: int) -> ParallelGroups:
    """The CP groups of `size` consecutive ranks (every rank must call it: creating a group is collective)."""
    if size == 1:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return ParallelGroups(None, rank, world_size)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world_size % size:
        raise ValueError(f"context_parallel_size={size} does not divide the world size {world_size}.")
    own = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            own = group
    return ParallelGroups(ContextParallel(own), rank // size, world_size // size)


def cli_context_parallel(size: int, seq_len: int, module: str) -> ContextParallel | None:
    """The CP group of a CLI `module` that runs one group (eval, search): None at size 1, else the whole
    world of a launcher's `size` ranks (NCCL on GPU, gloo on CPU; no DeepSpeed)."""
    if size == 1:
        return None
    launch = f"launch it on {size} ranks: torchrun --nproc_per_node {size} -m {module} ..."
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(f"context_parallel_size={size} splits each sequence over {size} ranks; {launch}")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world_size = dist.get_world_size()
    check_context_parallel_size(size, world_size, seq_len)
    if world_size != size:
        raise ValueError(f"{module} runs one context-parallel group, but {world_size} ranks were launched; "
                         f"{launch}")
    return ContextParallel()
