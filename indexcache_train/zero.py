"""Models larger than one GPU: ZeRO-3 partitioned loading, a layer-by-layer gathered forward, and DeepSpeed's
parameter / optimizer offload settings.

Loading under ZeRO-3 goes through transformers' own DeepSpeed integration:

1. an `HfDeepSpeedConfig` of the run's DeepSpeed config stays alive (`ZeroContext`), so transformers builds the
   model under `deepspeed.zero.Init`: every parameter is partitioned as it is created and no rank ever holds
   more than its 1/world share plus the one module being initialised;
2. the weights are read one decoder layer at a time (`load_partitioned`): rank 0 reads that layer's tensors
   from the safetensors shards, the other ranks only their shapes (meta), and transformers'
   `_load_state_dict_into_zero3_model` gathers each module, copies and re-partitions it, applying the
   checkpoint's weight conversions (the fused MoE experts). `from_pretrained` itself maps every shard at
   once on rank 0, so that rank's resident memory would reach the size of the model; here it stays at one
   layer. Block-quantised FP8 tensors (`weight_scale_inv`, DeepSeek-V3.2) are dequantised on the way
   (`fp8.dequantize_block_fp8`), since transformers does not partition a quantised model.

After loading, the base is gathered layer by layer in every forward: by the DeepSpeed engine's hooks once
`deepspeed.initialize` has run, and by `gathered_forward` before that (the trainer's "as loaded" loss).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .fp8 import block_size, dequantize_block_fp8, is_block_fp8, quant_method
from .runtime import zero3_gathered

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
_LAYER_KEY = re.compile(r"^(.*?\.layers\.\d+)\.")


# --------------------------------------------------------------------------------------------- config
def zero_settings(ds_cfg) -> dict:
    """The DeepSpeed config keys of a `DeepSpeedConfig`'s ZeRO stage and offload settings."""
    section = {"stage": ds_cfg.zero_stage}
    settings = {"zero_optimization": section}
    if ds_cfg.offload_param != "none":
        if ds_cfg.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_param={ds_cfg.offload_param} needs ZeRO-3 (deepspeed.zero_stage=3, "
                             "or deepspeed=zero3_offload): only ZeRO-3 partitions the parameters it would offload.")
        section["offload_param"] = _offload(ds_cfg.offload_param, ds_cfg.nvme_path, "offload_param")
    if ds_cfg.offload_optimizer != "none":
        if ds_cfg.zero_stage == 0:
            raise ValueError(f"deepspeed.offload_optimizer={ds_cfg.offload_optimizer} needs ZeRO stage 1, 2 or 3.")
        section["offload_optimizer"] = _offload(ds_cfg.offload_optimizer, ds_cfg.nvme_path, "offload_optimizer")
        # DeepSpeed refuses a client optimizer with an offloaded state unless told; the indexers' AdamW is small.
        settings["zero_force_ds_cpu_optimizer"] = False
    return settings


def _offload(device: str, nvme_path: str | None, key: str) -> dict:
    if device not in OFFLOAD_DEVICES:
        raise ValueError(f"deepspeed.{key}={device!r}; choose from {OFFLOAD_DEVICES}.")
    entry = {"device": device, "pin_memory": torch.cuda.is_available()}  # pinning needs a GPU
    if device == "nvme":
        if not nvme_path:
            raise ValueError(f"deepspeed.{key}=nvme needs deepspeed.nvme_path: a folder on a local NVMe drive.")
        entry["nvme_path"] = str(nvme_path)
    return entry


class ZeroContext:
    """Keeps transformers' `HfDeepSpeedConfig` alive for the run when the DeepSpeed config is ZeRO-3.

    transformers holds it by a weak reference: it must outlive `from_pretrained` / `from_config` (which then
    build under `deepspeed.zero.Init`) and every later call that asks `is_deepspeed_zero3_enabled()`.
    """

    def __init__(self, ds_config: dict):
        self.enabled = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        self._hf_config = None
        if self.enabled:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(ds_config)

    def close(self) -> None:
        if self._hf_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_config = None


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


