"""See inside a DSA forward pass without editing transformers.

- `capture_topk(model)` records every layer's selected top-k indices (F layers' own, S layers' shared).
- `attention_taps(model, tap)` runs the model with an attention function registered under
  `TAP_ATTENTION` in transformers' `AttentionInterface`. It computes exactly what SDPA computes with the
  DSA selection folded into the mask, and first hands each layer's query and key states to `tap`. The
  trainer takes its teacher tensors from there; `capture_attention` uses it for small dense maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .adapters import get_adapter

TAP_ATTENTION = "indexcache_tap"


@dataclass
class AttentionCall:
    """What one layer's attention sees: query [B, H, L, D], key [B, H, L, D] (MLA expanded), its scale,
    and the DSA selection [B, L, k] (entries > t are padding that the causal mask drops)."""

    layer: int
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    topk_indices: torch.Tensor | None


_taps: list[Callable[[AttentionCall], None]] = []


def _tap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, indices=None, **kwargs):
    for tap in _taps:
        tap(AttentionCall(module.layer_idx, module, query, key, scaling, indices))
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
    """Within the block, every attention call of `model` goes through the tap attention and calls `taps`."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = TAP_ATTENTION
    _taps.extend(taps)
    try:
        yield
    finally:
        del _taps[len(_taps) - len(taps):]
        config._attn_implementation = previous


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
    scores = torch.matmul(call.query.float(), call.key.float().transpose(-1, -2)) * call.scaling
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
