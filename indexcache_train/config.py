"""Typed schemas of the Hydra configs under `configs/`, registered in Hydra's ConfigStore so that a typo
in an override fails at start-up rather than deep inside a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a transformers DSA checkpoint: local folder or hub name
    dtype: str = "auto"  # auto, bfloat16, float32, ...
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    random_init: dict[str, Any] | None = None  # without name_or_path: a tiny config for smoke runs
    seed: int = 0


@dataclass
class DataConfig:
    files: Any = None  # a path, a glob or a list of them (jsonl, json, parquet, txt)
    hub_name: str | None = None  # a datasets hub name, when online
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 2
    max_records: int | None = None
    seed: int = 0


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pattern: Any = 0.25  # an F/S string or a retention ratio (uniform, the paper's FSSS...)
    num_batches: int | None = 8  # None: the whole split
    device: str = "auto"
    output_dir: str = "outputs/eval"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=EvalConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="data", name="data_schema", node=DataConfig)
