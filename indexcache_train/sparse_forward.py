"""The long-context frozen forward: transformers' own DSA models with sparse MLA attention and a fused indexer
selection, so that a forward holds nothing of size L x L.

On `eager`/`sdpa`, transformers' GlmMoeDsa and DeepseekV32 turn each layer's top-k into an L x L mask and run
dense masked attention (O(L^2) compute, two L x L bool tensors per layer), and their indexer holds fp32
scores [B, L, H_I, L]. `use_sparse_forward(model)` switches a model, in place, to:

- **attention** `SPARSE_ATTENTION`, registered in transformers' `AttentionInterface`, which hands it the
  top-k as `indices=`. It computes MLA in the absorbed form, as FlashMLA does: with c_s the key latent and
  W_k[h], W_v[h] the key and value halves of `kv_b_proj`,

      q[h] . k_s[h] = (W_k[h]^T q_nope[h]) . c_s + q_rope[h] . k_rope_s,   o[h] = W_v[h] sum_s p[h, s] c_s,

  so every head attends to one shared latent key [c_s, k_rope_s] (kv_lora + rope dims) and each selected key
  is gathered once for all heads (`kernels.sparse_mla_attention`);
- **the attention's own forward** (per instance, as Liger-Kernel patches a module): transformers' steps in
  transformers' order, with two differences. The keys stay in latent form, [B, 1, T, kv_lora + rope] with
  c_s as the value, instead of H expanded keys and values; and RoPE rotates the query's rope slice in place,
  a block of rows at a time, where transformers keeps the `q_b_proj` output alive (a view of it) beside a
  concatenated copy: one [B, H, L, nope + rope] query instead of two (2 x 9.8 GB at 200K tokens);
- **mask** (`AttentionMaskInterface`): a stride-0 view of one element; the kernels apply causality from the
  positions, so the "mask" costs no memory at any L;
- **selection**: each indexer's forward computes sum_h w relu(q_h . k) in fp32 blocks and its top-k
  (`kernels.indexer_topk`), never [chunk, H_I, L];
- **MLP** in blocks of `MLP_CHUNK_ROWS` tokens (divided by the experts per token for an MoE) when no graph is
  being built: each token's MLP (or MoE routing) is its own, so the result is the same, and the
  [L, intermediate] activations (three of them, 22 GB at 200K tokens for DeepSeek-V3.2's 18432) shrink to one
  block's.

Attention taps (`capture.attention_taps`) see every layer's query and latent key (`AttentionCall.latent`);
`AttentionCall.score_operands` gives the absorbed query that scores against it. Within
`ContextParallel.activate` (`context_parallel.py`) the attention and the indexers gather their keys over the
CP group and run each local chunk of queries at its offset in the sequence. `use_sparse_forward(model,
enabled=False)` restores transformers' native path; `apply_indexcache` works the same on both.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from .adapters import ADAPTERS, get_adapter
from .capture import TAPPING_IMPLEMENTATIONS, AttentionCall, run_taps
from .context_parallel import active_layout, gather_sequence
from .kernels import indexer_topk, sparse_mla_attention
from .runtime import zero3_gathered
from .teacher import absorbed_query

SPARSE_ATTENTION = "indexcache_sparse"
# Query rows per absorbed block: bounds the [B, rows, H, kv_lora + rope] query and the latent output.
ATTENTION_CHUNK_ROWS = 8192
# Tokens per MLP block of a no-grad forward.
MLP_CHUNK_ROWS = 16384


def _sparse_mla_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, indices=None,
                        **kwargs):
    """An `AttentionInterface` function: query [B, H, L, nope + rope], key the latent [B, 1, T, kv_lora + rope]
    (see `_latent_attention_forward`), indices [B, L, k]. Returns ([B, L, H, v_head_dim], None) as the native
    ones do."""
    if indices is None:
        raise RuntimeError(f"{SPARSE_ATTENTION} attention needs the DSA top-k (indices=); layer {module.layer_idx} "
                           "passed none.")
    batch, heads, seq_len, _ = query.shape
    lora, nope = module.kv_lora_rank, module.qk_nope_head_dim
    latent = key[:, 0]  # [B, T, kv_lora + rope]
    layout = active_layout()
    if layout is not None:  # context parallel: the group's latent keys, in sequence order
        latent = gather_sequence(latent, layout)
        key = latent.unsqueeze(1)
        segments = [(s.local_start, s.global_start, s.length) for s in layout.segments]
    else:
        segments = [(0, latent.shape[1] - seq_len, seq_len)]  # a global offset > 0 when a cache holds earlier tokens
    weight = module.kv_b_proj.weight
    with zero3_gathered([weight]):  # the keys stay latent, so no kv_b_proj call makes ZeRO-3 gather it for us
        w_v = weight.view(heads, nope + module.v_head_dim, lora)[:, nope:]  # [H, v, kv_lora]
        output = query.new_empty(batch, seq_len, heads, module.v_head_dim)
        lse = torch.empty(batch, seq_len, heads, dtype=torch.float32, device=query.device)
        for local_start, query_start, length in segments:
            for start in range(local_start, local_start + length, ATTENTION_CHUNK_ROWS):
                rows = slice(start, min(start + ATTENTION_CHUNK_ROWS, local_start + length))
                q_absorbed = absorbed_query(module, query, rows).transpose(1, 2)  # [B, n, H, kv_lora + rope]
                latent_out, lse[:, rows] = sparse_mla_attention(q_absorbed, latent, indices[:, rows], scaling,
                                                                value_dim=lora,
                                                                query_start=query_start + start - local_start,
                                                                return_lse=True)
                output[:, rows] = torch.einsum("bthc,hvc->bthv", latent_out, w_v.to(latent_out.dtype))
                del q_absorbed, latent_out  # before the next block's: one block alive, not two
        # After the attention, so that the sparse KL can reuse its log-sum-exp; inside the gather, so that
        # the teacher's query folds find kv_b_proj whole instead of gathering it once per block.
        run_taps(AttentionCall(module.layer_idx, module, query, key, scaling, indices, latent=True,
                               lse=lse.transpose(1, 2)))
    return output, None


def _visible_mask(batch_size: int, q_length: int, kv_length: int, *, attention_mask=None, device="cpu",
                  **kwargs) -> torch.Tensor:
    """An `AttentionMaskInterface` function: all keys visible, as a [B, 1, q, kv] view of a single element.
    The indexer and the attention apply causality themselves; a padding mask cannot be honoured."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"The {SPARSE_ATTENTION} forward does not take padding masks: pack sequences to a fixed "
                         "length instead (the trainer's data does), or use model.attn_implementation=sdpa.")
    return torch.ones((), dtype=torch.bool, device=device).expand(batch_size, 1, q_length, kv_length)