# --------------------------------------------------------------------------------------------- loading
def load_partitioned(name_or_path: str, *, dtype, trust_remote_code: bool = False,
                     attn_implementation: str = "sdpa") -> nn.Module:
    """A local safetensors checkpoint loaded straight into ZeRO-3 partitions, one decoder layer at a time.

    Needs a live `ZeroContext` (ZeRO-3) and the process group; every rank calls it.
    """
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.integrations.deepspeed import _load_state_dict_into_zero3_model
    from transformers.modeling_utils import LoadStateDictConfig

    from .modeling import (  # modeling imports this module
        checkpoint_renamer,
        model_from_config,
    )

    if not zero3_enabled():
        raise RuntimeError("load_partitioned needs a live ZeroContext of a ZeRO-3 DeepSpeed config.")
    folder = Path(name_or_path).expanduser()
    weight_map = _weight_map(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    block = block_size(config)
    method = quant_method(config)
    if method is not None:
        if method != "fp8":
            raise ValueError(f"{folder} is quantised with {method!r}; ZeRO-3 loading dequantises only block FP8.")
        del config.quantization_config  # the partitioned model is built in `dtype`; the FP8 tensors dequantised below
    if dtype == "auto":  # the checkpoint's own dtype; an FP8 one loads as bf16
        dtype = getattr(torch, str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch."))
        dtype = torch.bfloat16 if dtype.itemsize == 1 else dtype
    # transformers initialises the partitions module by module (gathered); the checkpoint then overwrites them
    model = model_from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)
    converting = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model))
    as_named = LoadStateDictConfig()  # for keys whose name is already the model's (see `checkpoint_renamer`)
    model_name = checkpoint_renamer(model)
    reader = torch.distributed.get_rank() == 0
    modules = dict(model.named_modules())
    never_loaded = None
    for prefix, keys in _layer_groups(weight_map).items():
        if prefix and prefix not in modules:
            continue  # a layer the model does not build, such as the multi-token-prediction layer
        state_dict = _read_group(folder, keys, weight_map, reader, dtype, block)
        named = {key: state_dict.pop(key) for key in [k for k in state_dict if model_name(k) == k]}
        for part, load_config in ((state_dict, converting), (named, as_named)):
            if not part:
                continue
            errors, missing = _load_state_dict_into_zero3_model(model, part, load_config)
            if errors:
                raise RuntimeError(f"Loading {folder} into ZeRO-3 partitions failed: {errors[:3]}")
            never_loaded = set(missing) if never_loaded is None else never_loaded & set(missing)
        del state_dict, named
    params = {name for name, _ in model.named_parameters()}
    unloaded = sorted(params & (never_loaded or set()))
    if unloaded:
        raise ValueError(f"{folder} holds no tensor for {len(unloaded)} of the model's parameters, e.g. "
                         f"{unloaded[:3]}: is it a checkpoint of this architecture?")
    return model.eval()


def _weight_map(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single.name)
    raise FileNotFoundError(f"ZeRO-3 loading reads a local folder of safetensors; {folder} holds none. Download "
                            "the checkpoint first (`hf download <name> --local-dir DIR`) and pass that folder.")


def _layer_groups(weight_map: dict[str, str]) -> dict[str, list[str]]:
    """Checkpoint keys by decoder layer (the MoE conversions need a layer's experts together); the rest as one."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in weight_map:
        match = _LAYER_KEY.match(key)
        groups[match.group(1) if match else ""].append(key)
    return groups


def _read_group(folder: Path, keys: list[str], weight_map: dict[str, str], reader: bool, dtype, block) -> dict:
    """Rank 0: the tensors (FP8 blocks dequantised), mapped from the shards rather than read, so that only the
    pages this layer touches come in; other ranks: meta tensors of the same shapes."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_shard[weight_map[key]].append(key)
    state_dict = {}
    for shard, shard_keys in by_shard.items():
        with safe_open(folder / shard, framework="pt") as f:
            for key in shard_keys:
                if reader:
                    state_dict[key] = f.get_tensor(key)
                else:
                    piece = f.get_slice(key)
                    state_dict[key] = torch.empty(piece.get_shape(), dtype=_dtype(piece.get_dtype()), device="meta")
    for key in [k for k in state_dict if k.endswith(".weight_scale_inv")]:
        weight_key = key.removesuffix("_scale_inv")
        scale = state_dict.pop(key)
        if weight_key in state_dict and is_block_fp8(state_dict[weight_key]):
            weight = state_dict[weight_key]
            state_dict[weight_key] = (dequantize_block_fp8(weight, scale, dtype, block) if reader
                                      else torch.empty(weight.shape, dtype=dtype, device="meta"))
    return state_dict


def _dtype(name: str) -> torch.dtype:
    from transformers.modeling_utils import str_to_torch_dtype

    return str_to_torch_dtype[name]


# --------------------------------------------------------------------------------------------- placement
def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)`, except that ZeRO-3 partitions stay where DeepSpeed put them (only buffers move)."""
    if not is_partitioned(model):
        return model.to(device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model


@contextlib.contextmanager
def gathered_forward(model: nn.Module) -> Iterator[None]:
    """Forwards inside the block gather each module's ZeRO-3 partitions just for its own forward, so a model
    that no DeepSpeed engine wraps yet runs with one module whole at a time; a no-op for ordinary models."""
    if not is_partitioned(model):
        yield
        return
    handles, open_gathers = [], {}

    def gather(module, args):
        open_gathers[id(module)] = zero3_gathered(module.parameters(recurse=False))
        open_gathers[id(module)].__enter__()

    def release(module, args, output):
        gathered = open_gathers.pop(id(module), None)
        if gathered is not None:
            gathered.__exit__(None, None, None)

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(gather))
        handles.append(module.register_forward_hook(release))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for gathered in open_gathers.values():
            gathered.__exit__(None, None, None)
