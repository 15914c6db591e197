"""Pattern search primitives: choose the F layers of an IndexCache pattern without training.

Greedy search: start all-F; at each step, score switching every remaining F layer (never layer 0) to S by
the mean LM loss on a fixed calibration set, keep the best switch, and repeat until the target number of F
layers is left. The patterns of successive steps nest, so one run to 1/8 also gives the 1/4 and 1/2 patterns.

Plain greedy costs about N²/2 full forward passes. Two things make it cheaper:

- **Prefix cache.** Switching layer i to S changes nothing below layer i. Candidates are scored in layer
  order while one forward of the current pattern walks up the stack; at layer i the candidate's forward forks
  from the cached hidden state (and the top-k layer i would now share) and only runs layers i..N-1. Between
  steps only the state below the first candidate is kept: no later step changes anything beneath it.
- **Blocks** (`search.block_size`): the layers are split into blocks searched independently (the others
  all-F), each keeping its share of F layers; fewer candidates per step, and no walk below the block.

With a `ContextParallel` group, each sequence is split over its ranks (`context_parallel.py`): every rank
holds its zig-zag share of each cached hidden state, runs the layers on the sparse forward at its tokens'
positions, and the losses are the one-rank ones (`metrics.sharded_nll`).

The cost is counted in decoder-layer forwards (per calibration batch) and compared with plain greedy's full
passes in `search.json`. The CLI around these is `indexcache_train.search` (`indexcache-search`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .adapters import SharedTopK, apply_indexcache, get_adapter
from .capture import capture_topk
from .context_parallel import ContextParallel, SequenceLayout
from .files import write_text_atomically
from .metrics import lm_loss, sharded_nll
from .modeling import check_seq_len, text_config
from .pattern import PAPER_OFFSET, IndexCachePattern
from .runtime import rank
from .sparse_forward import SPARSE_ATTENTION, uses_sparse_forward


# ---------------------------------------------------------------------------------------------- decoder stack
@dataclass
class StackInputs:
    """What the model's forward builds once before its decoder layers, as it builds it."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict | None
    attention_mask: torch.Tensor


@dataclass
class LayerState:
    """One batch's residual stream entering pattern position `layer` (the decoder layers from the one after
    the previous position's), with the top-k the position below used: what `layer` reuses if it is S."""

    layer: int
    hidden: torch.Tensor
    prev_topk: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # DeepSeek-V4's hash-routed MoE layers read the token ids
    seq_len: int | None = None  # the sequences' length (context parallel, `hidden` holds this rank's share)


