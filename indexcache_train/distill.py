"""The distillation step: one frozen forward, gradients born inside it.

The base model is frozen and each F layer's indexer reads detached inputs, so no backward pass ever goes
through the transformer. During a single no-grad forward:

1. an F layer's indexer runs natively and picks the top-k that its whole group attends to; a hook then
   recomputes the indexer's q, k and weights with gradients (the only graph of the step) and opens an
   `IndexerKLLoss` for the group;
2. as each layer of the group runs its attention, the attention tap hands its query and key states to the
   group's KL, which computes that layer's loss term and index gradients in one kernel pass; the teacher
   tensors are then free to go;
3. once the group's last layer has been added, the stored index gradients go back through the indexer's
   projections (`finish_group`) and the group's state is freed, so one group's state is alive at a time;
4. the loss is the sum over F layers of their groups' mean KL, and its backward only hands each indexer the
   parameter gradients already computed, scaled. DeepSpeed's `engine.backward` sees an ordinary loss.

Each F indexer's loss is the mean KL over its group, the layers it serves (the paper's multi-layer loss);
`cross_layer=False` keeps its own layer's term only, the paper's "w/o cross-layer loss" ablation, with the
model still running the pattern (the S layers attend through their F layer's top-k).

Stages: `dense` distils the full causal attention of each served layer; `sparse` distils the attention
renormalised over the F layer's top-k, the set every layer of the group actually attends to. In the sparse
stage the MLA teacher goes to the kernel in its absorbed form (`teacher.py`); on the sparse forward
(`sparse_forward.py`) it is folded and consumed in blocks of query rows, so that at 200K tokens the absorbed
query [B, H, L, kv_lora + rope] never exists whole.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .adapters import apply_indexcache, current_pattern, get_adapter
from .capture import AttentionCall, attention_taps, visible_candidates
from .context_parallel import ContextParallel, Segment, SequenceLayout, gather_sequence
from .kernels import CompressedIndexerKL, IndexerKLLoss
from .metrics import valid_selection
from .pattern import IndexCachePattern
from .runtime import zero3_gathered
from .sparse_forward import uses_sparse_forward
from .teacher import TEACHER_FORMS, AbsorbedTeacher, expanded_key

STAGES = ("dense", "sparse")
# Query rows per block of the absorbed teacher on the sparse forward (the sparse KL takes rows in blocks).
TEACHER_BLOCK_ROWS = 16384


class _GradientsReady(torch.autograd.Function):
    """A group's loss whose indexer gradients were computed in the forward: its backward hands them to the
    indexer's parameters, scaled by the incoming gradient (DeepSpeed's 1 / accumulation steps)."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *[None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads])


def causal_topk(topk_indices: torch.Tensor) -> torch.Tensor:
    """transformers pads rows shorter than k with indices > t; the kernels want -1 there."""
    return torch.where(valid_selection(topk_indices), topk_indices, -1).to(torch.int32)


def indexer_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, tuple | None, torch.Tensor | None]:
    """(hidden_states, q_resid, position_embeddings, attention_mask) of an indexer call: positional for GLM-5 and
    DeepSeek-V3.2, by keyword for Glm5Next (NoPE: no position embeddings)."""
    named = dict(zip(("hidden_states", "q_resid", "position_embeddings", "attention_mask"), args)) | kwargs
    return named["hidden_states"], named["q_resid"], named.get("position_embeddings"), named.get("attention_mask")


