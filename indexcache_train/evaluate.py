"""`indexcache-eval`: what a pattern costs and what it saves.

For a DSA model, a pattern and data, it reports:
- the mean LM loss and perplexity with the pattern and with all layers F;
- per S layer, on the all-F model: the **index overlap**, the fraction of the layer's own top-k that the
  shared top-k (its F layer's) contains, and the **attention-mass recall**, the share of the layer's dense
  attention probability that falls inside the shared top-k;
- the fraction of indexer FLOPs removed.

Only query rows with more than `index_topk` candidate keys count in the overlap and the recall: on the
others every selection holds every key, and both would be 1 by construction. A pooled indexer (glm5_next,
pools of P keys) keeps every key while the complete pools fit its top-k / P: its rows count from
t = index_topk + P - 1, and its selections include the visible tail, as its attention does.

With `context_parallel_size` > 1 (launched on that many ranks), each sequence is split over the ranks and the
LM losses, the overlap and the recall are the one-rank ones.

    indexcache-eval model.name_or_path=/path/to/dsa pattern=FSSSFSSS data.files=val.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .adapters import apply_indexcache, get_adapter
from .capture import AttentionCall, attention_taps, capture_topk, dense_attention_probs
from .config import CONFIG_DIR, check_known_keys, register_configs
from .context_parallel import ContextParallel, active_layout, cli_context_parallel, gather_sequence
from .data import load_batches
from .metrics import attention_recall, first_choosing_row, index_overlap, lm_loss
from .modeling import build_model_and_tokenizer, check_seq_len, text_config
from .pattern import IndexCachePattern
from .runtime import rank, resolve_device
from .sparse_forward import SPARSE_ATTENTION, uses_sparse_forward


@dataclass
class SharedLayerStats:
    layer: int
    source: int
    index_overlap: float
    attention_recall: float


@dataclass
class EvalReport:
    pattern: str
    seq_len: int
    num_sequences: int
    lm_loss: float
    perplexity: float
    lm_loss_all_full: float | None
    perplexity_all_full: float | None
    indexer_flops_removed: float  # fraction of the all-F indexer FLOPs
    indexer_gflops_per_sequence: float
    indexer_gflops_per_sequence_all_full: float
    shared_layers: list[SharedLayerStats] = field(default_factory=list)
    context_parallel_size: int = 1  # ranks that split each sequence


def indexer_flops_per_layer(config, seq_len: int, compress_rate: int = 1) -> float:
    """One indexer's FLOPs on one causal sequence: its projections and the scored pairs, sum_t (t + 1) // m
    (L(L+1)/2 for token indexers, m = 1). A compressing indexer (DeepSeek-V4) projects each token to its two
    series of keys and gates, 4 x index_head_dim, instead of one key; a pooled indexer (pools of P keys) also
    projects its compression gate and scores 1/P of the pairs (query-pool pairs)."""
    config = text_config(config)
    heads, dim, pool = config.index_n_heads, config.index_head_dim, getattr(config, "index_kpool", 1)
    key_width = dim if compress_rate == 1 else 4 * dim
    gate = dim if pool > 1 else 0
    projections = 2 * seq_len * (config.q_lora_rank * heads * dim + config.hidden_size * (key_width + heads + gate))
    windows, rest = divmod(seq_len, compress_rate)
    pairs = (compress_rate * windows * (windows - 1) // 2 + windows * (rest + 1)) / pool
    return projections + pairs * heads * (2 * dim + 2)  # dot products, then ReLU-weighted head sum


@torch.no_grad()
def sharing_stats(model, batches: Iterable[torch.Tensor], pattern: IndexCachePattern,
                  context_parallel: ContextParallel | None = None) -> list[SharedLayerStats]:
    """Overlap and recall of every S layer of `pattern`, measured on `model` running all-F. With
    `context_parallel`, every rank gathers each layer's queries and selections and measures the whole
    sequence (a chunk's rows need the probabilities over all earlier keys; the keys are already gathered)."""
    first_row = first_choosing_row(model)  # rows whose selection drops candidates
    sums = {layer: torch.zeros(2, dtype=torch.float64) for layer in pattern.shared_layers}
    rows = 0
    probs: dict[int, torch.Tensor] = {}

    def on_attention(call: AttentionCall) -> None:
        if call.layer in sums:
            layout = active_layout()
            if layout is not None:
                call = dataclasses.replace(call, query=gather_sequence(call.query, layout, dim=2))
            probs[call.layer] = dense_attention_probs(call)

    def whole(selection: torch.Tensor) -> torch.Tensor:
        layout = active_layout()
        return selection if layout is None else gather_sequence(selection, layout)

    # The selections come from `capture_topk`: a tap's `topk_indices` is None where the model folds the
    # selection into its mask (glm5_next).
    with attention_taps(model, on_attention), capture_topk(model) as selections:
        for ids in tqdm(batches, desc="overlap and recall (all-F)"):
            sequence = contextlib.nullcontext() if context_parallel is None else context_parallel.activate(ids.shape[1])
            with sequence as layout:
                if layout is None:
                    model(input_ids=ids)
                else:
                    model(**layout.model_inputs(ids), use_cache=False)
                for layer in sums:
                    shared = whole(selections[pattern.source_layer(layer)])
                    choosing = slice(first_row, None)
                    overlap = index_overlap(whole(selections[layer]), shared)[:, choosing]
                    recall = attention_recall(probs.pop(layer), shared)[:, choosing]
                    sums[layer] += torch.stack([overlap.sum(), recall.sum()]).double().cpu()
            rows += ids.shape[0] * (ids.shape[1] - first_row)
    return [
        SharedLayerStats(layer, pattern.source_layer(layer), *(sums[layer] / rows).tolist())
        for layer in pattern.shared_layers
    ]


def evaluate(model, batches: list[torch.Tensor], pattern: IndexCachePattern | str | float,
             context_parallel: ContextParallel | None = None) -> EvalReport:
    """Evaluate `pattern` on `model` (left running with the pattern applied afterwards). With
    `context_parallel`, every rank of the group passes the whole batches."""
    adapter = get_adapter(model)
    pattern = IndexCachePattern.coerce(pattern, adapter.num_layers(model))
    if not batches:
        raise ValueError("No evaluation batch: the data is empty.")
    seq_len = batches[0].shape[1]
    check_seq_len(model.config, seq_len)
    if context_parallel is not None and not uses_sparse_forward(model):
        raise ValueError(f"context_parallel_size={context_parallel.size} needs the sparse forward: set "
                         f"model.attn_implementation={SPARSE_ATTENTION}.")
    if seq_len <= first_choosing_row(model):
        raise ValueError(f"The sequence length ({seq_len}) leaves no row whose selection drops a candidate: the "
                         f"first is row {first_choosing_row(model)}.")
    loss_full, stats = None, []
    try:
        apply_indexcache(model, IndexCachePattern.all_full(pattern.num_layers))
    except ValueError as error:  # a checkpoint exported with S layers has no all-F form
        print(f"Skipping the all-F reference: {error}")
    else:
        loss_full = lm_loss(model, batches, "LM loss (all-F)", context_parallel)
        stats = sharing_stats(model, batches, pattern, context_parallel)
    apply_indexcache(model, pattern)
    loss = lm_loss(model, batches, f"LM loss ({pattern})", context_parallel)
    per_layer = indexer_flops_per_layer(model.config, seq_len, adapter.candidate_rate(model))
    return EvalReport(
        pattern=str(pattern), seq_len=seq_len, num_sequences=sum(b.shape[0] for b in batches),
        lm_loss=loss, perplexity=math.exp(loss),
        lm_loss_all_full=loss_full, perplexity_all_full=None if loss_full is None else math.exp(loss_full),
        indexer_flops_removed=len(pattern.shared_layers) / pattern.num_layers,
        indexer_gflops_per_sequence=per_layer * len(pattern.full_layers) / 1e9,
        indexer_gflops_per_sequence_all_full=per_layer * pattern.num_layers / 1e9,
        shared_layers=stats, context_parallel_size=1 if context_parallel is None else context_parallel.size,
    )


def format_report(report: EvalReport) -> str:
    lines = [f"pattern {report.pattern}  ({report.num_sequences} sequences of {report.seq_len} tokens)"]
    if report.lm_loss_all_full is not None:
        lines.append(f"LM loss   all-F {report.lm_loss_all_full:.4f} (ppl {report.perplexity_all_full:.2f})"
                     f"   pattern {report.lm_loss:.4f} (ppl {report.perplexity:.2f})")
    else:
        lines.append(f"LM loss   pattern {report.lm_loss:.4f} (ppl {report.perplexity:.2f})")
    lines.append(f"indexer FLOPs removed {report.indexer_flops_removed:.1%} "
                 f"({report.indexer_gflops_per_sequence_all_full:.3g} -> {report.indexer_gflops_per_sequence:.3g} "
                 "GFLOP per sequence)")
    if report.shared_layers:
        lines.append("S layer  source  index overlap  attention recall")
        for s in report.shared_layers:
            lines.append(f"{s.layer:>7}  {s.source:>6}  {s.index_overlap:>13.3f}  {s.attention_recall:>16.3f}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> EvalReport:
    check_known_keys(cfg, "eval")
    context_parallel = cli_context_parallel(cfg.context_parallel_size, cfg.data.seq_len, "indexcache_train.evaluate")
    device = resolve_device(cfg.device)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    model.to(device).eval()
    batches = load_batches(cfg.data, cfg.num_batches, tokenizer, device)
    report = evaluate(model, batches, cfg.pattern, context_parallel)
    if rank() != 0:  # every rank of the group holds the same report
        return report
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg), **asdict(report)},
                                                 indent=2))
    print(format_report(report))
    print(f"Wrote {output / 'eval.json'}")
    return report


def main() -> None:
    register_configs()  # here, not at import: importing the package registers nothing
    _hydra_main()


if __name__ == "__main__":
    main()