class DecoderStack:
    """Runs a transformers DSA model's own decoder layers over any range of pattern positions, so a forward can
    restart from a cached `LayerState`. Rotary embeddings and the causal mask come from the model's own
    modules, made as its forward makes them; `layer_forwards` counts the positions run (decoder-layer calls,
    where the pattern covers every decoder layer). Where it covers some only (DeepSeek-V4's CSA layers),
    position j runs the decoder layers from the j-th pattern layer up to the next one (position 0 from the
    first decoder layer). With `context_parallel`, the states hold this rank's tokens (see the module
    docstring)."""

    def __init__(self, model: torch.nn.Module, context_parallel: ContextParallel | None = None):
        if context_parallel is not None and not uses_sparse_forward(model):
            raise ValueError(f"context_parallel_size={context_parallel.size} needs the sparse forward: set "
                             f"model.attn_implementation={SPARSE_ATTENTION}.")
        self.model = model
        self.context_parallel = context_parallel
        self.adapter = get_adapter(model)
        self.decoder = self.adapter.decoder(model)
        self.num_layers = self.adapter.num_layers(model)
        layers = self.adapter.layers(model)
        index = {id(layer.self_attn): i for i, layer in enumerate(layers)}
        pattern_layers = [index[id(self.adapter.attention(model, j))] for j in range(self.num_layers)]
        self.position_of = {layer: j for j, layer in enumerate(pattern_layers)}
        self.starts = [0] + pattern_layers[1:] + [len(layers)]
        # GlmMoeDsa hands each layer's top-k to the next as an argument; DeepseekV32's S layers read a relay.
        self.passes_topk = "prev_topk_indices" in inspect.signature(layers[0].forward).parameters
        # DeepSeek-V4 and Glm5Next keep hc_mult residual streams (mHC), collapsed by `hc_head` before the norm.
        self.hyper_connections = getattr(self.decoder, "hc_head", None) is not None
        # Glm5Next is NoPE: its forward builds no rotary embeddings and no causal mask (see `inputs`).
        self.rotary = getattr(self.decoder, "rotary_emb", None)
        self.layer_forwards = 0

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> LayerState:
        seq_len = input_ids.shape[1]
        if self.context_parallel is not None:
            input_ids = SequenceLayout(seq_len, self.context_parallel.group).shard(input_ids)
        hidden = self.decoder.embed_tokens(input_ids)
        if self.hyper_connections:
            hidden = hidden.unsqueeze(2).expand(-1, -1, text_config(self.model.config).hc_mult, -1).contiguous()
        return LayerState(0, hidden, input_ids=input_ids, seq_len=seq_len)

    def sequence(self, seq_len: int):
        """The context in which this rank runs its share of sequences of `seq_len` tokens; yields the layout
        (None without context parallelism)."""
        if self.context_parallel is None:
            return contextlib.nullcontext()
        return self.context_parallel.activate(seq_len)

    def inputs(self, hidden: torch.Tensor, layout: SequenceLayout | None = None) -> StackInputs:
        """Position ids, rotary embeddings and the causal mask for a batch (any layer's hidden state gives the
        shape, dtype and device they need). Rebuilt on demand: the [B, 1, L, L] mask is too big to cache."""
        if layout is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        else:
            position_ids = layout.positions(hidden.device).unsqueeze(0)
        if self.rotary is None:
            # Glm5NextTextModel.forward hands every layer the [B, L] padding mask, all True without padding
            # (causality is the layers' own), and position_embeddings=None.
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            return StackInputs(position_ids, None, mask)
        if self.hyper_connections:
            embeds = hidden[:, :, 0]
            mask = create_sliding_window_causal_mask(config=self.model.config, inputs_embeds=embeds,
                                                     attention_mask=None, cache=None, position_ids=position_ids)
            rotary = {kind: self.decoder.rotary_emb(embeds, position_ids=position_ids, layer_type=kind)
                      for kind in ("main", "compress")}
            return StackInputs(position_ids, rotary, mask)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids, allow_is_causal_skip=False)
        return StackInputs(position_ids, self.decoder.rotary_emb(hidden, position_ids=position_ids), mask)

    @torch.no_grad()
    def run(self, state: LayerState, stop: int) -> LayerState:
        """Run pattern positions state.layer .. stop-1 with the model's current pattern."""
        if state.layer == stop:
            return state
        self._share_into(state.layer, state.prev_topk)
        hidden, topk = state.hidden, state.prev_topk
        layers = self.adapter.layers(self.model)
        with self.sequence(state.seq_len) as layout, capture_topk(self.model) as selected:
            inputs = self.inputs(state.hidden, layout)
            extra = {"input_ids": state.input_ids} if self.hyper_connections else {}
            for layer in range(self.starts[state.layer], self.starts[stop]):
                if self.passes_topk:
                    extra = {"prev_topk_indices": topk}
                output = layers[layer](hidden, attention_mask=inputs.attention_mask,
                                       position_embeddings=inputs.position_embeddings,
                                       position_ids=inputs.position_ids, **extra)
                hidden = output[0] if isinstance(output, tuple) else output
                if layer in self.position_of:
                    topk = selected[self.position_of[layer]]
        self.layer_forwards += stop - state.layer
        return LayerState(stop, hidden, topk, state.input_ids, state.seq_len)

    @torch.no_grad()
    def loss(self, state: LayerState, labels: torch.Tensor) -> float:
        """The LM loss from the last layer's output, through the model's final norm, head and loss function."""
        if state.layer != self.num_layers:
            raise ValueError(f"The loss needs the output of the last layer, got the state entering {state.layer}.")
        hidden = self.decoder.hc_head(state.hidden) if self.hyper_connections else state.hidden
        logits = self.model.lm_head(self.decoder.norm(hidden))
        if self.context_parallel is not None:
            with self.sequence(state.seq_len) as layout:
                total = sharded_nll(logits, labels, layout, self.context_parallel)
            return total / labels[:, 1:].numel()
        return self.model.loss_function(logits=logits, labels=labels,
                                        vocab_size=text_config(self.model.config).vocab_size).float().item()

    def _share_into(self, layer: int, prev_topk: torch.Tensor | None) -> None:
        """A forward that starts at an S layer of DeepseekV32 or DeepSeek-V4 never ran its F layer: seed the
        relay its `SharedTopK` reads with the top-k the layer below used (the F layer's)."""
        if layer == self.num_layers:
            return
        indexer = self.adapter.indexer_owner(self.model, layer).indexer
        if isinstance(indexer, SharedTopK):
            indexer.relay.layer, indexer.relay.indices = indexer.source_layer, prev_topk