AttentionInterface.register(SPARSE_ATTENTION, _sparse_mla_forward)
AttentionMaskInterface.register(SPARSE_ATTENTION, _visible_mask)
TAPPING_IMPLEMENTATIONS.add(SPARSE_ATTENTION)


def _latent_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor,
                              cache=None, position_ids: torch.Tensor | None = None,
                              prev_topk_indices: torch.Tensor | None = None, **kwargs):
    """`forward` of an MLA attention (GlmMoeDsa, DeepseekV32) on the sparse forward: the native signature and
    outputs, one query tensor and a latent key (see the module docstring)."""
    batch, seq_len = hidden_states.shape[:-1]
    nope, lora = self.qk_nope_head_dim, self.kv_lora_rank
    q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
    query = self.q_b_proj(q_resid).view(batch, seq_len, -1, self.qk_head_dim).transpose(1, 2)
    kv_pass, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [lora, self.qk_rope_head_dim], dim=-1)
    k_pass = self.kv_a_layernorm(kv_pass).view(batch, 1, seq_len, lora)
    k_rot = k_rot.view(batch, 1, seq_len, self.qk_rope_head_dim)
    cos, sin = position_embeddings
    rotated_keys = []
    for start in range(0, seq_len, ATTENTION_CHUNK_ROWS):
        rows = slice(start, start + ATTENTION_CHUNK_ROWS)
        query[:, :, rows, nope:], rotated = apply_rotary_pos_emb_interleave(
            query[:, :, rows, nope:], k_rot[:, :, rows], cos[:, rows], sin[:, rows])
        rotated_keys.append(rotated)
    k_rot = torch.cat(rotated_keys, dim=2)
    if cache is not None:
        k_pass, k_rot = cache.update(k_pass, k_rot, self.layer_idx, kwargs=kwargs)
    latent_key = torch.cat([k_pass, k_rot.to(k_pass.dtype)], dim=-1)

    shares_topk = hasattr(self, "skip_topk")  # GlmMoeDsa: a layer without indexer reuses the previous top-k
    if self.indexer is None:
        if prev_topk_indices is None:
            raise ValueError("Shared DSA layers require top-k indices from a previous full indexer layer.")
        topk_indices = prev_topk_indices
    else:
        topk_indices = self.indexer(hidden_states, q_resid, position_embeddings, attention_mask[:, 0, :, :],
                                    position_ids, cache=cache)
    del q_resid
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _sparse_mla_forward)
    output, weights = attention(self, query, latent_key, k_pass, attention_mask, scaling=self.scaling,
                                indices=topk_indices, **kwargs)
    del query
    output = self.o_proj(output.reshape(batch, seq_len, -1))
    return (output, weights, topk_indices) if shares_topk else (output, weights)


