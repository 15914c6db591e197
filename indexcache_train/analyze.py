"""`indexcache-analyze`: where sharing top-k between layers is cheap, for every pair of layers (i, j).

On calibration data, with every layer running its own indexer (all F):
- **index overlap** [i, j]: the fraction of layer j's own top-k that layer i's top-k contains (symmetric: both
  select k keys; the diagonal is 1);
- **attention recall** [i, j]: the share of layer j's dense attention mass (head mean) inside layer i's top-k.
  Row i, column j > i is what S layer j would keep if it shared F layer i's selection; the diagonal is how
  much of a layer's own attention its own indexer catches.

Only query rows with more than `index_topk` candidate keys count (on shorter rows every selection is
everything). The matrices go to `pairs.npz` and `pairs.json`, the heatmaps to PNGs.

    indexcache-analyze model.name_or_path=/path/to/dsa data.files=calib.jsonl data.seq_len=4096
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .adapters import apply_indexcache, get_adapter
from .capture import AttentionCall, attention_taps, capture_topk, dense_attention_probs
from .config import CONFIG_DIR, check_known_keys, register_configs
from .data import load_batches
from .metrics import attention_recall, first_choosing_row, index_overlap
from .modeling import build_model_and_tokenizer, check_seq_len, text_config
from .pattern import IndexCachePattern
from .plots import plot_heatmap
from .runtime import resolve_device


@dataclass
class LayerPairs:
    index_overlap: np.ndarray  # [N, N]
    attention_recall: np.ndarray  # [N, N], row: the selecting layer, column: the attending layer
    num_sequences: int
    seq_len: int
    index_topk: int


@torch.no_grad()
def layer_pairs(model: torch.nn.Module, batches: list[torch.Tensor]) -> LayerPairs:
    """Pairwise overlap and recall on `model` switched to all-F. Two forwards per batch: recall [i, j] needs
    layer i's top-k when layer j's attention runs, also for i > j."""
    num_layers = get_adapter(model).num_layers(model)
    apply_indexcache(model, IndexCachePattern.all_full(num_layers))
    first_row = first_choosing_row(model)
    check_seq_len(model.config, batches[0].shape[1])
    choosing = slice(first_row, None)  # rows with more candidates than top-k slots
    overlap = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    recall = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    rows = 0
    for ids in tqdm(batches, desc="layer pairs (all-F)"):
        with capture_topk(model) as selections:
            model(input_ids=ids)
        for i in range(num_layers):
            for j in range(num_layers):
                overlap[i, j] += index_overlap(selections[j], selections[i])[:, choosing].sum().item()

        def on_attention(call: AttentionCall) -> None:
            probs = dense_attention_probs(call)
            for i in range(num_layers):
                recall[i, call.layer] += attention_recall(probs, selections[i])[:, choosing].sum().item()

        with attention_taps(model, on_attention):
            model(input_ids=ids)
        rows += ids.shape[0] * (ids.shape[1] - first_row)
    return LayerPairs((overlap / rows).numpy(), (recall / rows).numpy(), sum(b.shape[0] for b in batches),
                      batches[0].shape[1], text_config(model.config).index_topk)


def save_pairs(pairs: LayerPairs, output: Path, config: dict | None = None) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    np.savez(output / "pairs.npz", index_overlap=pairs.index_overlap, attention_recall=pairs.attention_recall)
    meta = {"num_layers": len(pairs.index_overlap), "num_sequences": pairs.num_sequences, "seq_len": pairs.seq_len,
            "index_topk": pairs.index_topk}
    (output / "pairs.json").write_text(json.dumps({
        "config": config, **meta, "index_overlap": pairs.index_overlap.tolist(),
        "attention_recall": pairs.attention_recall.tolist(),
    }, indent=2))
    where = f"{pairs.num_sequences} x {pairs.seq_len} tokens, top-{pairs.index_topk}"
    return [
        output / "pairs.npz",
        output / "pairs.json",
        plot_heatmap(pairs.index_overlap, output / "index_overlap.png", title=f"Top-k overlap ({where})",
                     xlabel="layer j (own top-k)", ylabel="layer i (top-k containing it)"),
        plot_heatmap(pairs.attention_recall, output / "attention_recall.png",
                     title=f"Attention recall ({where})", xlabel="layer j (attention)",
                     ylabel="layer i (top-k selecting)"),
    ]


def format_pairs(pairs: LayerPairs) -> str:
    """Per layer: how it fares with the previous layer's top-k, and the earlier layer that serves it best."""
    lines = ["layer  overlap(j-1,j)  recall(j-1,j)  own recall  best source (recall)"]
    for j in range(1, len(pairs.index_overlap)):
        best = int(np.argmax(pairs.attention_recall[:j, j]))
        lines.append(f"{j:>5}  {pairs.index_overlap[j - 1, j]:>14.3f}  {pairs.attention_recall[j - 1, j]:>13.3f}  "
                     f"{pairs.attention_recall[j, j]:>10.3f}  {best:>5} ({pairs.attention_recall[best, j]:.3f})")
    return "\n".join(lines)


def run(cfg: DictConfig) -> LayerPairs:
    device = resolve_device(cfg.device)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    model.to(device).eval()
    batches = load_batches(cfg.data, cfg.num_batches, tokenizer, device)
    if not batches:
        raise ValueError("No calibration batch: the data is empty.")
    pairs = layer_pairs(model, batches)
    written = save_pairs(pairs, Path(cfg.output_dir), OmegaConf.to_container(cfg))
    print(format_pairs(pairs))
    print("Wrote " + ", ".join(str(p) for p in written))
    return pairs


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="analyze")
def _hydra_main(cfg: DictConfig) -> LayerPairs:
    check_known_keys(cfg, "analyze")
    return run(cfg)


def main() -> None:
    register_configs()  # here, not at import: importing the package registers nothing
    _hydra_main()


if __name__ == "__main__":
    main()