def sampled_recall(call: AttentionCall, selection: torch.Tensor, rows: int,
                   layout: SequenceLayout | None = None) -> torch.Tensor:
    """Attention-mass recall of `selection` on the last `rows` queries (those with the most candidates), from
    the dense probabilities of those rows only, so that the metric stays cheap at long context. Candidates are
    the keys, or on DeepSeek-V4 the compressed entries (`call.compress_rate`). Context parallel, a rank takes
    the sampled rows it holds (zig-zag: the last chunks are the first ranks' second ones) and divides by the
    count of all of them, so that the group's sum is the one-rank mean."""
    device = call.query.device
    if layout is None:
        seq_len = call.query.shape[2]
        positions = torch.arange(seq_len, device=device)
    else:
        seq_len, positions = layout.seq_len, layout.positions(device)
    first = max(seq_len - rows, call.compress_rate - 1)  # the first m - 1 queries see no entry yet
    sampled = (positions >= first).nonzero().squeeze(1)  # local rows
    count = selection.shape[0] * (seq_len - first)
    if sampled.numel() == 0:
        return torch.zeros((), device=device)
    queries = positions[sampled]
    query, key = call.score_operands(sampled)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * call.scaling
    visible = visible_candidates(len(queries), key.shape[2], call.compress_rate, queries=queries)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).mean(dim=1)  # [B, rows, T]
    chosen = selection[:, sampled].long()
    limit = torch.div(queries + 1, call.compress_rate, rounding_mode="floor")
    valid = (chosen >= 0) & (chosen < limit[None, :, None])
    return (probs.gather(-1, chosen.clamp_min(0)) * valid).sum() / count