# ---------------------------------------------------------------------------------------------- greedy search
@dataclass
class Step:
    block: int
    layer: int  # switched from F to S at this step
    pattern: str
    num_full: int
    loss: float  # mean calibration loss of `pattern` (block-wise: with every other block all-F)
    candidates: dict[str, float]  # layer -> loss of switching it


@dataclass
class SearchState:
    """Everything `search.json` holds while the search runs; enough to resume it after a kill."""

    num_layers: int
    blocks: list[list[int]]
    quotas: list[int]  # F layers each block keeps
    calibration: dict
    all_full_loss: float
    steps: list[Step] = field(default_factory=list)
    layer_forwards: int = 0
    candidate_evaluations: int = 0
    done: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> SearchState:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        return cls(**{**fields, "steps": [Step(**s) for s in data["steps"]]})

    def same_search(self, other: SearchState) -> bool:
        keys = ("num_layers", "blocks", "quotas", "calibration")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def block_steps(self, block: int) -> list[Step]:
        return [s for s in self.steps if s.block == block]

    def block_pattern(self, block: int) -> IndexCachePattern:
        """All-F but for the switches made so far in `block`."""
        layers = ["F"] * self.num_layers
        for step in self.block_steps(block):
            layers[step.layer] = "S"
        return IndexCachePattern("".join(layers))


def split_blocks(num_layers: int, block_size: int | None) -> list[list[int]]:
    size = block_size or num_layers
    if size < 1:
        raise ValueError(f"search.block_size must be positive, got {block_size}.")
    return [list(range(start, min(start + size, num_layers))) for start in range(0, num_layers, size)]


def block_quotas(blocks: list[list[int]], num_layers: int, num_full: int | None, ratio: float | None) -> list[int]:
    """F layers each block keeps. One block: exactly `num_full` (or round(ratio * N)); several: round(ratio *
    block size), at least one in the block holding layer 0. Neither target: one F layer in all."""
    if num_full is None and ratio is None:
        num_full = 1
    if num_full is not None and not 1 <= num_full <= num_layers:
        raise ValueError(f"search.num_full must be in [1, {num_layers}], got {num_full}.")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"search.ratio must be in (0, 1], got {ratio}.")
    if len(blocks) == 1:
        return [num_full if num_full is not None else max(1, math.floor(ratio * num_layers + 0.5))]
    ratio = ratio if num_full is None else num_full / num_layers
    return [max(int(b == 0), math.floor(ratio * len(block) + 0.5)) for b, block in enumerate(blocks)]


def score_candidates(stack: DecoderStack, batches: list[torch.Tensor], pattern: IndexCachePattern,
                     candidates: list[int], anchor: list[LayerState],
                     desc: str) -> tuple[dict[int, float], list[LayerState]]:
    """Mean loss of `pattern` with each candidate switched to S, forking each candidate's forward from the
    walk of `pattern` at the candidate's layer. `anchor` holds every batch's state at or below the first
    candidate; returns the losses and the states at the first candidate, the anchor of the next step."""
    states, next_anchor, losses = anchor, None, {}
    for layer in tqdm(sorted(candidates), desc=desc, leave=False):
        apply_indexcache(stack.model, pattern)
        states = [stack.run(state, layer) for state in states]
        next_anchor = next_anchor or states
        apply_indexcache(stack.model, pattern.with_shared(layer))
        batch_losses = [stack.loss(stack.run(state, stack.num_layers), ids) for state, ids in zip(states, batches)]
        losses[layer] = sum(batch_losses) / len(batch_losses)
    return losses, next_anchor


