"""Typed schemas of the Hydra configs under `indexcache_train/configs/`, and the one place that registers them.

Importing this module registers nothing. `register_configs()` puts the schemas in Hydra's ConfigStore (each
CLI's `main()` calls it), and `compose_config()` composes a CLI's config in Python (tests, notebooks). Both
paths end in `check_known_keys`, so a mistyped key, even one added with Hydra's `+key=value`, fails at
start-up rather than being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

# The YAML ships inside the package (package data), so an installed wheel finds it from any folder. Absolute,
# because Hydra reads a relative config_path against the calling module, which breaks for console scripts.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
# The package's own small pretrained DSA model (scripts/pretrain_tiny.py); configs name it `${embedded_model:}`.
EMBEDDED_MODEL_DIR = str(Path(__file__).resolve().parent / "embedded_model")
# Published models' config.json shapes (a folder each), for the memory planner: `${model_shape:glm5}`.
MODEL_SHAPES_DIR = Path(CONFIG_DIR) / "model_shapes"


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a transformers DSA checkpoint: local folder or hub name
    dtype: str = "auto"  # auto, bfloat16, float32, ...
    trust_remote_code: bool = False
    # indexcache_sparse: our sparse MLA attention and fused selection, nothing L x L (sparse_forward.py);
    # sdpa or eager: transformers' native DSA path (an L x L mask per layer).
    attn_implementation: str = "indexcache_sparse"
    random_init: dict[str, Any] | None = None  # without name_or_path: a tiny config for smoke runs
    seed: int = 0
    fp8: str = "auto"  # an FP8 base: auto | native (transformers' FP8 kernels) | dequantize (fp8.py)


@dataclass
class DataConfig:
    files: Any = None  # a path, a glob or a list of them (jsonl, json, parquet, txt)
    hub_name: str | None = None  # a datasets hub name, when online
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 2  # sequences per batch (per rank and micro-batch in training)
    max_records: int | None = None
    eval_files: Any = None  # held-out files for the before/after table; default: the stdlib validation split
    seed: int = 0  # the shuffle; train.yaml sets it from the run's one `seed`


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pattern: Any = 0.25  # an F/S string or a retention ratio (uniform, the paper's FSSS...)
    num_batches: int | None = 8  # None: the whole split
    device: str = "auto"
    output_dir: str = "outputs/eval"
    context_parallel_size: int = 1  # ranks splitting each sequence (a CP group); divides the world size


@dataclass
class DistillConfig:
    pattern: Any = 0.25  # an F/S string, or a retention ratio (uniform, the paper's FSSS...)
    stage: str = "dense"  # dense | sparse | schedule (dense for `dense_steps`, then sparse)
    dense_steps: int = 0
    kl_backend: str | None = None  # None: Triton on GPU, chunked torch on CPU
    recall_rows: int = 64  # query rows per layer for the logged attention-mass recall; 0 turns it off
    teacher_form: str = "auto"  # auto (absorbed MLA in the sparse stage, expanded in dense) | absorbed | expanded
    cross_layer: bool = True  # each F indexer learns every layer it serves; false: its own layer only (ablation)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1  # micro-batches of data.batch_size sequences per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    lr_decay_steps: int | None = None  # the cosine's horizon; None: max_steps. Fix it to extend a run later.
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    gradient_clipping: float = 1.0
    save_every: int = 200  # optimizer steps; a run that ends always saves
    eval_batches: int = 4  # validation batches for the before/after table; 0 skips it
    device: str = "auto"
    gpu_memory_fraction: float | None = None  # caps this process's CUDA memory (a smaller GPU, for offload runs)
    check_plan: bool = True  # print the memory plan at start; stop when it does not fit the GPU
    memory_report_step: int | None = None  # a step whose peak memory is traced by site (CUDA)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    bf16: Any = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_param: str = "none"  # none | cpu | nvme (ZeRO-3)
    offload_optimizer: str = "none"  # none | cpu | nvme (ZeRO 1-3)
    nvme_path: str | None = None  # a local NVMe folder, for either offload to nvme
    config: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed config


@dataclass
class LoggerConfig:
    mode: str = "offline"  # wandb mode: online | offline | disabled
    project: str = "indexcache"
    name: str | None = None


@dataclass
class PlanSettings:
    world_size: int = 1
    gpu_memory_gib: float | None = None  # None: the visible GPU's, times trainer.gpu_memory_fraction
    activation_scale: float = 0.98  # calibration: multiplies the activation terms (plan.ACTIVATION_SCALE)
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers and allocator slack, kept free


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)  # the start-of-run memory plan (world_size unused)
    seed: int = 0  # one seed for the run: random init, data order and every RNG (train.yaml passes it on)
    context_parallel_size: int = 1  # ranks splitting each sequence (a CP group); divides the world size
    output_dir: str = "outputs/train"
    resume: str | None = None  # auto: continue from the latest checkpoint in output_dir, if any; or a path
    export: bool = True  # write ${output_dir}/export at the end


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)
    output_dir: str = "outputs/plan"


@dataclass
class GreedyConfig:
    num_full: int | None = None  # stop with this many F layers ...
    ratio: float | None = 0.125  # ... or at round(ratio * num_layers) of them; neither: down to one F layer
    block_size: int | None = None  # search blocks of this many layers independently (cheaper); None: one block
    reference_freqs: list[int] = field(default_factory=lambda: [2, 4, 8])  # uniform patterns plotted as references


@dataclass
class SearchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: GreedyConfig = field(default_factory=GreedyConfig)
    num_batches: int | None = 4  # the calibration set: the first batches of the split
    resume: bool = True  # continue from ${output_dir}/search.json when it holds an unfinished search
    device: str = "auto"
    output_dir: str = "outputs/search"
    context_parallel_size: int = 1  # ranks splitting each sequence (a CP group); divides the world size


@dataclass
class AnalyzeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_batches: int | None = 2
    device: str = "auto"
    output_dir: str = "outputs/analyze"


# Each CLI's primary config (a YAML under configs/) and its schema.
SCHEMAS = {"train": TrainConfig, "eval": EvalConfig, "search": SearchConfig, "analyze": AnalyzeConfig,
           "plan": PlanConfig}
_GROUPS = {"model": ModelConfig, "data": DataConfig, "distill": DistillConfig, "trainer": TrainerConfig,
           "deepspeed": DeepSpeedConfig, "logger": LoggerConfig}


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore and the `${embedded_model:}` / `${model_shape:NAME}` resolvers in
    OmegaConf."""
    OmegaConf.register_new_resolver("embedded_model", lambda: EMBEDDED_MODEL_DIR, replace=True)
    OmegaConf.register_new_resolver("model_shape", lambda name: str(MODEL_SHAPES_DIR / name), replace=True)
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=node)
    for group, node in _GROUPS.items():
        store.store(group=group, name=f"{group}_schema", node=node)


def check_known_keys(cfg: DictConfig, name: str) -> None:
    """Every key of `cfg` must exist in the schema of CLI `name`; free-form dicts (`deepspeed.config`,
    `model.random_init`) take any key. Hydra's `+key=value` bypasses the schema's struct flag, so this
    merges the config into the schema once more, where an unknown key is an error."""
    try:
        # As plain data: merging a node that already carries the schema would keep the added key.
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), OmegaConf.to_container(cfg, resolve=False))
    except ConfigKeyError as error:
        raise ValueError(f"Unknown config key {error.full_key!r}: the {name} config has no such setting "
                         f"(check its spelling; `{name}.yaml` and indexcache_train/config.py list them).") from None


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config CLI `name` ("train", "eval", "search", "analyze" or "plan") would run with `overrides`."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(name, overrides=list(overrides))
    check_known_keys(cfg, name)
    return cfg
