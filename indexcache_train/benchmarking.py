"""What the GPU benchmarks under `scripts/` share: the DeepSeek-V3.2-shaped stack, timing with warm-up and
medians, peak memory, and writing JSON + markdown results."""

from __future__ import annotations

import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .files import write_text_atomically
from .kernels.sparse_mla import flashmla_available
from .runtime import run_environment

GIB = 1024**3


def dsv32_shaped_config(num_layers: int = 4, **overrides):
    """A GlmMoeDsa config with DeepSeek-V3.2's attention and indexer shapes and dense MLPs: hidden 7168, 128
    heads, MLA q_lora 1536 / kv_lora 512, qk 128 + 64, v 128, indexer 64 x 128, top-k 2048. With 4 layers it
    is 2.85B parameters (5.3 GiB in bf16)."""
    from transformers import GlmMoeDsaConfig

    shape = dict(
        vocab_size=32000, hidden_size=7168, intermediate_size=18432, num_hidden_layers=num_layers,
        first_k_dense_replace=num_layers, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, index_n_heads=64,
        index_head_dim=128, index_topk=2048, max_position_embeddings=262144,
    )
    return GlmMoeDsaConfig(**{**shape, **overrides})


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what the last measurement left (its tensors, the allocator's cache), so that the next peak starts
    from what is still alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3) -> dict:
    """Median wall time of `repeats` calls after `warmup` untimed ones (device-synchronised), the peak
    memory allocated during the timed calls, and the last call's value when it is a scalar tensor (a loss).
    An out-of-memory error gives {"oom": True}."""
    try:
        for _ in range(warmup):
            fn()
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn()
            synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    result = {"seconds": statistics.median(times), "runs": times, "peak_gib": peak}
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        result["value"] = value.item()
    return result


def fmt_seconds(result: dict | None) -> str:
    if not result:
        return ""
    if result.get("oom"):
        return "OOM"
    seconds = result["seconds"]
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def fmt_gib(result: dict | None) -> str:
    if not result or result.get("oom") or result.get("peak_gib") is None:
        return ""
    return f"{result['peak_gib']:.1f}"


def write_results(out: str | Path, name: str, rows: list[dict], table: str, **meta) -> None:
    """`{out}/{name}.json` (rows, the command, the device) and `{out}/{name}.md` (the table and the command)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    environment = run_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # The sparse forward's default attention kernel on this machine (FlashMLA where installed).
    environment["flash_mla_installed"] = flashmla_available()
    record = {"command": command, **environment, **meta, "rows": rows}
    write_text_atomically(out / f"{name}.json", json.dumps(record, indent=1) + "\n")
    write_text_atomically(out / f"{name}.md", f"Command: `{command}` ({environment['device']})\n\n{table}\n")
