"""Per-architecture adapters that switch transformers' own DSA models to IndexCache.

transformers' attention code stays untouched. Each adapter only knows where a model keeps its indexers,
how an S layer gets the top-k of its F layer, and how to recompute an indexer's q, k and weights with
gradients for distillation:

- `GlmMoeDsaForCausalLM` shares natively: an attention whose `indexer` is None reuses `prev_topk_indices`.
- `DeepseekV32ForCausalLM` always calls its indexer, so an S layer's indexer is replaced by `SharedTopK`,
  a module without parameters that returns the top-k its F layer recorded in a `TopKRelay`.
- `Glm5NextForConditionalGeneration` (hybrid KDA + indexed attention) numbers its pattern over the indexed
  layers only, writes `text_config.indexer_types`, and relays the top-k across the linear layers
  (see `Glm5NextAdapter`).
- `DeepseekV4ForCausalLM` numbers its pattern over its compressed-sparse-attention layers, whose indexers
  rank compressed KV entries; S layers get `SharedTopK` stand-ins (see `DeepseekV4Adapter`).

Removed indexers are kept off the module tree (absent from `state_dict()` and `parameters()`), so a later
`apply_indexcache` with another pattern can bring them back; that is what pattern search relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .pattern import IndexCachePattern


@dataclass
class IndexerProjections:
    """An indexer's tensors in the form the KL kernels take: I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s])."""

    query: torch.Tensor  # [B, L, Hi, Di], the indexer's softmax scale folded in
    key: torch.Tensor  # [B, L, Di]
    weights: torch.Tensor  # [B, L, Hi], the 1/sqrt(Hi) head scale folded in


class TopKRelay:
    """Carries the latest F layer's top-k to the S layers after it during one forward pass."""

    def __init__(self):
        self.layer: int | None = None
        self.indices: torch.Tensor | None = None

    def recorder(self, layer: int):
        """A forward hook that records an indexer's output as pattern position `layer`'s."""
        def record(indexer: nn.Module, args, output: torch.Tensor) -> None:
            self.layer, self.indices = layer, output
        return record


class SharedTopK(nn.Module):
    """Stands in for an S layer's indexer: returns its F layer's top-k instead of computing one."""

    def __init__(self, relay: TopKRelay, layer_idx: int, source_layer: int):
        super().__init__()
        self.relay, self.layer_idx, self.source_layer = relay, layer_idx, source_layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        indices = self.relay.indices
        if self.relay.layer != self.source_layer or indices is None or indices.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(
                f"Layer {self.layer_idx} shares the top-k of layer {self.source_layer}, but that layer has not "
                "produced one in this forward pass."
            )
        return indices

    def extra_repr(self) -> str:
        return f"source_layer={self.source_layer}"


@dataclass
class _IndexCacheState:
    """What `apply_indexcache` leaves on a model so that it can be re-applied with another pattern."""

    pattern: IndexCachePattern
    removed: dict[int, nn.Module] = field(default_factory=dict)  # layer -> indexer, off the module tree
    hooks: list = field(default_factory=list)