class IndexerDistillation(nn.Module):
    """Wraps a transformers DSA model for distillation; `forward(input_ids)` returns the loss and metrics.

    It is the module DeepSpeed wraps: its parameters are the model's, of which only the F-layer indexers
    train (`freeze()` sets that up and checks it).
    """

    def __init__(self, model: nn.Module, pattern: IndexCachePattern | str | float, *, stage: str = "dense",
                 kl_backend: str | None = None, recall_rows: int = 64, teacher_form: str = "auto",
                 cross_layer: bool = True, context_parallel: ContextParallel | None = None):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"Unknown distillation stage {stage!r}; choose from {STAGES}.")
        if teacher_form not in TEACHER_FORMS:
            raise ValueError(f"Unknown teacher form {teacher_form!r}; choose from {TEACHER_FORMS}.")
        if context_parallel is not None and context_parallel.size > 1:
            if not uses_sparse_forward(model):
                raise ValueError("Context parallelism runs on the sparse forward (use_sparse_forward), whose "
                                 "attention and indexers gather their keys over the group.")
        else:
            context_parallel = None
        self.context_parallel = context_parallel
        self.model = apply_indexcache(model, pattern)
        self.adapter = get_adapter(model)
        self.pattern = current_pattern(model)
        self.stage, self.kl_backend, self.recall_rows = stage, kl_backend, recall_rows
        self.teacher_form = teacher_form
        self.cross_layer = cross_layer

    @property
    def absorbed(self) -> bool:
        """The MLA absorbed form for the sparse stage (one gather serves every head), unless told otherwise;
        the expanded form for the dense stage, whose keys are contiguous and where FLOPs count more. A family
        without MLA (DeepSeek-V4: one shared key head already) has only its own form."""
        if self.teacher_form == "auto" and not self.adapter.mla:
            return False
        return self.teacher_form == "absorbed" or (self.teacher_form == "auto" and self.stage == "sparse")

    def add_teacher(self, kl: IndexerKLLoss, call: AttentionCall, native_absorbed: AbsorbedTeacher | None,
                    layout: SequenceLayout | None = None):
        """Hand one served layer's attention to its group's KL in the chosen teacher form; its mean KL."""
        if call.compress_rate > 1:  # DeepSeek-V4's CSA: the query against the layer's compressed entries
            return kl.add_layer(call.query, call.key, call.scaling)
        if not call.latent:  # transformers' native forward: expanded keys, the latent recorded by hooks
            query, key = native_absorbed(call) if native_absorbed else (call.query, call.key)
            return kl.add_layer(query, key, call.scaling)
        if self.stage == "sparse" and self.absorbed:  # blocks of rows: the top-k holds their keys' positions
            for start in range(0, call.query.shape[2], TEACHER_BLOCK_ROWS):
                rows = slice(start, start + TEACHER_BLOCK_ROWS)
                query, key = call.score_operands(rows)
                layer_loss = kl.add_layer(query, key, call.scaling, query_start=start,
                                          teacher_lse=call.lse[:, :, rows])
                del query  # before the next block is folded: one block alive, not two
            return layer_loss
        # Each run of positions whole, against all keys from its position: the sequence on one rank, the two
        # zig-zag chunks under context parallelism (the latent key is the gathered one).
        key = call.key if self.absorbed else expanded_key(call.module, call.key)
        segments = [Segment(0, 0, call.query.shape[2])] if layout is None else layout.segments
        for segment in segments:
            rows = slice(segment.local_start, segment.local_start + segment.length)
            query = call.score_operands(rows)[0] if self.absorbed else call.query[:, :, rows]
            layer_loss = kl.add_layer(query, key, call.scaling, query_start=segment.local_start,
                                      query_position=segment.global_start)
        return layer_loss

    @property
    def indexers(self) -> dict[int, nn.Module]:
        return {layer: self.adapter.indexer(self.model, layer) for layer in self.pattern.full_layers}

    def freeze(self) -> dict[str, int]:
        """Freeze everything but the F-layer indexers; return the parameter counts."""
        self.model.requires_grad_(False)
        for indexer in self.indexers.values():
            indexer.requires_grad_(True)
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        expected = {id(p) for indexer in self.indexers.values() for p in indexer.parameters()}
        assert trainable == expected, "only the F-layer indexers may train"
        counts = {"trainable": 0, "frozen": 0}
        for p in self.parameters():
            counts["trainable" if p.requires_grad else "frozen"] += _numel(p)
        return counts

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and metrics of a batch of sequences. Context parallel, every rank of the group passes the
        whole `input_ids` and runs its zig-zag share of each sequence: the loss returned is this rank's
        share (the group's shares and their gradients sum to the one-rank loss and gradients); the metrics
        are the whole sequence's, summed over the group."""
        if self.context_parallel is None:
            return self._forward(input_ids, None)
        with self.context_parallel.activate(input_ids.shape[1]) as layout:
            loss, metrics = self._forward(input_ids, layout)
        return loss, {name: self.context_parallel.all_reduce_sum(value) for name, value in metrics.items()}

    def _forward(self, input_ids: torch.Tensor, layout: SequenceLayout | None):
        groups: dict[int, IndexerKLLoss] = {}
        selections: dict[int, torch.Tensor] = {}  # F layer -> its top-k as the indexer returned it
        position_of = {id(indexer): layer for layer, indexer in self.indexers.items()}  # pattern positions
        metrics: dict[str, torch.Tensor] = {}
        sparse = self.stage == "sparse"
        wants_grad = torch.is_grad_enabled()  # an evaluation under no_grad builds no graph

        def open_group(indexer: nn.Module, args, kwargs, output: torch.Tensor) -> None:
            hidden_states, q_resid, position_embeddings, mask = indexer_inputs(args, kwargs)
            # A pooled indexer (Glm5Next) scores pools of `index_kpool` keys; its KL runs over them (pooled.py).
            pool_size = getattr(indexer, "index_kpool", 1)
            if pool_size > 1 and mask is not None and mask.dim() == 2 and not bool(mask.all()):
                raise ValueError("Pooled indexers are distilled on unpadded sequences (pools count from token 0).")
            layer = position_of[id(indexer)]
            selections[layer] = output
            # The indexer's own parameters (Glm5Next's pool compression, DeepSeek-V4's position bias) are read
            # here, outside its forward: no ZeRO-3 hook gathers them, unlike its submodules'.
            with torch.set_grad_enabled(wants_grad), zero3_gathered(indexer.parameters(recurse=False)):
                projections = self.adapter.indexer_projections(indexer, hidden_states.detach(), q_resid.detach(),
                                                               position_embeddings)
                rate = self.adapter.compress_rate(self.model, layer)
                if rate > 1:  # candidates are compressed entries; the indexer marks unseen ones -1
                    groups[layer] = CompressedIndexerKL(
                        projections.query, projections.key, projections.weights, compress_rate=rate,
                        num_layers=self.group_size(layer), backend=self.kl_backend,
                        topk_indices=output.to(torch.int32) if sparse else None, check_indices=False)
                    return
                if layout is None:
                    key, topk, total_rows = projections.key, causal_topk(output) if sparse else None, None
                else:
                    # The group's keys, whose gradients go back to their ranks; the fused indexer's top-k
                    # holds global positions, -1 in its empty slots.
                    key = gather_sequence(projections.key, layout)
                    topk, total_rows = output.to(torch.int32) if sparse else None, key.shape[0] * key.shape[1]
            groups[layer] = IndexerKLLoss(
                projections.query, key, projections.weights,
                num_layers=self.group_size(layer),
                topk_indices=topk, backend=self.kl_backend,
                check_indices=False,  # causal_topk leaves only keys s <= t, or -1
                total_rows=total_rows, pool_size=pool_size,
            )

        native_absorbed = None
        if self.absorbed and not uses_sparse_forward(self.model):
            native_absorbed = AbsorbedTeacher([self.adapter.attention(self.model, layer)
                                               for layer in range(self.adapter.num_layers(self.model))])

        # A group is finished once its F layer and every layer it serves have been added: its indexer's
        # gradients are then computed and its state (q/k/w, their fp32 accumulators, the projections' saved
        # inputs) freed, so that one group's state is alive at a time, not every F layer's until the end.
        unseen = {layer: self.group_size(layer) for layer in self.pattern.groups}
        finished: dict[int, tuple[torch.Tensor, tuple, list[nn.Parameter]]] = {}

        def add_layer(call: AttentionCall) -> None:
            source = self.pattern.source_layer(call.layer)
            if self.recall_rows:  # Glm5Next folds its selection into the mask: take its F layer's top-k
                selection = call.topk_indices if call.topk_indices is not None else selections[source]
                metrics[f"recall/layer{call.layer}"] = sampled_recall(call, selection, self.recall_rows, layout)
            if not (self.cross_layer or call.layer == source):
                return
            metrics[f"kl/layer{call.layer}"] = self.add_teacher(groups[source], call, native_absorbed, layout)
            unseen[source] -= 1
            if unseen[source] == 0 and wants_grad:
                finished[source] = self.finish_group(source, groups.pop(source))

        hooks = [indexer.register_forward_hook(open_group, with_kwargs=True) for indexer in self.indexers.values()]
        try:
            with torch.no_grad(), attention_taps(self.model, add_layer), native_absorbed or contextlib.nullcontext():
                # The inner model runs every layer; the LM head's logits are not needed.
                inner = getattr(self.model, "model", self.model)
                if layout is None:
                    inner(input_ids=input_ids, use_cache=False)
                else:  # this rank's tokens at their own positions, so that RoPE is the one-rank run's
                    positions = layout.positions(input_ids.device)
                    inner(input_ids=layout.shard(input_ids), position_ids=positions.expand(input_ids.shape[0], -1),
                          use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        group_losses = {layer: kl.loss() for layer, kl in groups.items()}  # under no_grad: nothing to free early
        for layer, (value, grads, params) in finished.items():
            # Whole from here to the optimizer step: the loss's backward hands them whole-shaped gradients
            with zero3_gathered(params, until_step=True):
                group_losses[layer] = _GradientsReady.apply(value, grads, *params)
        for layer, loss in sorted(group_losses.items()):
            metrics[f"kl_group/layer{layer}"] = loss.detach()
        return torch.stack([loss for _, loss in sorted(group_losses.items())]).sum(), metrics

    def group_size(self, layer: int) -> int:
        """The layers whose attention F layer `layer`'s indexer is distilled against: its group (the paper's
        multi-layer loss), or itself only without the cross-layer loss."""
        return 1 + len(self.pattern.groups[layer]) if self.cross_layer else 1

    def finish_group(self, layer: int, kl: IndexerKLLoss) -> tuple[torch.Tensor, tuple, list[nn.Parameter]]:
        """The group's loss value and its F indexer's parameter gradients, through the projections' graph,
        which is freed with the group's KL state."""
        params = [p for p in self.indexers[layer].parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = kl.loss()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), grads, params


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions leave p.numel() == 0
