"""Loading transformers' DSA models, and tiny configs of them for tests and smoke runs.

A run reads the model's config first (`load_model_config`): an unsupported architecture, or settings that do
not fit the model, fail from config.json alone, before any weights load. The tokenizer is loaded only when the
data holds text (`LazyTokenizer`): records of ready `input_ids` need none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV4Config,
    DeepseekV32Config,
    Glm5NextConfig,
    GlmMoeDsaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .adapters import ADAPTERS
from .fp8 import quantization_config as fp8_quantization_config
from .fp8 import resolve_route as fp8_route
from .sparse_forward import SPARSE_ATTENTION, use_sparse_forward
from .zero import load_partitioned, zero3_enabled

TINY_DSA = dict(
    vocab_size=257, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
    topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=1, max_position_embeddings=512,
)
# DeepSeek-V4: 6 layers, of which 4 are CSA (compress rate 4, so 16 candidates at 64 tokens; top-4 of them),
# one sliding-window and one HCA; mHC with 2 streams; MoE throughout (no hash-routed layers: random ids).
TINY_DEEPSEEK_V4 = dict(
    vocab_size=257, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
    head_dim=32, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, o_groups=2,
    o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=4, hc_mult=2, hc_sinkhorn_iters=3,
    max_position_embeddings=512,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    + ["compressed_sparse_attention"] * 3,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["moe"] * 6,
)
# GLM-5.3-Flash's text model: 8 decoder layers, of which 3 and 7 are indexed attention (pools of 4 keys), the
# rest KDA linear attention; MoE from layer 3. The vision tower is the smallest its config takes.
TINY_GLM5_NEXT = dict(
    vocab_size=257, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
    q_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, index_topk=16, index_head_dim=16, index_n_heads=4,
    index_kpool=4, linear_head_dim=16, linear_num_heads=4, hc_mult=2, hc_sinkhorn_iters=2,
    max_position_embeddings=512, pad_token_id=0,
)
TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16)
_CONFIGS = {"glm_moe_dsa": (GlmMoeDsaConfig, TINY_DSA), "deepseek_v32": (DeepseekV32Config, TINY_DSA),
            "deepseek_v4": (DeepseekV4Config, TINY_DEEPSEEK_V4), "glm5_next": (Glm5NextConfig, TINY_GLM5_NEXT)}


def tiny_config(model_type: str = "glm_moe_dsa", **overrides):
    """A DSA config small enough for CPU tests; `index_topk` stays below typical test lengths so that the
    top-k selection really drops keys (for DeepSeek-V4: below the compressed entries of 64 tokens). For
    glm5_next the overrides go to its text config."""
    if model_type not in _CONFIGS:
        raise ValueError(f"Unknown DSA model_type {model_type!r}; choose from {sorted(_CONFIGS)}.")
    config_class, tiny = _CONFIGS[model_type]
    if model_type == "glm5_next":
        text = {**tiny, **overrides}
        return config_class(text_config=text, vision_config={**TINY_VISION, "out_hidden_size": text["hidden_size"]})
    return config_class(**{**tiny, **overrides})


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """Where a DSA config keeps its layer and indexer settings: the text config of a multimodal one (glm5_next)."""
    return getattr(config, "text_config", None) or config


def model_class(config: PretrainedConfig):
    """The transformers class that builds `config`: the causal-LM auto class, or for a family it does not map
    (glm5_next) the class its adapter names."""
    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return getattr(transformers, adapter.architecture) if adapter else AutoModelForCausalLM


def model_from_config(config: PretrainedConfig, *, trust_remote_code: bool = False, **kwargs) -> torch.nn.Module:
    """A randomly initialised model of `config` (`from_config` of the auto class, or what it calls on the class;
    under a live ZeRO-3 `zero.ZeroContext` both build it as partitions)."""
    cls = model_class(config)
    if cls is AutoModelForCausalLM:
        return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    return cls._from_config(config, **kwargs)


def checkpoint_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """The name `from_pretrained` gives a checkpoint key in `model`: the family's renamings (DeepSeek-V4's
    checkpoints keep DeepSeek's own names, `attn.indexer.wq_b`, ...) and fused tensors' names for their parts,
    else the key itself where the renamings miss while it names a tensor of the model (V4's `.norm.` ->
    `.kv_norm.` also matches `model.norm.weight`, which `from_pretrained` then loads as named)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    names = dict.fromkeys(model.state_dict(), True)

    def renamed(key: str) -> str:
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        return key if name not in names and key in names else name
    return renamed


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use e.g. bfloat16, float32 or auto.")
    return dtype


def check_dsa_config(config: PretrainedConfig, source: str) -> None:
    """A ValueError naming the supported architectures when `config` is not one of them."""
    if getattr(config, "model_type", None) not in ADAPTERS:
        supported = ", ".join(adapter.architecture for adapter in ADAPTERS.values())
        found = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ValueError(f"{source} is a {found} (model_type {getattr(config, 'model_type', None)!r}): IndexCache "
                         f"supports transformers' DSA models, {supported}.")