class DSAAdapter:
    """What the rest of the package needs to know about one DSA architecture."""

    model_type: str
    architecture: str
    # False where pattern position j is not decoder layer j (then the attention taps translate `layer_idx`)
    pattern_over_decoder_layers: bool = True
    # False where `sparse_forward` does not cover the family's indexer yet (the native path serves it)
    on_sparse_forward: bool = True
    # The attention implementation that taps the model's attention calls on its native path (capture.py)
    tap_implementation: str = "indexcache_tap"
    # transformers' attention implementation for the family's native path
    native_attention: str = "sdpa"
    # MLA attention (kv_b_proj), which the absorbed teacher form folds
    mla: bool = True

    # ----------------------------------------------------------------------------------------- structure
    def decoder(self, model: nn.Module) -> nn.Module:
        """The text model: the module holding `embed_tokens`, the decoder `layers` and the final `norm`."""
        return getattr(model, "model", model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layers(model)[layer].self_attn

    def indexer_owner(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose `indexer` attribute holds the layer's indexer (or its S-layer stand-in)."""
        return self.attention(model, layer)

    def indexer(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The layer's own indexer, or None on an S layer."""
        indexer = self.indexer_owner(model, layer).indexer
        return None if indexer is None or isinstance(indexer, SharedTopK) else indexer

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def all_indexers(self, model: nn.Module) -> list[nn.Module]:
        """Every indexer the model owns: those in place and those an IndexCache pattern keeps off the tree."""
        state: _IndexCacheState | None = getattr(model, "_indexcache", None)
        in_place = [self.indexer(model, layer) for layer in range(self.num_layers(model))]
        return [i for i in in_place if i is not None] + (list(state.removed.values()) if state else [])

    # ----------------------------------------------------------------------------------------- sharing
    def apply(self, model: nn.Module, pattern: IndexCachePattern) -> None:
        state: _IndexCacheState | None = getattr(model, "_indexcache", None)
        if state is None:
            state = _IndexCacheState(IndexCachePattern.all_full(self.num_layers(model)))
            self._check_has_indexers(model)
        for handle in state.hooks:
            handle.remove()
        state.hooks.clear()
        self.check_pattern(model, pattern)
        for layer in range(self.num_layers(model)):
            owner = self.indexer_owner(model, layer)
            own = self.indexer(model, layer)
            if pattern.is_full(layer):
                if own is None:
                    own = state.removed.pop(layer, None)
                    if own is None:
                        raise ValueError(
                            f"Layer {layer} is F in {pattern} but the model has no indexer there (it was loaded "
                            "without one): such a layer can only be S."
                        )
                owner.indexer = own
            elif own is not None:
                state.removed[layer] = own
                owner.indexer = None
        self._connect(model, pattern, state)
        state.pattern = pattern
        model._indexcache = state
        self.write_config(model, pattern)

    def check_pattern(self, model: nn.Module, pattern: IndexCachePattern) -> None:
        """Refuse a pattern this architecture cannot run (beyond the checks `IndexCachePattern` makes)."""

    def candidate_rate(self, model: nn.Module) -> int:
        """Tokens per indexer candidate: 1 where the indexer ranks tokens, the compress rate where it ranks
        compressed entries. Query t sees candidate s iff s < (t + 1) // rate (s <= t at rate 1)."""
        return 1

    def compress_rate(self, model: nn.Module, layer: int) -> int:
        """Tokens per candidate of pattern position `layer`'s indexer (see `candidate_rate`)."""
        return 1

    def config_candidate_rate(self, config) -> int:
        """`candidate_rate` from the config alone (checked before any weights load)."""
        return 1

    def config_num_layers(self, config) -> int:
        """`num_layers`, the pattern's length, from the config alone."""
        return config.num_hidden_layers

    def write_config(self, model: nn.Module, pattern: IndexCachePattern) -> None:
        """Put the pattern's keys on the config, so that `save_pretrained` writes them."""
        keys = pattern.to_config_dict()
        if "index_topk_freq" not in keys:  # a previous uniform schedule would contradict the new pattern
            for stale in ("index_topk_freq", "index_skip_topk_offset"):
                if hasattr(model.config, stale):
                    delattr(model.config, stale)
        model.config.update(keys)

    def export_config_keys(self, pattern: IndexCachePattern) -> dict:
        """The keys an export writes on the top-level config."""
        return pattern.to_config_dict()

    def pattern_from_config(self, model: nn.Module) -> IndexCachePattern:
        """The pattern the model's config declares (all F when it declares none)."""
        return IndexCachePattern.from_config(model.config)

    def _check_has_indexers(self, model: nn.Module) -> None:
        if all(self.indexer(model, layer) is None for layer in range(self.num_layers(model))):
            raise ValueError(f"This {self.architecture} has no lightning indexer in any layer: nothing to share.")

    def _connect(self, model: nn.Module, pattern: IndexCachePattern, state: _IndexCacheState) -> None:
        """Wire each S layer to its F layer's top-k."""
        raise NotImplementedError

    def selection_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose forward output carries the layer's top-k (see `selection_from_output`)."""
        raise NotImplementedError

    def selection_from_output(self, output) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- training
    def rotate(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The indexer's RoPE on its rotary slice, q [B, L, H, r] and k [B, L, 1, r]."""
        raise NotImplementedError

    def indexer_qk(self, indexer: nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer's q [B, L, Hi, Di] and k [B, L, Di] after its RoPE, unscaled, as its forward has them."""
        batch, seq_len, _ = hidden_states.shape
        query = indexer.wq_b(q_resid).view(batch, seq_len, indexer.n_heads, indexer.head_dim)
        key = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)
        rope = indexer.qk_rope_head_dim
        q_rot, k_rot = self.rotate(query[..., :rope], key[..., :rope], *position_embeddings)
        return torch.cat([q_rot, query[..., rope:]], dim=-1), torch.cat([k_rot, key[..., rope:]], dim=-1).squeeze(2)

    def indexer_projections(self, indexer: nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> IndexerProjections:
        """Recompute the indexer's q, k and weights from its inputs, differentiably: I = sum_h weights_h *
        relu(q_h . k) reproduces the scores its forward ranks, up to rounding (the scales are folded in the
        model's dtype, where the forward applies them in fp32)."""
        query, key = self.indexer_qk(indexer, hidden_states, q_resid, position_embeddings)
        weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)) * indexer.n_heads**-0.5
        return IndexerProjections(query * indexer.softmax_scale, key, weights)


class GlmMoeDsaAdapter(DSAAdapter):
    model_type = "glm_moe_dsa"
    architecture = "GlmMoeDsaForCausalLM"

    def _connect(self, model, pattern, state):
        # GlmMoeDsaModel passes each layer's top-k to the next one; an attention without indexer reuses it.
        for layer in range(self.num_layers(model)):
            self.attention(model, layer).skip_topk = not pattern.is_full(layer)

    def selection_module(self, model, layer):
        return self.attention(model, layer)

    def selection_from_output(self, output):
        return output[2]

    def rotate(self, query, key, cos, sin):
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

        return apply_rotary_pos_emb_interleave(query, key, cos, sin, unsqueeze_dim=2)


class DeepseekV32Adapter(DSAAdapter):
    model_type = "deepseek_v32"
    architecture = "DeepseekV32ForCausalLM"

    def _connect(self, model, pattern, state):
        relay = TopKRelay()
        for source, served in pattern.groups.items():
            if served:
                state.hooks.append(self.indexer(model, source).register_forward_hook(relay.recorder(source)))
            for layer in served:
                self.indexer_owner(model, layer).indexer = SharedTopK(relay, layer, source)

    def selection_module(self, model, layer):
        return self.indexer_owner(model, layer).indexer

    def selection_from_output(self, output):
        return output

    def rotate(self, query, key, cos, sin):
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

        return apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)


class Glm5NextAdapter(DSAAdapter):
    """transformers' `Glm5NextForConditionalGeneration` (GLM-5.3-Flash), a hybrid: three of four decoder layers
    are linear attention (KDA, no indexer), every fourth is `indexed_attention`, an MLA layer with a pooled DSA
    indexer (it ranks pools of `index_kpool` keys and expands the kept pools to tokens).

    Convention: an IndexCache pattern here is defined over the layers that own an indexer, the
    `indexed_attention` layers in order, not over all decoder layers. Pattern position j is the j-th
    indexed layer (decoder layer 4j+3 in the default layout), so "FS" on an 8-layer model keeps layer 3's
    indexer and makes layer 7 reuse its top-k. `num_layers` and `attention(model, j)` follow it.

    Config: the model's own `config.text_config.indexer_types` is written over all decoder layers, as
    `Glm5NextTextConfig` defines it: an indexed layer gets "full"/"shared" from the pattern; a linear layer
    gets the value of the next indexed layer (so the F layer before an S run has `next_skip_topk` natively).
    `index_topk_pattern` (our key) holds the pattern over indexed layers; `pattern_from_config` reads it, else
    `indexer_types` restricted to the indexed layers. The uniform `index_topk_freq`/`index_skip_topk_offset`
    keys are not written: transformers reads them over all decoder layers.

    Sharing: `Glm5NextTextAttention.__init__` builds no indexer where `indexer_types` is "shared", and its
    forward then takes `prev_topk_indices`. Native sharing alone does not reach across the hybrid layout:
    `Glm5NextTextModel.forward` passes on only what the previous decoder layer returned, a linear layer
    returns None, and an S attention returns its top-k only if `next_skip_topk`, which is False on S layers.
    So `_connect` sets `skip_topk` from the pattern and `next_skip_topk` on every indexed layer (an F layer
    ignores an incoming top-k), and a forward hook on each linear decoder layer before an S layer hands the
    incoming top-k on.
    """

    model_type = "glm5_next"
    architecture = "Glm5NextForConditionalGeneration"
    pattern_over_decoder_layers = False
    on_sparse_forward = False  # its pooled indexer has no fused selection yet

    def text_config(self, model: nn.Module):
        return getattr(model.config, "text_config", model.config)

    def decoder(self, model):
        inner = getattr(model, "model", model)
        return getattr(inner, "language_model", inner)

    def config_num_layers(self, config):
        text = getattr(config, "text_config", None) or config
        return sum(kind != "linear_attention" for kind in text.layer_types)

    def indexed_layers(self, model: nn.Module) -> list[int]:
        """The decoder layers that own an indexer slot, in order: pattern position j is indexed_layers[j]."""
        return [i for i, layer in enumerate(self.layers(model)) if layer.block_type != "linear_attention"]

    def num_layers(self, model):
        return len(self.indexed_layers(model))

    def attention(self, model, layer):
        return self.layers(model)[self.indexed_layers(model)[layer]].self_attn

    def indexer_types(self, model: nn.Module, pattern: IndexCachePattern) -> list[str]:
        """`indexer_types` over all decoder layers for a pattern over the indexed layers."""
        decoder = self.layers(model)
        kinds, following = [None] * len(decoder), "full"
        position = {layer: j for j, layer in enumerate(self.indexed_layers(model))}
        for i in reversed(range(len(decoder))):
            if i in position:
                following = "full" if pattern.is_full(position[i]) else "shared"
            kinds[i] = following
        return kinds

    def write_config(self, model, pattern):
        config = self.text_config(model)
        for stale in ("index_topk_freq", "index_skip_topk_offset"):
            if hasattr(config, stale):
                delattr(config, stale)
        config.update({"indexer_types": self.indexer_types(model, pattern), "index_topk_pattern": pattern.layers,
                       "use_index_cache": bool(pattern.shared_layers)})

    def export_config_keys(self, pattern):
        return {}  # `write_config` has put them on the text config, over the decoder layers

    def pattern_from_config(self, model):
        config = self.text_config(model)
        layers = getattr(config, "index_topk_pattern", None)
        if layers is None:
            kinds = getattr(config, "indexer_types", None) or []
            layers = "".join("S" if kinds[i] == "shared" else "F" for i in self.indexed_layers(model)
                             if i < len(kinds)) or None
        if layers is None:
            return IndexCachePattern.all_full(self.num_layers(model))
        return IndexCachePattern.parse(layers, self.num_layers(model))

    def _connect(self, model, pattern, state):
        decoder, indexed = self.layers(model), self.indexed_layers(model)
        for j, layer in enumerate(indexed):
            attention = decoder[layer].self_attn
            attention.skip_topk = not pattern.is_full(j)
            # Every indexed attention returns the top-k it used: an S one to pass it on, and all of them
            # for `capture_topk` (the next indexed layer ignores it unless it is S).
            attention.next_skip_topk = True
        for j, layer in enumerate(indexed[:-1]):
            if not pattern.is_full(j + 1):  # the linear layers up to the S layer relay its top-k
                for between in range(layer + 1, indexed[j + 1]):
                    state.hooks.append(decoder[between].register_forward_hook(_relay_topk, with_kwargs=True))

    def selection_module(self, model, layer):
        attention = self.attention(model, layer)
        # The attention returns the top-k it used only with `next_skip_topk`; the layer after an indexed one
        # is linear, or ignores it when F, so switching it on changes no computation.
        attention.next_skip_topk = True
        return attention

    def selection_from_output(self, output):
        return output[2]

    def indexer_projections(self, indexer, hidden_states, q_resid, position_embeddings=None):
        """The pooled indexer's q and weights, and as its key each token's pool key (`kernels/pooled.py`): the
        pools of `index_kpool` keys from the first token (the distillation's sequences are unpadded), each
        compressed as `Glm5NextTextIndexer.get_pooled_states` does, by a per-channel softmax over the pool of
        `index_kpool_compress_gate` scores plus `index_kpool_compress_ape`. The indexer is NoPE: no rotation,
        and `position_embeddings` is unused. Differentiable in every indexer parameter, compression included."""
        from .kernels.pooled import pool_to_tokens

        batch, seq_len, _ = hidden_states.shape
        pool, pools = indexer.index_kpool, seq_len // indexer.index_kpool
        query = indexer.wq_b(q_resid).view(batch, seq_len, indexer.n_heads, indexer.head_dim)
        key = indexer.k_norm(indexer.wk(hidden_states))
        gate_scores = nn.functional.linear(hidden_states, indexer.index_kpool_compress_gate)

        def by_pool(x):  # [B, L, D] -> [B, pools, P, D], the complete pools only
            return x[:, :pools * pool].view(batch, pools, pool, -1)

        logits = by_pool(gate_scores).float() + indexer.index_kpool_compress_ape.float()
        pool_keys = (logits.softmax(dim=2).to(key.dtype) * by_pool(key)).sum(dim=2)
        weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)) * indexer.n_heads**-0.5
        return IndexerProjections(query * indexer.softmax_scale, pool_to_tokens(pool_keys, pool, seq_len), weights)