def mlp_block_rows(mlp: nn.Module) -> int:
    """Tokens per block of a decoder layer's MLP: `MLP_CHUNK_ROWS`, divided by the experts per token of an MoE,
    whose routed copies ([block x experts per token, hidden], two of them in fp32) are its largest tensors."""
    return MLP_CHUNK_ROWS // (mlp.config.num_experts_per_tok if hasattr(mlp, "experts") else 1)


def _chunked_mlp_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`forward` of a decoder layer's MLP on the sparse forward: the class's own forward, a block of tokens at
    a time when no graph is being built (the frozen forward)."""
    forward = type(self).forward
    block = mlp_block_rows(self)
    if torch.is_grad_enabled() or hidden_states.shape[1] <= block:
        return forward(self, hidden_states)
    output = torch.empty_like(hidden_states)
    for start in range(0, hidden_states.shape[1], block):
        rows = slice(start, start + block)
        output[:, rows] = forward(self, hidden_states[:, rows].contiguous())  # MoE layers view their input
    return output


@torch.no_grad()
def _fused_indexer_forward(self: nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor,
                           position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """`forward` of an indexer on the sparse forward: the native signature and top-k, causal by position (-1
    in the slots of a row with fewer than k visible keys)."""
    query, key = ADAPTERS[self.config.model_type].indexer_qk(self, hidden_states, q_resid, position_embeddings)
    layout = active_layout()
    if cache is not None:
        if layout is not None:
            raise ValueError("The context-parallel forward takes no KV cache.")
        key = cache.update_indexer(key, self.layer_idx)
    # relu(c x) = c relu(x) for c > 0: both scales go into the fp32 head weights, so q and k stay as computed.
    weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
    weights = weights * (self.n_heads**-0.5 * self.softmax_scale)
    if layout is None:
        return indexer_topk(query, key, weights, self.index_topk, query_start=key.shape[1] - query.shape[1])
    key = gather_sequence(key, layout)  # context parallel: each local chunk ranks all L keys at its offset
    rows = [slice(s.local_start, s.local_start + s.length) for s in layout.segments]
    return torch.cat([indexer_topk(query[:, r], key, weights[:, r], self.index_topk, query_start=s.global_start)
                      for r, s in zip(rows, layout.segments)], dim=1)


def use_sparse_forward(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch a transformers DSA model to the sparse forward (see the module docstring), in place, and return
    it; `enabled=False` restores transformers' native forward with `sdpa`. Only instance attributes change,
    as Liger-Kernel patches modules: parameters and `state_dict()` keys stay as they are. Indexers that an
    IndexCache pattern keeps aside are switched too, so they come back the same way."""
    adapter = get_adapter(model)
    if enabled and not adapter.on_sparse_forward:
        raise ValueError(f"The sparse forward does not cover {adapter.architecture}'s indexer yet; run it on "
                         f"transformers' native path with model.attn_implementation={adapter.native_attention}.")
    for layer in range(adapter.num_layers(model)):
        attention = adapter.attention(model, layer)
        if not hasattr(attention, "kv_b_proj"):
            raise ValueError(f"The sparse forward needs MLA attention; layer {layer} is {type(attention).__name__}.")
        mlp = adapter.layers(model)[layer].mlp
        if enabled:
            attention.forward = types.MethodType(_latent_attention_forward, attention)
            mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
        else:
            vars(attention).pop("forward", None)
            vars(mlp).pop("forward", None)
    for indexer in adapter.all_indexers(model):
        if enabled:
            indexer.forward = types.MethodType(_fused_indexer_forward, indexer)
        else:
            vars(indexer).pop("forward", None)
    model.config._attn_implementation = SPARSE_ATTENTION if enabled else "sdpa"
    return model


def uses_sparse_forward(model: nn.Module) -> bool:
    return model.config._attn_implementation == SPARSE_ATTENTION
