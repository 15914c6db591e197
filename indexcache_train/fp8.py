"""FP8 bases: checkpoints whose linear weights are block-quantised e4m3 with a `weight_scale_inv` per block
(DeepSeek-V3.2: 128 x 128 blocks, `quantization_config.quant_method: fp8`; transformers' FineGrainedFP8).

`model.fp8` picks the route:

- `native`: transformers' FineGrainedFP8 integration keeps the frozen base in FP8 (`FP8Linear`). Its kernels
  come from the `kernels` package (the hub kernel kernels-community/finegrained-fp8) and need a GPU of compute
  capability >= 8.9. The indexers are left out of the conversion (`modules_to_not_convert`), so the trained
  ones are bf16 / fp32 tensors that transformers dequantises as they load; so is `kv_b_proj`, whose weight
  the absorbed teacher and the sparse attention read directly. ZeRO stages 0-2 only: transformers
  does not build a quantised model under `deepspeed.zero.Init`.
- `dequantize`: every FP8 block becomes `model.dtype` as it loads, the documented route where the kernels are
  missing and the one ZeRO-3 takes: `FineGrainedFP8Config(dequantize=True)` on ZeRO 0-2, and on ZeRO-3 the
  layer-by-layer partitioned loader (`zero.load_partitioned`), which calls `dequantize_block_fp8`.
- `auto`: `native` where its kernels are installed and ZeRO-3 is off, else `dequantize` under ZeRO-3, else a
  clear error that names what to install.

The export copies the base's FP8 shards unchanged; only the trained indexer tensors are rewritten, in bf16,
with their `weight_scale_inv` dropped and the indexers listed in `modules_to_not_convert` (export.py).
"""

from __future__ import annotations

import importlib.util

import torch

FP8_ROUTES = ("auto", "native", "dequantize")
DEFAULT_BLOCK = (128, 128)
# transformers matches modules_to_not_convert from the start of a module's name, as a regex up to a boundary
INDEXER_MODULES = [r".*\.indexer"]
# Loaded in bf16 as well: the absorbed teacher and the sparse attention read kv_b_proj's weight directly
READ_DIRECTLY = [r".*\.kv_b_proj"]


def quant_method(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method))


def is_block_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                         block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """weight [N, K] in FP8 times its per-block scale [ceil(N/bn), ceil(K/bk)], in `dtype`."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    # transformers' own block dequantisation, in fp32 so that the scale multiplies exactly, then cast
    return _dequantize_fp8_weight(weight, scale_inv.float(), list(block), torch.float32).to(dtype)


def block_size(config) -> tuple[int, int]:
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return tuple(quant.get("weight_block_size") or DEFAULT_BLOCK)


def fp8_kernels_missing() -> str | None:
    """Why transformers' FP8 kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"the GPU has compute capability {major}.{minor}; FP8 matmuls need 8.9 or newer (H100/H200)"
    if importlib.util.find_spec("kernels") is None:
        return "the `kernels` package is not installed (`pip install kernels`; it fetches kernels-community/finegrained-fp8)"
    return None


def resolve_route(config, route: str, zero3: bool) -> str | None:
    """The FP8 route for a checkpoint config (None: not an FP8 checkpoint)."""
    if route not in FP8_ROUTES:
        raise ValueError(f"model.fp8={route!r}; choose from {FP8_ROUTES}.")
    if quant_method(config) != "fp8":
        return None
    if route == "native" and zero3:
        raise ValueError("model.fp8=native keeps the base in FP8, which transformers cannot partition under ZeRO-3: "
                         "use model.fp8=dequantize (bf16 partitions) or deepspeed.zero_stage <= 2.")
    if route == "auto":
        route = "dequantize" if zero3 else ("native" if fp8_kernels_missing() is None else None)
        if route is None:
            raise RuntimeError(f"This base is stored in FP8, but transformers' FP8 kernels cannot run: "
                               f"{fp8_kernels_missing()}. Install them, or set model.fp8=dequantize to load the base "
                               "in model.dtype (twice the memory of FP8).")
    if route == "native" and fp8_kernels_missing() is not None:
        raise RuntimeError(f"model.fp8=native needs transformers' FP8 kernels: {fp8_kernels_missing()}. "
                           "Or set model.fp8=dequantize.")
    return route


def export_quantization(base_config: dict) -> dict | None:
    """The base's FP8 `quantization_config` for an export whose indexers are bf16, or None for a bf16 base."""
    quant = base_config.get("quantization_config")
    if not quant or quant.get("quant_method") != "fp8":
        return None
    keep = list(quant.get("modules_to_not_convert") or [])
    return {**quant, "modules_to_not_convert": keep + [m for m in INDEXER_MODULES if m not in keep]}


def quantization_config(config, route: str):
    """The `quantization_config` argument for `from_pretrained` on ZeRO 0-2."""
    from transformers import FineGrainedFP8Config

    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    keep = list(quant.get("modules_to_not_convert") or [])
    return FineGrainedFP8Config(
        activation_scheme=quant.get("activation_scheme", "dynamic"),
        weight_block_size=tuple(quant.get("weight_block_size") or DEFAULT_BLOCK),
        modules_to_not_convert=keep + [m for m in INDEXER_MODULES + READ_DIRECTLY if m not in keep],
        dequantize=route == "dequantize",
    )
