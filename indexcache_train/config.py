"""Typed schemas of the Hydra configs under `indexcache_train/configs/`, registered in Hydra's ConfigStore so that a typo
in an override fails at start-up rather than deep inside a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# The YAML ships inside the package (package data), so an installed wheel finds it from any folder. Absolute,
# because Hydra reads a relative config_path against the calling module, which breaks for console scripts.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
# The package's own small pretrained DSA model (scripts/pretrain_tiny.py); configs name it `${embedded_model:}`.
EMBEDDED_MODEL_DIR = str(Path(__file__).resolve().parent / "embedded_model")
OmegaConf.register_new_resolver("embedded_model", lambda: EMBEDDED_MODEL_DIR, replace=True)


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
    eval_files: Any = None  # held-out files for the before/after table; default: the stdlib validation split
    seed: int = 0


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pattern: Any = 0.25  # an F/S string or a retention ratio (uniform, the paper's FSSS...)
    num_batches: int | None = 8  # None: the whole split
    device: str = "auto"
    output_dir: str = "outputs/eval"


@dataclass
class DistillConfig:
    pattern: Any = 0.25  # an F/S string, or a retention ratio (uniform, the paper's FSSS...)
    stage: str = "dense"  # dense | sparse | schedule (dense for `dense_steps`, then sparse)
    dense_steps: int = 0
    kl_backend: str | None = None  # None: Triton on GPU, chunked torch on CPU
    recall_rows: int = 64  # query rows per layer for the logged attention-mass recall; 0 turns it off
    teacher_form: str = "auto"  # auto (absorbed MLA in the sparse stage, expanded in dense) | absorbed | expanded
    selection_chunk_rows: int | None = 4096  # top-k selection in query chunks (O(L) memory); null: native


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    lr_decay_steps: int | None = None  # the cosine's horizon; None: max_steps. Fix it to extend a run later.
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    gradient_clipping: float = 1.0
    save_every: int = 200  # optimizer steps; a run that ends always saves
    eval_batches: int = 4  # validation batches for the before/after table; 0 skips it
    seed: int = 0
    device: str = "auto"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    bf16: Any = "auto"  # auto: bf16 on GPU, fp32 on CPU
    config: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed config


@dataclass
class LoggerConfig:
    mode: str = "offline"  # wandb mode: online | offline | disabled
    project: str = "indexcache"
    name: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: str = "outputs/train"
    resume: str | None = None  # auto: continue from the latest checkpoint in output_dir, if any; or a path
    export: bool = True  # write ${output_dir}/export at the end


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="train_schema", node=TrainConfig)
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("distill", DistillConfig),
                        ("trainer", TrainerConfig), ("deepspeed", DeepSpeedConfig), ("logger", LoggerConfig)):
        store.store(group=group, name=f"{group}_schema", node=node)
