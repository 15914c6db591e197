"""Typed schemas of `configs/search.yaml` and `configs/analyze.yaml`, registered in Hydra's ConfigStore next to
the model/ and data/ schemas of `config.py`, so that a typo in an override fails at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from .config import DataConfig, ModelConfig, register_configs


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


@dataclass
class AnalyzeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_batches: int | None = 2
    device: str = "auto"
    output_dir: str = "outputs/analyze"


def register_search_configs() -> None:
    register_configs()
    store = ConfigStore.instance()
    store.store(name="search_schema", node=SearchConfig)
    store.store(name="analyze_schema", node=AnalyzeConfig)
