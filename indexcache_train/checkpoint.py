"""Trainer checkpoints: `<output_dir>/checkpoints/step<N>/`, written atomically, resumed exactly.

A checkpoint holds DeepSpeed's optimizer, scheduler and engine state of the trainable tensors only
(`exclude_frozen_parameters`), the data loader's position (DeepSpeed's client state), every rank's RNG
state, and `trainable.safetensors`, the F-layer indexer tensors that `indexcache-export` reads. It is written
under a temporary tag and renamed once every rank is done, then `checkpoints/latest` names it.

The RNG states are stored as safetensors plus JSON metadata, so reading them cannot run code (a pickle could).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .export import RUN_NAME, TRAINABLE_NAME, trained_indexer_state
from .files import write_text_atomically

CHECKPOINTS = "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / CHECKPOINTS / "latest"
    return output_dir / CHECKPOINTS / pointer.read_text().strip() if pointer.is_file() else None


def resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: `None` starts afresh (refusing to overwrite checkpoints), `auto` takes
    the latest in `output_dir` if any, anything else is a checkpoint folder."""
    if resume is None:
        if latest_checkpoint(output_dir) is not None:
            raise FileExistsError(f"{output_dir} already holds checkpoints: pass resume=auto to continue, or "
                                  "choose another output_dir.")
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint folder.")
    return path


def save_checkpoint(engine, model, output_dir: Path, step: int, loader, run_info: dict, rank: int) -> Path:
    """Write `checkpoints/step{N}` of `engine` (wrapping the DSA `model`) atomically; every rank calls it.
    `run_info` goes to `run.json`."""
    root = output_dir / CHECKPOINTS
    tag, temporary = f"step{step}", f".tmp-step{step}"
    engine.save_checkpoint(str(root), tag=temporary, client_state={"step": step, "loader": loader.state_dict()},
                           save_latest=False, exclude_frozen_parameters=True)
    save_rng_state(root / temporary / f"rng_rank{rank}.safetensors")
    state = trained_indexer_state(model)  # every rank: under ZeRO-3 it gathers collectively
    if rank == 0:
        save_file(state, str(root / temporary / TRAINABLE_NAME))
    torch.distributed.barrier()
    if rank == 0:
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(root / temporary, root / tag)
        write_text_atomically(root / "latest", tag)
        write_text_atomically(output_dir / RUN_NAME, json.dumps({**run_info, "step": step}, indent=2))
    torch.distributed.barrier()
    return root / tag


def load_checkpoint(engine, path: Path, loader, rank: int) -> int:
    """Restore the engine, the loader's position and this rank's RNG state; return the step."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if client_state is None:
        raise FileNotFoundError(f"No DeepSpeed checkpoint could be read from {path}.")
    loader.load_state_dict(client_state["loader"])
    load_rng_state(path / f"rng_rank{rank}.safetensors")
    return client_state["step"]


def save_rng_state(path: Path) -> None:
    """Python's, NumPy's, torch's and every CUDA device's generator state, without pickle."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {"python": json.dumps(random.getstate()),
                "numpy": json.dumps([name, int(position), int(has_gauss), float(cached_gaussian)])}
    save_file(tensors, str(path), metadata=metadata)


def load_rng_state(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint holds no RNG state for this rank (was it "
                                "written by a run with another number of ranks, or by an older version?).")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle is not a dict)
    version, state, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(state), gauss))
    name, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(sum(key.startswith("cuda") for key in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
