"""What sharing a top-k costs, measured: selection validity, index overlap, attention-mass recall, LM loss.

Definitions, for a query row t of one sequence:
- a top-k row holds key indices; a slot is **valid** when 0 <= s <= t (transformers pads rows that have
  fewer than k candidate keys with indices > t, the kernels with -1);
- the **index overlap** of a layer's own selection O[t] with a shared selection S[t] is |O[t] ∩ S[t]| / |O[t]|;
- the **attention-mass recall** of a selection S[t] for a layer with dense causal attention p[t] (head mean) is
  sum_{s in S[t]} p[t, s]: the share of the layer's attention the selection keeps;
- the **LM loss** is the mean next-token negative log-likelihood in nats per predicted token.

The recall and the overlap are averaged only over rows with more than `index_topk` candidate keys: on the
others every selection holds every key, and both would be 1 by construction. On DeepSeek-V4 the candidates
are compressed entries, one per m tokens, which query t sees once complete (w < (t + 1) // m); the rows that
count are then t >= (index_topk + 1) m - 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .adapters import get_adapter
from .capture import AttentionCall, attention_taps, capture_topk, dense_attention_probs
from .context_parallel import ContextParallel, SequenceLayout


def first_choosing_row(model) -> int:
    """The first query row whose selection drops candidates: (index_topk + 1) m - 1 at m tokens per compressed
    entry (index_topk for token indexers); a pooled indexer (pools of P keys, index_topk / P of them kept)
    drops pools from index_topk + P - 1 on."""
    config = getattr(model.config, "text_config", None) or model.config
    pool = getattr(config, "index_kpool", 1)
    return (config.index_topk + 1) * get_adapter(model).candidate_rate(model) - 1 + pool - 1


def valid_selection(topk_indices: torch.Tensor) -> torch.Tensor:
    """[B, L, k] bool: slots that hold a real key (transformers pads short rows with indices > t)."""
    query = torch.arange(topk_indices.shape[1], device=topk_indices.device)[None, :, None]
    return (topk_indices >= 0) & (topk_indices <= query)


def selection_mask(topk_indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, L, num_keys] bool: True at the keys a row selected."""
    valid = valid_selection(topk_indices)
    mask = torch.zeros(*topk_indices.shape[:2], num_keys + 1, dtype=torch.bool, device=topk_indices.device)
    mask.scatter_(-1, torch.where(valid, topk_indices.long(), num_keys), True)
    return mask[..., :num_keys]


def index_overlap(own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Per row [B, L]: the fraction of `own`'s valid selection that `shared` contains."""
    in_shared = selection_mask(shared, own.shape[1]).gather(-1, own.long().clamp(0, own.shape[1] - 1))
    valid = valid_selection(own)
    return (in_shared & valid).sum(-1) / valid.sum(-1).clamp_min(1)


def attention_recall(probs: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Per row [B, L]: the attention mass of `probs` [B, L, L] inside `selection` [B, L, k]."""
    return (probs * selection_mask(selection, probs.shape[-1])).sum(-1)


@torch.no_grad()
def lm_loss(model, batches: Iterable[torch.Tensor], desc: str,
            context_parallel: ContextParallel | None = None) -> float:
    """Mean next-token loss per predicted token, so that a short last batch weighs no more than its tokens.
    With `context_parallel`, every rank of the group passes the whole batches and the result is the one-rank
    loss (`sequence_nll`)."""
    total, tokens = 0.0, 0
    for ids in tqdm(batches, desc=desc):
        predicted = ids[:, 1:].numel()
        if context_parallel is None:
            total += model(input_ids=ids, labels=ids).loss.float().item() * predicted
        else:
            total += sequence_nll(model, ids, context_parallel)
        tokens += predicted
    if not tokens:
        raise ValueError("No evaluation batch: the data is empty.")
    return total / tokens


def sequence_nll(model, input_ids: torch.Tensor, context_parallel: ContextParallel) -> float:
    """The summed next-token loss of a batch, its sequences split over a CP group."""
    with context_parallel.activate(input_ids.shape[1]) as layout:
        logits = model(**layout.model_inputs(input_ids), use_cache=False).logits
    return sharded_nll(logits, input_ids, layout, context_parallel)


def sharded_nll(logits: torch.Tensor, input_ids: torch.Tensor, layout: SequenceLayout,
                context_parallel: ContextParallel) -> float:
    """The group's summed next-token loss from each rank's `logits` of its tokens of `input_ids`. Token t
    predicts t + 1 (the last predicts nothing): the labels are shifted over the whole sequence first, then
    sharded like the tokens, so that each rank scores its own positions and the group's sum is the one-rank
    sum."""
    labels = torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), -100)], dim=1)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), layout.shard(labels).flatten(),
                                            ignore_index=-100, reduction="sum")
    return context_parallel.all_reduce_sum(nll).item()


@torch.no_grad()
def layer_recalls(model, batches: Iterable[torch.Tensor]) -> list[float]:
    """Per layer, on `model` as it runs (its current pattern): the attention-mass recall of the top-k the
    layer attends to (its own on an F layer, its F layer's on an S layer), over rows with more candidate
    candidates than `index_topk`."""
    topk, num_layers = first_choosing_row(model), get_adapter(model).num_layers(model)
    sums = torch.zeros(num_layers, dtype=torch.float64)
    rows = 0
    pending: dict[int, torch.Tensor] = {}  # layer -> probabilities waiting for the selection

    def add(layer: int, probs: torch.Tensor, selection: torch.Tensor) -> None:
        sums[layer] += attention_recall(probs, selection)[:, topk:].sum().double().cpu()

    def on_attention(call: AttentionCall) -> None:
        if call.topk_indices is None:  # folded into the mask (glm5_next): `capture_topk` has it after the layer
            pending[call.layer] = dense_attention_probs(call)
        else:
            add(call.layer, dense_attention_probs(call), call.topk_indices)

    with attention_taps(model, on_attention), capture_topk(model) as selections:
        for ids in tqdm(batches, desc="attention-mass recall"):
            model(input_ids=ids, use_cache=False)
            for layer, probs in pending.items():
                add(layer, probs, selections[layer])
            pending.clear()
            rows += ids.shape[0] * (ids.shape[1] - topk)
    return (sums / rows).tolist()