def check_seq_len(config: PretrainedConfig, seq_len: int) -> None:
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    rate = adapter.config_candidate_rate(config) if adapter is not None else 1
    config = text_config(config)
    if seq_len // rate <= config.index_topk:
        length = f"({seq_len})" if rate == 1 else f"in compressed entries ({seq_len} // compress rate {rate})"
        raise ValueError(
            f"The sequence length {length} must exceed the model's index_topk ({config.index_topk}): shorter "
            "sequences select every candidate and sharing changes nothing."
        )


def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The DSA config at `name_or_path` (config.json only), with clear errors for a missing or foreign model."""
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"No model at {name_or_path!r}: expected a folder holding config.json.")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    check_dsa_config(config, name_or_path)
    return config


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
               attn_implementation: str = SPARSE_ATTENTION, config: PretrainedConfig | None = None,
               fp8: str = "auto") -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` of a DSA model, after `load_config`'s checks, on the sparse
    forward (`attn_implementation="indexcache_sparse"`) or transformers' own attention (`"sdpa"`, ...). Under
    a live ZeRO-3 `zero.ZeroContext` the weights load straight into partitions; an FP8 base takes the `fp8`
    route (fp8.py)."""
    config = config or load_config(name_or_path, trust_remote_code=trust_remote_code)
    check_attn_implementation(config, attn_implementation)
    route = fp8_route(config, fp8, zero3_enabled())
    if zero3_enabled():
        model = load_partitioned(name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                                 attn_implementation=_native(attn_implementation))
        return _maybe_sparse(model, attn_implementation)
    quantization = {"quantization_config": fp8_quantization_config(config, route)} if route else {}
    model = model_class(config).from_pretrained(
        name_or_path, config=config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
        attn_implementation=_native(attn_implementation), **quantization,
    )
    return _maybe_sparse(model, attn_implementation)


def check_attn_implementation(config: PretrainedConfig, attn_implementation: str) -> None:
    """A family the sparse forward does not cover runs on its native attention; say which, before building."""
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None and attn_implementation == SPARSE_ATTENTION and not adapter.on_sparse_forward:
        raise ValueError(f"The sparse forward does not cover {adapter.architecture}'s indexer yet; run it on "
                         f"transformers' native path with model.attn_implementation={adapter.native_attention}.")


def _native(attn_implementation: str) -> str:
    """What transformers builds the model with: the sparse forward is switched on after loading."""
    return "sdpa" if attn_implementation == SPARSE_ATTENTION else attn_implementation


def _maybe_sparse(model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    return use_sparse_forward(model) if attn_implementation == SPARSE_ATTENTION else model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <eos>) for randomly initialised tiny models, which have none."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


class LazyTokenizer:
    """The model's tokenizer, loaded the first time it is called: records of ready `input_ids` never call it,
    so a base folder without tokenizer files trains on them. `loaded` is the tokenizer once called, else None."""

    def __init__(self, cfg):
        self.name_or_path, self.trust_remote_code = cfg.name_or_path, cfg.trust_remote_code
        self.loaded: PreTrainedTokenizerBase | None = None

    def __call__(self) -> PreTrainedTokenizerBase:
        if self.loaded is None:
            self.loaded = self._load()
        return self.loaded

    def _load(self) -> PreTrainedTokenizerBase:
        if not self.name_or_path:
            return byte_tokenizer()  # a random tiny model has no tokenizer of its own
        try:
            return AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The data holds text, which needs a tokenizer, but none could be loaded from {self.name_or_path} "
                f"({type(error).__name__}: {str(error).splitlines()[0]}). Add the tokenizer files to that folder, "
                "or train on records that hold ready `input_ids` (a jsonl/parquet column `input_ids`, "
                "data=files data.files=...), which need no tokenizer."
            ) from error


def load_model_config(cfg) -> PretrainedConfig:
    """The config a `ModelConfig` describes: config.json of `name_or_path`, or the tiny `random_init` one."""
    if cfg.name_or_path:
        return load_config(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if not cfg.random_init:
        raise ValueError("Set model.name_or_path to a DSA checkpoint (or model.random_init for a smoke run).")
    random_init = dict(cfg.random_init)
    return tiny_config(random_init.pop("model_type", "glm_moe_dsa"), **random_init)


def build_model(cfg, config: PretrainedConfig | None = None) -> torch.nn.Module:
    """From a `ModelConfig` (and its `load_model_config`, when already read): load `name_or_path`, or build
    `random_init` from `cfg.seed` for smoke runs."""
    config = config or load_model_config(cfg)
    check_attn_implementation(config, cfg.attn_implementation)
    if cfg.name_or_path:
        return load_model(cfg.name_or_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                          attn_implementation=cfg.attn_implementation, config=config, fp8=cfg.fp8)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype)
    if zero3_enabled():  # built as partitions, which a later .to() would not reach: the dtype goes in first
        model = model_from_config(config, attn_implementation=_native(cfg.attn_implementation),
                                  **({} if dtype == "auto" else {"dtype": dtype}))
    else:
        model = model_from_config(config, attn_implementation=_native(cfg.attn_implementation))
        model = model if dtype == "auto" else model.to(dtype)
    return _maybe_sparse(model, cfg.attn_implementation)


def build_model_and_tokenizer(cfg) -> tuple[torch.nn.Module, LazyTokenizer]:
    """`build_model(cfg)` and the `LazyTokenizer` that goes with it."""
    return build_model(cfg), LazyTokenizer(cfg)