class DeepseekV4Adapter(DSAAdapter):
    """transformers' `DeepseekV4ForCausalLM`. Its layers are sliding-window, heavily compressed (HCA) or
    compressed sparse attention (CSA); only the CSA layers own a lightning indexer, which ranks compressed KV
    entries, not tokens: entry w pools the window of tokens [w m, (w + 1) m) (and the previous window, through
    the overlapping series), m = `compress_rates["compressed_sparse_attention"]`, and query t sees it once its
    window is complete, w < (t + 1) // m. The CSA attention attends to its sliding window of raw tokens, the
    top-k compressed entries (`index_topk`) and a per-head sink.

    Convention: the pattern is defined over the CSA layers, in order (SGLang's V4 IndexCache patch numbers
    `index_topk_pattern` by CSA rank the same way). transformers has no sharing keys for V4; the config gets
    `index_topk_pattern` over the CSA layers and `use_index_cache`, and `pattern_from_config` also reads a
    pattern written over all decoder layers (one character per layer, the CSA ones counted).

    Sharing: `DeepseekV4CSACompressor` always calls its indexer, so an S layer's indexer becomes a `SharedTopK`
    fed by its F layer's output. Entry w means the same window of tokens in every CSA layer (each layer pools
    it with its own compressor), so a top-k carries over between layers of the same compress rate, and
    `check_pattern` refuses a group whose layers differ in it.
    """

    model_type = "deepseek_v4"
    architecture = "DeepseekV4ForCausalLM"
    pattern_over_decoder_layers = False
    on_sparse_forward = False  # no fused selection or attention for compressed entries yet
    tap_implementation = "indexcache_tap_compressed"
    native_attention = "eager"  # transformers' V4 is eager only (SDPA has no attention sink)
    mla = False  # one shared key head (K = V), no kv_b_proj

    def indexed_layers(self, model: nn.Module) -> list[int]:
        """The CSA decoder layers, in order: pattern position j is indexed_layers[j]."""
        return [i for i, layer in enumerate(self.layers(model))
                if layer.self_attn.layer_type == "compressed_sparse_attention"]

    def num_layers(self, model):
        return len(self.indexed_layers(model))

    def attention(self, model, layer):
        return self.layers(model)[self.indexed_layers(model)[layer]].self_attn

    def indexer_owner(self, model, layer):
        return self.attention(model, layer).compressor

    def compress_rate(self, model: nn.Module, layer: int) -> int:
        """Pattern position `layer`'s compress rate, as its compressor and indexer hold it."""
        compressor = self.indexer_owner(model, layer)
        rates = {compressor.compress_rate}
        indexer = self.indexer(model, layer)
        if indexer is not None:
            rates.add(indexer.compress_rate)
        if len(rates) != 1:
            raise ValueError(f"CSA layer {layer}'s compressor and indexer pool windows of different lengths "
                             f"({sorted(rates)} tokens): its top-k would not index its own entries.")
        return rates.pop()

    def candidate_rate(self, model):
        rates = {self.compress_rate(model, layer) for layer in range(self.num_layers(model))}
        if len(rates) != 1:
            raise ValueError(f"The CSA layers compress at different rates {sorted(rates)}: metrics over the "
                             "model need one rate.")
        return rates.pop()

    def config_candidate_rate(self, config):
        return config.compress_rates["compressed_sparse_attention"]

    def config_num_layers(self, config):
        return config.layer_types.count("compressed_sparse_attention")

    def check_pattern(self, model, pattern):
        for source, served in pattern.groups.items():
            rate = self.compress_rate(model, source)
            mixed = [layer for layer in served if self.compress_rate(model, layer) != rate]
            if mixed:
                raise ValueError(
                    f"In {pattern}, CSA layers {mixed} would share the top-k of CSA layer {source}, but they "
                    f"compress every {self.compress_rate(model, mixed[0])} tokens and layer {source} every {rate}: "
                    "entry w would be another window of tokens. Make the first of them F.")

    def write_config(self, model, pattern):
        for stale in ("index_topk_freq", "index_skip_topk_offset"):  # engines count those over other layers
            if hasattr(model.config, stale):
                delattr(model.config, stale)
        model.config.update(self.export_config_keys(pattern))

    def export_config_keys(self, pattern):
        return {"index_topk_pattern": pattern.layers, "use_index_cache": bool(pattern.shared_layers)}

    def pattern_from_config(self, model):
        layers = getattr(model.config, "index_topk_pattern", None)
        if layers is None:
            return IndexCachePattern.all_full(self.num_layers(model))
        indexed = self.indexed_layers(model)
        if len(layers) == len(self.layers(model)) != len(indexed):  # written over all decoder layers
            layers = "".join(layers[i] for i in indexed)
        return IndexCachePattern.parse(layers, self.num_layers(model))

    # S layers share through DeepseekV32Adapter's stand-ins, placed on each CSA layer's compressor
    _connect = DeepseekV32Adapter._connect
    selection_module = DeepseekV32Adapter.selection_module
    selection_from_output = DeepseekV32Adapter.selection_from_output

    def indexer_projections(self, indexer, hidden_states, q_resid, position_ids):
        """As `DeepseekV4Indexer.forward` computes them without a cache: q [B, L, Hi, Di] at the query
        positions, the compressed keys [B, L // m, Di] at their windows' first positions, and the weights.
        Its third input is `position_ids`: the indexer makes its own rotary embeddings."""
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

        batch, seq_len, _ = hidden_states.shape
        cos, sin = indexer.rotary_emb(hidden_states, position_ids=position_ids, layer_type=indexer.rope_layer_type)
        query = indexer.q_b_proj(q_resid).view(batch, seq_len, -1, indexer.head_dim).transpose(1, 2)
        query = apply_rotary_pos_emb(query, cos, sin).transpose(1, 2)
        scorer = indexer.scorer
        weights = scorer.weights_proj(hidden_states) * scorer.weights_scaling
        return IndexerProjections(query * scorer.softmax_scale, compressed_index_keys(indexer, hidden_states),
                                  weights)


