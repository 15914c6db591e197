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
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .adapters import ADAPTERS, get_adapter
from .teacher import absorbed_query

TAP_ATTENTION = "indexcache_tap"
# DeepSeek-V4 (eager only: SDPA has no attention sink): taps its CSA layers over their compressed entries.
TAP_COMPRESSED_ATTENTION = "indexcache_tap_compressed"
# Attention implementations that call the taps themselves.
TAPPING_IMPLEMENTATIONS = {TAP_ATTENTION, TAP_COMPRESSED_ATTENTION}


@dataclass
class AttentionCall:
    """What one layer's attention sees: query [B, H, L, nope + rope], key [B, H, T, nope + rope] (MLA
    expanded) or, with `latent`, the latent key [B, 1, T, kv_lora + rope] of the sparse forward; its scale;
    the DSA selection [B, L, k] (entries outside [0, t] are padding; None on Glm5Next, whose selection is
    already folded into `attention_mask`: take it from `capture_topk`); and on the sparse forward each head's
    log-sum-exp over the selection, [B, H, L] fp32, as its attention kernel computed it.

    On DeepSeek-V4's CSA layers the key holds the indexer's candidates only, the layer's compressed entries
    [B, 1, L // m, D] (not its sliding window of raw tokens, nor its sink), and `compress_rate` is m: query t
    sees entry w iff w < (t + 1) // m. `topk_indices` holds the entries its attention selected, -1 in empty
    slots."""

    layer: int
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    topk_indices: torch.Tensor | None
    latent: bool = False
    lse: torch.Tensor | None = None
    compress_rate: int = 1

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


def _tap_compressed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """DeepSeek-V4's eager attention, after handing a CSA layer's query and compressed entries to the taps.
    The key is [sliding-window tokens (L) | compressed entries]; the mask's compressed part is 0 exactly at
    the entries the layer's indexer selected, so the selection is read back from it."""
    if module.layer_type == "compressed_sparse_attention":
        seq_len = query.shape[2]
        entries = key[:, :, seq_len:]
        selected = attention_mask[:, 0, :, seq_len:] == 0  # [B, L, T]
        count = min(module.config.index_topk, entries.shape[2])
        order = selected.to(torch.int8).topk(count, dim=-1)
        topk = torch.where(order.values.bool(), order.indices, -1)
        run_taps(AttentionCall(module.layer_idx, module, query, entries, scaling, topk,
                               compress_rate=module.compressor.compress_rate))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(TAP_ATTENTION, _tap_attention)
AttentionMaskInterface.register(TAP_ATTENTION, sdpa_mask)
AttentionInterface.register(TAP_COMPRESSED_ATTENTION, _tap_compressed_attention)
AttentionMaskInterface.register(TAP_COMPRESSED_ATTENTION, eager_mask)


@contextmanager
def attention_taps(model: torch.nn.Module, *taps: Callable[[AttentionCall], None]) -> Iterator[None]:
    """Within the block, every attention call of `model` calls `taps` (through the tap attention unless the
    model's attention calls them itself)."""
    config = model.config
    previous = config._attn_implementation
    if previous not in TAPPING_IMPLEMENTATIONS:
        adapter = ADAPTERS.get(getattr(config, "model_type", None))
        config._attn_implementation = adapter.tap_implementation if adapter is not None else TAP_ATTENTION
    taps = _in_pattern_positions(model, taps)
    _taps.extend(taps)
    try:
        yield
    finally:
        del _taps[len(_taps) - len(taps):]
        config._attn_implementation = previous


def _in_pattern_positions(model: torch.nn.Module, taps) -> tuple:
    """On a model whose pattern does not run over every decoder layer (Glm5Next: the indexed layers only;
    DeepSeek-V4: the CSA layers), the taps see `call.layer` as the pattern position rather than the module's
    `layer_idx`, and only the calls of pattern layers."""
    adapter = ADAPTERS.get(getattr(model.config, "model_type", None))
    if adapter is None or adapter.pattern_over_decoder_layers:
        return taps
    positions = {id(adapter.attention(model, j)): j for j in range(adapter.num_layers(model))}

    def positioned(tap):
        def in_position(call):
            if id(call.module) in positions:
                tap(dataclasses.replace(call, layer=positions[id(call.module)]))
        return in_position

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


def visible_candidates(num_queries: int, num_keys: int, compress_rate: int, device=None,
                       queries: torch.Tensor | None = None) -> torch.Tensor:
    """[n, T] bool: query t sees candidate s iff s < (t + 1) // compress_rate (s <= t for tokens, rate 1).
    `queries` picks the query positions (default 0 .. num_queries - 1)."""
    if queries is None:
        queries = torch.arange(num_queries, device=device)
    limit = torch.div(queries + 1, compress_rate, rounding_mode="floor")
    return torch.arange(num_keys, device=queries.device)[None, :] < limit[:, None]


def dense_attention_probs(call: AttentionCall) -> torch.Tensor:
    """The layer's head-averaged causal attention over all its candidates (not only the top-k), [B, L, T] in
    fp32 (T = L, or the compressed entries on DeepSeek-V4, each head's softmax taken over them; a query with
    no visible entry gets a zero row). It materialises [B, H, L, T]: for analysis at small sizes only."""
    query, key = call.score_operands()
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * call.scaling
    visible = visible_candidates(scores.shape[-2], scores.shape[-1], call.compress_rate, scores.device)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0).mean(dim=1)


@contextmanager
def capture_attention(model: torch.nn.Module, layers: list[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict that fills with layer -> head-averaged dense attention probabilities [B, L, L]."""
    captured: dict[int, torch.Tensor] = {}

    def record(call: AttentionCall) -> None:
        if layers is None or call.layer in layers:
            captured[call.layer] = dense_attention_probs(call)

    with attention_taps(model, record):
        yield captured
