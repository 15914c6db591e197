"""`indexcache-export`: write an IndexCache model as a Hugging Face folder that loads without this package.

The folder holds:
- `config.json` with the pattern keys (`index_topk_pattern`, `indexer_types`, `use_index_cache`, and
  `index_topk_freq`/`index_skip_topk_offset` when the pattern is uniform), so that transformers' GlmMoeDsa
  builds its S layers without indexers and vLLM/SGLang switch sharing on (DeepSeek-V4: `index_topk_pattern`
  over its CSA layers and `use_index_cache`, see `DeepseekV4Adapter`);
- safetensors without the S-layer indexer tensors, with the trained F-layer indexer tensors, and every
  other tensor bitwise identical to the base;
- the base's other files (tokenizer, generation config, ...) and a model card, `README.md`.

With a local base that holds safetensors, its shards are copied one at a time and only the indexer tensors
change, so a model of hundreds of billions of parameters exports with one shard in memory. Without one (a
randomly initialised smoke model), the model is written with `save_pretrained`.

    indexcache-export outputs/run/checkpoints/step1000 [--output DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import apply_indexcache, current_pattern, get_adapter
from .config import ModelConfig
from .fp8 import export_quantization, is_block_fp8
from .modeling import build_model_and_tokenizer, checkpoint_renamer, resolve_dtype
from .pattern import IndexCachePattern
from .runtime import rank, zero3_gathered

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TRAINABLE_NAME = "trainable.safetensors"
RUN_NAME = "run.json"
# Base files left behind: weights (rewritten shard by shard, or superseded) and the files written fresh.
_NOT_COPIED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
               "config.json", "README.md", ".*")
_STALE_SCHEDULE_KEYS = ("index_topk_freq", "index_skip_topk_offset")


# --------------------------------------------------------------------------------------------- export
def export_indexcache(model: nn.Module, output_dir: str | os.PathLike, *, base_path: str | os.PathLike | None = None,
                      tokenizer=None, model_card: dict[str, Any] | None = None) -> Path:
    """Write `model`, switched to IndexCache by `apply_indexcache`, to `output_dir` and return that path.

    Args:
        model: a transformers DSA model whose S layers have no indexer.
        output_dir: the export folder. It is written as a hidden sibling and renamed into place once
            complete, so an existing export is only replaced by a finished one.
        base_path: the local folder the model was loaded from. When it holds safetensors, its shards are
            copied with the indexer tensors rewritten; its other files (tokenizer, generation config, ...)
            are copied in every case.
        tokenizer: saved into the folder when given.
        model_card: free-form facts for the model card, such as steps and final metrics.

    Under DeepSpeed ZeRO-3 every rank must call this, since the parameters it reads are gathered
    collectively; only rank 0 writes.
    """
    output_dir = Path(output_dir)
    adapter = get_adapter(model)
    pattern = current_pattern(model)
    leftover = [layer for layer in pattern.shared_layers if adapter.indexer(model, layer) is not None]
    if leftover:
        raise ValueError(f"Layers {leftover} are S in {pattern} but still hold an indexer: call "
                         "`apply_indexcache(model, pattern)` before exporting.")
    base_path = Path(base_path) if base_path is not None else None
    base_weights = _weight_map(base_path) if base_path is not None else None

    if base_weights is None:
        gathered, trained, dropped = list(model.parameters()), {}, ()
    else:
        gathered, trained, dropped = [], trained_indexer_state(model), shared_indexer_prefixes(model)

    with zero3_gathered(gathered):
        if rank() == 0:
            with _atomic_folder(output_dir) as staging:
                if base_weights is None:
                    model.save_pretrained(staging)
                else:
                    _copy_base_shards(base_path, base_weights, staging, trained, dropped, checkpoint_renamer(model))
                if base_path is not None:
                    _copy_base_files(base_path, staging)
                _save_config(model.config, pattern, staging, base_path, adapter.export_config_keys(pattern))
                if tokenizer is not None:
                    tokenizer.save_pretrained(staging)
                (staging / "README.md").write_text(render_model_card(pattern, adapter.architecture, model_card))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank moves on (e.g. to read the export) before rank 0 has finished
    return output_dir


def full_indexers(model: nn.Module) -> dict[str, nn.Module]:
    """The F-layer indexers by module name (their state_dict prefix)."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    indexers = (adapter.indexer(model, layer) for layer in current_pattern(model).full_layers)
    return {names[id(indexer)]: indexer for indexer in indexers}


