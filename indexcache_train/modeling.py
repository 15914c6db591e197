"""Loading transformers' DSA models, and tiny configs of them for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV32Config, GlmMoeDsaConfig

TINY_DSA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
    topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=1, max_position_embeddings=512,
)
_CONFIGS = {"glm_moe_dsa": GlmMoeDsaConfig, "deepseek_v32": DeepseekV32Config}


def tiny_config(model_type: str = "glm_moe_dsa", **overrides):
    """A DSA config small enough for CPU tests; `index_topk` stays below typical test lengths so that the
    top-k selection really drops keys."""
    if model_type not in _CONFIGS:
        raise ValueError(f"Unknown DSA model_type {model_type!r}; choose from {sorted(_CONFIGS)}.")
    return _CONFIGS[model_type](**{**TINY_DSA, **overrides})


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use e.g. bfloat16, float32 or auto.")
    return dtype


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa") -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with a clear error for a missing local path."""
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"No model at {name_or_path!r}: expected a folder holding config.json.")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, config=config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
