"""Figures for the search and the analysis, drawn with matplotlib's object API on the Agg canvas: no pyplot
state, no display needed, safe in a headless job or a notebook kernel."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CONVENTION_STYLE = {"paper": ("s", "tab:orange"), "official": ("^", "tab:green")}


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_search(record: dict, path: str | Path) -> Path:
    """Calibration loss against the number of F layers: the greedy path (or, block-wise, its read-offs), the
    uniform patterns of both conventions, and the all-F loss."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    num_layers = record["num_layers"]
    if len(record["blocks"]) == 1:
        steps = [(num_layers, record["all_full_loss"])] + [(s["num_full"], s["loss"]) for s in record["steps"]]
        axes.plot(*zip(*steps), "o-", color="tab:blue", markersize=3, label="greedy search")
    searched = record.get("searched", [])
    if searched:
        axes.plot([s["num_full"] for s in searched], [s["loss"] for s in searched], "D", color="tab:blue",
                  markersize=7, fillstyle="none", label="searched 1/freq")
    for convention, (marker, color) in _CONVENTION_STYLE.items():
        points = [u for u in record.get("uniform", []) if u["convention"] == convention]
        if points:
            axes.plot([u["num_full"] for u in points], [u["loss"] for u in points], marker, color=color,
                      linestyle="none", markersize=7, label=f"uniform, {convention} offset {points[0]['offset']}")
    axes.axhline(record["all_full_loss"], color="gray", linestyle="--", linewidth=1, label="all F")
    axes.set_xlabel("F layers (indexers kept)")
    axes.set_ylabel("calibration LM loss")
    axes.set_title(f"Greedy IndexCache search, {num_layers} layers")
    axes.invert_xaxis()  # read left to right as the search goes: fewer indexers to the right
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_heatmap(matrix: np.ndarray, path: str | Path, *, title: str, xlabel: str, ylabel: str,
                 vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """A layer x layer matrix; cells carry their value when the model is small enough to read them."""
    size = matrix.shape[0]
    figure = Figure(figsize=(min(3 + 0.32 * size, 12), min(2.5 + 0.3 * size, 11)))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, origin="upper")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if size <= 16:
        for (i, j), value in np.ndenumerate(matrix):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value < (vmin + vmax) / 2 else "black")
    ticks = np.arange(size) if size <= 32 else np.arange(0, size, max(1, size // 16))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    return _save(figure, path)


def layer_keys(record: dict, prefix: str) -> list[str]:
    """The "{prefix}{layer}" keys of a record, in layer order (e.g. prefix "kl/layer")."""
    keys = [k for k in record if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return sorted(keys, key=lambda k: int(k[len(prefix):]))


def plot_training_curves(metrics: list[dict], path: str | Path) -> Path:
    """Loss, per-layer KL and per-layer recall against the step, from a trainer's metrics.jsonl rows; a dotted
    line marks each change of stage (dense -> sparse)."""
    figure = Figure(figsize=(13, 3.8))
    panels = figure.subplots(1, 3)
    steps = [m["step"] for m in metrics]
    panels[0].plot(steps, [m.get("loss", np.nan) for m in metrics], color="tab:blue")
    panels[0].set_title("distillation loss")
    every_key = {k: None for m in metrics for k in m}
    for panel, prefix in zip(panels[1:], ("kl/layer", "recall/layer")):
        keys = layer_keys(every_key, prefix)
        for key in keys:
            panel.plot(steps, [m.get(key, np.nan) for m in metrics], label=key.split("/")[1])
        panel.set_title(prefix.split("/")[0] + " per served layer")
        if keys:
            panel.legend(fontsize=7, ncol=2)
    changes = [m["step"] for previous, m in pairwise(metrics) if m.get("stage") != previous.get("stage")]
    for panel in panels:
        for step in changes:
            panel.axvline(step - 0.5, color="gray", linestyle=":", linewidth=1)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
    return _save(figure, path)


def plot_before_after(before: dict, after: dict, path: str | Path) -> Path:
    """Per-layer KL and attention recall before and after distillation, as grouped bars."""
    figure = Figure(figsize=(10, 3.6))
    for panel, prefix in zip(figure.subplots(1, 2), ("kl/layer", "recall/layer")):
        keys = layer_keys({**before, **after}, prefix)
        positions = np.arange(len(keys))
        for shift, (label, record) in zip((-0.2, 0.2), (("before", before), ("after", after))):
            panel.bar(positions + shift, [record.get(k, np.nan) for k in keys], width=0.4, label=label)
        panel.set_xticks(positions, [k[len(prefix):] for k in keys])
        panel.set_xlabel("layer")
        panel.set_title(prefix.split("/")[0] + " per layer")
        panel.grid(alpha=0.3, axis="y")
        panel.legend(fontsize=8)
    return _save(figure, path)