def trained_indexer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The F-layer indexer tensors on the CPU, named as in `model.state_dict()`, gathered from ZeRO-3
    partitions when needed (every rank must call it then). `load_trainable` reads them back."""
    indexers = full_indexers(model)
    with zero3_gathered([p for indexer in indexers.values() for p in indexer.parameters()]):
        return {f"{prefix}.{key}": tensor.detach().to("cpu", copy=True)
                for prefix, indexer in indexers.items() for key, tensor in indexer.state_dict().items()}


def shared_indexer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state_dict prefixes the S-layer indexers had; their tensors stay out of the export."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    return tuple(f"{names[id(adapter.indexer_owner(model, layer))]}.indexer."
                 for layer in current_pattern(model).shared_layers)


def _weight_map(base_path: Path) -> dict[str, str] | None:
    """{tensor name: shard file} of a base folder's safetensors, or None when it has none."""
    if not base_path.is_dir():
        raise FileNotFoundError(f"No base model folder at {base_path}.")
    index = base_path / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = base_path / SAFE_WEIGHTS_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
    return None


def _copy_base_shards(base_path: Path, weight_map: dict[str, str], staging: Path, trained: dict[str, torch.Tensor],
                      dropped: tuple[str, ...], model_name: Callable[[str], str]) -> None:
    """Copy the base shards one at a time, without the `dropped` prefixes and with `trained` swapped in; both
    are named as in the model, the base's tensors as in its checkpoint (`model_name` maps those to these), and
    the export keeps the checkpoint's names."""
    names = {key: model_name(key) for key in weight_map}
    unmatched = sorted(set(trained) - set(names.values()))
    if unmatched:
        raise ValueError(f"The base at {base_path} has no tensor named {unmatched[:3]}: the trained F-layer indexer "
                         "tensors must replace base tensors of the same name.")
    # A trained tensor whose base is FP8 is written in bf16, so its block scales go (fp8.export_quantization
    # keeps the indexers out of the FP8 conversion when transformers loads the export).
    stale_scales = {f"{key}_scale_inv" for key, name in names.items()
                    if name in trained and f"{key}_scale_inv" in weight_map}
    removed = {key for key, name in names.items() if name.startswith(dropped)} | stale_scales
    new_map: dict[str, str] = {}
    total_size = 0
    touched = {key for key, name in names.items() if name in trained} | removed
    for shard in sorted(set(weight_map.values())):
        keys = [key for key, file in weight_map.items() if file == shard]
        if not touched.intersection(keys):  # nothing to rewrite: the base's bytes, FP8 or not, unchanged
            shutil.copyfile(base_path / shard, staging / shard)
            new_map.update(dict.fromkeys(keys, shard))
            total_size += _nbytes(base_path / shard)
            continue
        tensors = {}
        with safe_open(base_path / shard, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if key in removed:
                    continue
                tensor, name = f.get_tensor(key), names[key]
                tensors[key] = _like_base(key, trained[name], tensor) if name in trained else tensor
        if tensors:
            save_file(tensors, staging / shard, metadata=metadata)
            new_map.update(dict.fromkeys(tensors, shard))
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index_path = base_path / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["metadata"] = {**index.get("metadata", {}), "total_size": total_size}
        index["weight_map"] = dict(sorted(new_map.items()))
        (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(shard: Path) -> int:
    """The tensor bytes of a safetensors file, read from its header."""
    from transformers.modeling_utils import str_to_torch_dtype

    with safe_open(shard, framework="pt") as f:
        pieces = [f.get_slice(key) for key in f.keys()]  # noqa: SIM118 (a safetensors handle is not a dict)
        return sum(math.prod(p.get_shape()) * str_to_torch_dtype[p.get_dtype()].itemsize for p in pieces)


def _like_base(key: str, trained: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    if trained.shape != base.shape:
        raise ValueError(f"{key} has shape {tuple(trained.shape)} in the model but {tuple(base.shape)} in the base.")
    if is_block_fp8(base):  # the trained indexers stay out of FP8
        return trained.to(torch.bfloat16).contiguous()
    return trained.to(base.dtype).contiguous()


def _copy_base_files(base_path: Path, staging: Path) -> None:
    for file in sorted(base_path.iterdir()):
        skip = any(fnmatch.fnmatch(file.name, pattern) for pattern in _NOT_COPIED)
        if file.is_file() and not skip and not (staging / file.name).exists():
            shutil.copy2(file, staging / file.name)


def _save_config(config, pattern: IndexCachePattern, staging: Path, base_path: Path | None = None,
                 keys: dict[str, Any] | None = None) -> None:
    config = copy.deepcopy(config)
    keys = pattern.to_config_dict() if keys is None else keys
    config.update(keys)
    base_config = base_path / "config.json" if base_path is not None else None
    if base_config is not None and base_config.is_file():
        # An FP8 base loaded dequantised has no quantization_config left; its copied shards still need one.
        quantization = export_quantization(json.loads(base_config.read_text()))
        if quantization is not None:
            config.quantization_config = quantization
    for key in _STALE_SCHEDULE_KEYS:  # left by an earlier uniform pattern, they would contradict this one
        if key not in keys and key in config.__dict__:
            delattr(config, key)
    config.save_pretrained(staging)


@contextlib.contextmanager
def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target` to write into; it replaces `target` only if the block
    finishes, and is removed if it raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # A folder cannot be renamed over a non-empty one, so the old export steps aside first.
    retired = target.parent / f".{target.name}.old-{tag}"
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------------------------- model card
def render_model_card(pattern: IndexCachePattern, architecture: str, facts: dict[str, Any] | None = None) -> str:
    groups = "\n".join(f"| {source} | {', '.join(map(str, served)) or '-'} |"
                       for source, served in pattern.groups.items())
    lines = [
        "---", "library_name: transformers", "tags:", "- indexcache", "- deepseek-sparse-attention", "---", "",
        f"# {architecture} with IndexCache", "",
        (f"The lightning indexer runs on {len(pattern.full_layers)} of {pattern.num_layers} layers (F); each S "
         "layer reuses the top-k of the nearest F layer before it (IndexCache, arXiv 2603.12201)."), "",
        "| | |", "|---|---|",
        f"| pattern | `{pattern}` |",
        f"| indexers kept | {pattern.retention:.1%} |",
    ]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in (facts or {}).items()]
    lines += ["", "## Groups", "", "| F layer | S layers it serves |", "|---|---|", groups, "", "## Loading", ""]
    if architecture == "GlmMoeDsaForCausalLM":
        lines += ["transformers builds the S layers without indexers from `config.json`:", "", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```"]
    elif architecture == "Glm5NextForConditionalGeneration":
        lines += [("The pattern runs over the `indexed_attention` layers, in order. transformers builds the S "
                   "layers without indexers from `text_config.indexer_types`, but its forward hands a top-k on "
                   "only to a directly following layer, not across the linear-attention layers; "
                   "`apply_indexcache` relays it:"), "", "```python",
                  "from transformers import Glm5NextForConditionalGeneration", "",
                  "from indexcache_train.adapters import apply_indexcache, current_pattern", "",
                  'model = Glm5NextForConditionalGeneration.from_pretrained("path/to/this/folder")',
                  "apply_indexcache(model, current_pattern(model))", "```"]
    else:
        lines += [(f"transformers' {architecture} has no native sharing and re-creates the S-layer indexers at "
                   "random on load; `apply_indexcache` removes them and shares the top-k:"), "", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  "from indexcache_train import IndexCachePattern, apply_indexcache", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  "apply_indexcache(model, IndexCachePattern.from_config(model.config))", "```"]
    lines += ["", "vLLM and SGLang read `index_topk_pattern` from `config.json` directly (`index_topk_freq` and "
              "`index_skip_topk_offset` when it is absent).", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------- CLI
def export_checkpoint(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Export a trainer checkpoint `<run>/checkpoints/step{N}/` (default output: `<run>/export`).

    The run folder's `run.json` names the base model and the pattern; the checkpoint's
    `trainable.safetensors` holds every F-layer indexer tensor, named as in the model's state_dict.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"No trainer checkpoint folder at {checkpoint_dir}.")
    trainable_path = checkpoint_dir / TRAINABLE_NAME
    run_dir = checkpoint_dir.parent.parent
    run_path = run_dir / RUN_NAME
    for path in (trainable_path, run_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: expected a checkpoint `<run>/checkpoints/step<N>/` holding "
                                    f"{TRAINABLE_NAME}, under a run folder holding {RUN_NAME}.")
    run = json.loads(run_path.read_text())
    model_cfg = OmegaConf.create({**asdict(ModelConfig()), **run["model"]})

    # A local safetensors base is only copied shard by shard, so the model needs no weights but the indexers'.
    base_path = Path(model_cfg.name_or_path) if model_cfg.name_or_path else None
    if base_path is not None and base_path.is_dir() and _weight_map(base_path) is not None:
        model, tokenizer = _skeleton(base_path, model_cfg), None
    else:
        model, lazy_tokenizer = build_model_and_tokenizer(model_cfg)
        base_path = base_path if base_path is not None and base_path.is_dir() else None
        tokenizer = lazy_tokenizer() if base_path is None else None  # a local base's files are copied
    apply_indexcache(model, run["pattern"])
    load_trainable(model, trainable_path)

    match = re.fullmatch(r"step(\d+)", checkpoint_dir.name)
    step = int(match.group(1)) if match else run.get("step")
    card = {"base model": model_cfg.name_or_path or "random init", "step": step}
    if step == run.get("step"):  # the run's final metrics describe this checkpoint only if it is the last one
        card.update(run.get("metrics") or {})
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "export"
    return export_indexcache(model, output_dir, base_path=base_path, tokenizer=tokenizer, model_card=card)


def _skeleton(base_path: Path, model_cfg) -> nn.Module:
    """The base architecture on the meta device: no memory for weights that are copied from the shards."""
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=model_cfg.trust_remote_code)
    dtype = resolve_dtype(model_cfg.dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=config.dtype if dtype == "auto" else dtype,
                                                trust_remote_code=model_cfg.trust_remote_code)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load the trained F-layer indexer tensors; the file must hold exactly those of the model's pattern."""
    tensors = load_file(path)
    expected = {f"{prefix}.{key}" for prefix, indexer in full_indexers(model).items() for key in indexer.state_dict()}
    unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unexpected:
        raise ValueError(f"{path} holds tensors that are not F-layer indexer tensors of the pattern "
                         f"{current_pattern(model)}: {unexpected[:5]}.")
    if missing:
        raise ValueError(f"{path} lacks F-layer indexer tensors of the pattern {current_pattern(model)}: "
                         f"{missing[:5]}.")
    meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(tensors, strict=False, assign=meta)  # assign: a meta skeleton has no storage to copy into


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="indexcache-export",
        description="Export an IndexCache trainer checkpoint as a Hugging Face folder that vLLM, SGLang and "
                    "transformers load with sharing on.")
    parser.add_argument("checkpoint_dir", help="a trainer checkpoint, <output_dir>/checkpoints/step<N>")
    parser.add_argument("--output", help="the export folder (default: <output_dir>/export)")
    args = parser.parse_args(argv)
    try:
        output = export_checkpoint(args.checkpoint_dir, args.output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"Exported {args.checkpoint_dir} to {output}")
    return output


if __name__ == "__main__":
    main()
