"""Teacher tensors for the KL kernels: MLA attention in its expanded or its absorbed form.

transformers' MLA attention (GLM-5, DeepSeek-V3.2) expands the shared key latent c_s into per-head keys,
k_nope[h] = W_k[h] c_s, so the attention function sees H heads of D = nope + rope dims (128 × 192 for
DeepSeek-V3.2). The absorbed form, as FlashMLA computes it, folds W_k into the query instead:

    q[h] . k[h] = q_nope[h] . (W_k[h] c_s) + q_rot[h] . k_rot = (W_k[h]^T q_nope[h]) . c_s + q_rot[h] . k_rot

so the key is one latent per token, [c_s, k_rot] (512 + 64 dims), shared by all heads: MQA, Hk = 1. A sparse
kernel then gathers each selected key once for every head instead of once per head (H times less gathered
memory, for about 3x the dot-product FLOPs). In dense mode the keys are contiguous and the FLOPs count more,
so the expanded form stays the default there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .runtime import zero3_gathered

if TYPE_CHECKING:
    from .capture import AttentionCall

TEACHER_FORMS = ("auto", "absorbed", "expanded")


class AbsorbedTeacher:
    """Records each MLA attention's key latent during a forward and rewrites its attention call into the
    absorbed form. Use as a context manager around the forward."""

    def __init__(self, attentions: list[nn.Module]):
        missing = [type(a).__name__ for a in attentions if not hasattr(a, "kv_b_proj")]
        if missing:
            raise ValueError(f"The absorbed teacher form needs MLA attention (kv_b_proj); {missing[0]} has none.")
        self.attentions = attentions
        self.latents: dict[int, torch.Tensor] = {}
        self._hooks = []

    def __enter__(self) -> AbsorbedTeacher:
        for attention in self.attentions:
            def record(norm, args, output, layer=attention.layer_idx):
                self.latents[layer] = output  # the normalised key latent c_s, [B, L, kv_lora_rank]
            self._hooks.append(attention.kv_a_layernorm.register_forward_hook(record))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.latents.clear()

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """(query [B, H, L, kv_lora + rope], key [B, 1, L, kv_lora + rope]) with the same scores q . k."""
        if call.latent:  # the sparse forward already hands over the latent key
            return call.score_operands()
        latent = self.latents.pop(call.module.layer_idx)  # call.layer may be a pattern position (Glm5Next)
        key = torch.cat([latent.to(call.key.dtype), call.key[:, 0, :, call.module.qk_nope_head_dim:]], dim=-1)
        return absorbed_query(call.module, call.query), key.unsqueeze(1)


def absorbed_query(attention: nn.Module, query: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """The MLA query [B, H, L, nope + rope] folded through the key half of `kv_b_proj`, for `rows` of L:
    [B, H, n, kv_lora + rope] in the query's dtype (a bf16 fold accumulates in fp32 on the matrix units)."""
    nope, lora = attention.qk_nope_head_dim, attention.kv_lora_rank
    selected = query[:, :, rows]
    batch, heads, n, _ = selected.shape
    folded = query.new_empty(batch, heads, n, lora + attention.qk_rope_head_dim)
    weight = attention.kv_b_proj.weight
    # Under ZeRO-3 kv_b_proj's weight is partitioned outside its own forward; every rank gathers it here.
    with zero3_gathered([weight]):
        w_k = weight.view(heads, -1, lora)[:, :nope].to(query.dtype)  # [H, nope, kv_lora]
        for b in range(batch):  # written in place: a concatenation would copy the whole block once more
            torch.bmm(selected[b, :, :, :nope], w_k, out=folded[b, :, :, :lora])
    folded[..., lora:] = selected[..., nope:]
    return folded


def expanded_key(attention: nn.Module, latent_key: torch.Tensor) -> torch.Tensor:
    """The per-head keys [B, H, T, nope + rope] that transformers' `expand_kv` builds, from the latent key
    [B, 1, T, kv_lora + rope] of the sparse forward."""
    nope, lora, heads = attention.qk_nope_head_dim, attention.kv_lora_rank, attention.num_heads
    weight = attention.kv_b_proj.weight
    with zero3_gathered([weight]):
        w_k = weight.view(heads, -1, lora)[:, :nope]
        k_nope = torch.einsum("btc,hnc->bhtn", latent_key[:, 0, :, :lora], w_k.to(latent_key.dtype))
    k_rope = latent_key[:, :, :, lora:].expand(-1, heads, -1, -1)
    return torch.cat([k_nope, k_rope], dim=-1)