def compressed_index_keys(indexer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A `DeepseekV4Indexer`'s compressed keys [B, L // m, Di] for a whole sequence (no cache), differentiable
    in its kv_proj, gate_proj, position_bias and kv_norm. Entry w is the softmax-gated sum over 2m slots: the
    first half of the features of window w - 1's tokens (none for w = 0) and the second half of window w's;
    then RMSNorm and RoPE at position w m."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    batch, seq_len, _ = hidden_states.shape
    rate, dim = indexer.compress_rate, indexer.head_dim
    windows = seq_len // rate
    kv = indexer.kv_proj(hidden_states[:, :windows * rate]).view(batch, windows, rate, 2 * dim)
    gate = indexer.gate_proj(hidden_states[:, :windows * rate]).view(batch, windows, rate, 2 * dim)
    gate = gate + indexer.position_bias
    before_kv = torch.cat([torch.zeros_like(kv[:, :1, :, :dim]), kv[:, :-1, :, :dim]], dim=1)
    before_gate = torch.cat([torch.full_like(gate[:, :1, :, :dim], float("-inf")), gate[:, :-1, :, :dim]], dim=1)
    slots_kv = torch.cat([before_kv, kv[..., dim:]], dim=2)
    slots_gate = torch.cat([before_gate, gate[..., dim:]], dim=2)
    pooled = (slots_kv * slots_gate.softmax(dim=2, dtype=torch.float32).to(slots_kv.dtype)).sum(dim=2)
    compressed = indexer.kv_norm(pooled)
    positions = (torch.arange(windows, device=compressed.device) * rate).unsqueeze(0).expand(batch, -1)
    cos, sin = indexer.rotary_emb(compressed, position_ids=positions, layer_type=indexer.rope_layer_type)
    return apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


def _relay_topk(module: nn.Module, args, kwargs, output):
    """A linear decoder layer returns no top-k; hand on the one it was given, as an indexed layer would."""
    hidden_states, topk_indices = output
    return (hidden_states, kwargs.get("prev_topk_indices")) if topk_indices is None else output


ADAPTERS: dict[str, DSAAdapter] = {
    a.model_type: a for a in (GlmMoeDsaAdapter(), DeepseekV32Adapter(), Glm5NextAdapter(), DeepseekV4Adapter())
}


def get_adapter(model: nn.Module) -> DSAAdapter:
    """The adapter for a transformers DSA model, or a ValueError naming the supported architectures."""
    config = getattr(model, "config", None)
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is None:
        supported = ", ".join(a.architecture for a in ADAPTERS.values())
        raise ValueError(
            f"IndexCache supports transformers' DSA models ({supported}); got {type(model).__name__} "
            f"(model_type={getattr(config, 'model_type', None)!r})."
        )
    return adapter


def apply_indexcache(model: nn.Module, pattern: IndexCachePattern | str | float) -> nn.Module:
    """Switch a transformers DSA model to IndexCache, in place, and return it.

    S layers reuse the top-k of the nearest F layer before them, and their indexers leave the module tree
    (and so `state_dict()`). The config gets the pattern's keys, so `save_pretrained` writes a checkpoint
    that transformers, vLLM and SGLang load with sharing on. `pattern` may be an `IndexCachePattern`, an
    F/S string, or a retention ratio such as 0.25 (the paper's uniform FSSS...).
    """
    adapter = get_adapter(model)
    adapter.apply(model, IndexCachePattern.coerce(pattern, adapter.num_layers(model)))
    return model


def current_pattern(model: nn.Module) -> IndexCachePattern:
    """The pattern a model runs with: the one applied, else the one its config declares."""
    state = getattr(model, "_indexcache", None)
    if state is not None:
        return state.pattern
    adapter = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    return adapter.pattern_from_config(model) if adapter is not None else IndexCachePattern.from_config(model.config)