def greedy_search(model: torch.nn.Module, batches: list[torch.Tensor], *, num_full: int | None = None,
                  ratio: float | None = None, block_size: int | None = None, state_path: str | Path | None = None,
                  resume: bool = True, context_parallel: ContextParallel | None = None) -> SearchState:
    """Greedy F→S switches (per block with `block_size`) until each block keeps its quota of F layers.

    With `state_path`, the state is written there after every step (atomically, by rank 0), and a run that
    finds an unfinished state of the same search there continues it. With `context_parallel`, every rank of
    the group passes the whole batches.
    """
    stack = DecoderStack(model, context_parallel)
    num_layers = stack.num_layers
    check_seq_len(model.config, batches[0].shape[1])
    blocks = split_blocks(num_layers, block_size)
    state = SearchState(num_layers, blocks, block_quotas(blocks, num_layers, num_full, ratio),
                        calibration_fingerprint(batches), all_full_loss=math.nan)
    saved = load_state(state_path) if resume and state_path is not None else None
    if saved is not None and saved.same_search(state):
        state = saved
        print(f"Resuming the search in {state_path} after {len(state.steps)} steps.")
    elif saved is not None:
        raise ValueError(f"{state_path} holds a different search (other model depth, blocks, target or data): "
                         "pass resume=false to overwrite it, or choose another output_dir.")
    if math.isnan(state.all_full_loss):
        apply_indexcache(model, IndexCachePattern.all_full(num_layers))
        state.all_full_loss = lm_loss(model, batches, "LM loss (all-F)", context_parallel)

    written = state_path if rank() == 0 else None  # the ranks of a CP group hold the same state
    # `anchor`: every batch's state at or below the lowest layer any remaining step can change.
    anchor = [stack.embed(ids) for ids in batches]
    forwards_before = state.layer_forwards
    total_steps = sum(len(block) - quota for block, quota in zip(blocks, state.quotas))
    with tqdm(total=total_steps, initial=len(state.steps), desc="greedy search") as progress:
        for b, (block, quota) in enumerate(zip(blocks, state.quotas)):
            pattern = state.block_pattern(b)
            if sum(map(pattern.is_full, block)) <= quota:
                continue
            apply_indexcache(model, IndexCachePattern.all_full(num_layers))  # below the block all is F
            anchor = [stack.run(s, block[0]) for s in anchor]
            while sum(map(pattern.is_full, block)) > quota:
                candidates = [layer for layer in block if layer > 0 and pattern.is_full(layer)]
                losses, anchor = score_candidates(stack, batches, pattern, candidates, anchor,
                                                  desc=f"step {len(state.steps) + 1}: {len(candidates)} candidates")
                best = min(losses, key=losses.get)
                pattern = pattern.with_shared(best)
                state.steps.append(Step(b, best, str(pattern), len(pattern.full_layers), losses[best],
                                        {str(layer): loss for layer, loss in losses.items()}))
                state.layer_forwards = forwards_before + stack.layer_forwards
                state.candidate_evaluations += len(candidates)
                save_state(state, written)
                progress.update()
                progress.set_postfix(layer=best, loss=f"{losses[best]:.4f}")
    state.done = True
    save_state(state, written)
    return state


def calibration_fingerprint(batches: list[torch.Tensor]) -> dict:
    digest = hashlib.sha256()
    for ids in batches:
        digest.update(ids.cpu().numpy().tobytes())
    return {"num_batches": len(batches), "batch_shape": list(batches[0].shape), "sha256": digest.hexdigest()}


def save_state(state: SearchState, path: str | Path | None, **extra) -> None:
    """Write `search.json` atomically: a kill mid-write leaves the previous step's file intact."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({**asdict(state), **extra}, indent=2))


def load_state(path: str | Path) -> SearchState | None:
    path = Path(path)
    return SearchState.from_dict(json.loads(path.read_text())) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- read-offs
def nested_patterns(state: SearchState, freqs: list[int]) -> dict[int, IndexCachePattern]:
    """freq -> the searched pattern with as many F layers as the paper's uniform 1/freq pattern (nested).
    Block-wise, each block contributes its switches up to its own quota at that retention."""
    patterns = {}
    for freq in sorted(freqs):
        num_full = len(IndexCachePattern.uniform(state.num_layers, freq, PAPER_OFFSET).full_layers)
        quotas = block_quotas(state.blocks, state.num_layers, num_full if len(state.blocks) == 1 else None,
                              1 / freq)
        if any(q < final for q, final in zip(quotas, state.quotas)):
            continue  # the search stopped before this retention
        layers = ["F"] * state.num_layers
        for b, (block, quota) in enumerate(zip(state.blocks, quotas)):
            for step in state.block_steps(b)[:len(block) - quota]:
                layers[step.layer] = "S"
        patterns[freq] = IndexCachePattern("".join(layers))
    return patterns


def cost_report(state: SearchState, num_reference_passes: int) -> dict:
    """Decoder-layer forwards spent, against plain greedy (every candidate a full forward) to the same F count."""
    batches, n = state.calibration["num_batches"], state.num_layers
    full_pass = n * batches
    switches = sum(len(block) - quota for block, quota in zip(state.blocks, state.quotas))
    naive_passes = sum(n - 1 - s for s in range(switches))  # ~N²/2 down to one F layer
    return {
        "unit": f"one decoder-layer forward of one calibration batch; a full pass = {n} x {batches}",
        "search_layer_forwards": state.layer_forwards,
        "search_full_pass_equivalents": state.layer_forwards / full_pass,
        "candidate_evaluations": state.candidate_evaluations,
        "naive_full_passes": naive_passes,
        "naive_layer_forwards": naive_passes * full_pass,
        "speedup_vs_naive": naive_passes * full_pass / max(state.layer_forwards, 1),
        "reference_full_passes": num_reference_passes,  # all-F, uniform and read-off evaluations
    }
