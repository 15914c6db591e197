"""See inside a DSA forward pass without editing transformers.

- `capture_topk(model)` records every layer's selected top-k indices (F layers' own, S layers' shared).
- `attention_taps(model, tap)` hands each layer's query and key states to `tap` as its attention runs. On
  the sparse forward (`sparse_forward.py`) its attention does that itself; on transformers' native path the
  model runs with an attention function registered under `TAP_ATTENTION` in transformers'
  `AttentionInterface`, which computes exactly what SDPA computes with the DSA selection folded into the
  mask. The trainer takes its teacher tensors from there; `capture_attention` uses it for small dense maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .adapters import ADAPTERS, get_adapter
from .teacher import absorbed_query

TAP_ATTENTION = "indexcache_tap"
# Attention implementations that call the taps themselves.
TAPPING_IMPLEMENTATIONS = {TAP_ATTENTION}


@dataclass
class AttentionCall:
    """What one layer's attention sees: query [B, H, L, nope + rope], key [B, H, T, nope + rope] (MLA
    expanded) or, with `latent`, the latent key [B, 1, T, kv_lora + rope] of the sparse forward; its scale;
    the DSA selection [B, L, k] (entries outside [0, t] are padding; None on Glm5Next, whose selection is
    already folded into `attention_mask`: take it from `capture_topk`); and on the sparse forward each head's
    log-sum-exp over the selection, [B, H, L] fp32, as its attention kernel computed it."""

    layer: int
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    topk_indices: torch.Tensor | None
    latent: bool = False
    lse: torch.Tensor | None = None

    def score_operands(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [B, H, n, D], k [B, Hk, T, D]) whose scaled product q . k^T is the attention scores of `rows`."""
        if self.latent:
            return absorbed_query(self.module, self.query, rows), self.key
        return self.query[:, :, rows], self.key


_taps: list[Callable[[AttentionCall], None]] = []


def run_taps(call: AttentionCall) -> None:
    for tap in _taps:
        tap(call)


def _tap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, indices=None, **kwargs):
    run_taps(AttentionCall(module.layer_idx, module, query, key, scaling, indices))
    if indices is not None:
        # The same folding transformers applies for eager/SDPA: keys outside the top-k are masked out.
        batch, seq_len, num_keys = query.shape[0], query.shape[2], key.shape[2]
        outside = torch.ones(batch, seq_len, num_keys, dtype=torch.bool, device=query.device)
        outside = outside.scatter(-1, indices.long(), False).unsqueeze(1)
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & ~outside
        else:
            attention_mask = attention_mask.masked_fill(outside, torch.finfo(query.dtype).min)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


AttentionInterface.register(TAP_ATTENTION, _tap_attention)
AttentionMaskInterface.register(TAP_ATTENTION, sdpa_mask)


@contextmanager
def attention_taps(model: torch.nn.Module, *taps: Callable[[AttentionCall], None]) -> Iterator[None]:
    """Within the block, every attention call of `model` calls `taps` (through the tap attention unless the
    model's attention calls them itself)."""
    config = model.config
    previous = config._attn_implementation
    if previous not in TAPPING_IMPLEMENTATIONS:
        config._attn_implementation = TAP_ATTENTION
    taps = _in_pattern_positions(model, taps)
    _taps.extend(taps)
    try:
        yield
    finally:
        del _taps[len(_taps) - len(taps):]
        config._attn_implementation = previous


def _in_pattern_positions(model: torch.nn.Module, taps) -> tuple:
    """On a model whose pattern does not run over every decoder layer (Glm5Next: the indexed layers only),
    the taps see `call.layer` as the pattern position rather than the module's `layer_idx`."""
    adapter = ADAPTERS.get(getattr(model.config, "model_type", None))
    if adapter is None or adapter.pattern_over_decoder_layers:
        return taps
    positions = {id(adapter.attention(model, j)): j for j in range(adapter.num_layers(model))}

    def positioned(tap):
        return lambda call: tap(dataclasses.replace(call, layer=positions.get(id(call.module), call.layer)))

    return tuple(positioned(tap) for tap in taps)


@contextmanager
def capture_topk(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict that fills, during forwards inside the block, with layer -> top-k indices [B, L, k]."""
    adapter = get_adapter(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(adapter.num_layers(model)):
        def record(module, args, output, layer=layer):
            captured[layer] = adapter.selection_from_output(output)
        handles.append(adapter.selection_module(model, layer).register_forward_hook(record))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def dense_attention_probs(call: AttentionCall) -> torch.Tensor:
    """The layer's head-averaged causal attention over all keys (not only the top-k), [B, L, L] in fp32.
    It materialises [B, H, L, L]: for analysis at small sizes only."""
    query, key = call.score_operands()
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * call.scaling
    seq_len = scores.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=scores.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=1)


@contextmanager
def capture_attention(model: torch.nn.Module, layers: list[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict that fills with layer -> head-averaged dense attention probabilities [B, L, L]."""
    captured: dict[int, torch.Tensor] = {}

    def record(call: AttentionCall) -> None:
        if layers is None or call.layer in layers:
            captured[call.layer] = dense_attention_probs(call)

    with attention_taps(model, record):
        yield captured
