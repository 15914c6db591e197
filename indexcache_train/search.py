"""`indexcache-search`: the greedy pattern search (`pattern_search`) as a Hydra job, with its reference
evaluations, `search.json` and `search.png`.

    indexcache-search model.name_or_path=/path/to/dsa data.files=calib.jsonl search.ratio=0.125
    indexcache-search ... search.block_size=8       # block-wise
    torchrun --nproc_per_node 2 -m indexcache_train.search ... context_parallel_size=2   # sequences split
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .adapters import apply_indexcache
from .config import CONFIG_DIR, check_known_keys, register_configs
from .context_parallel import cli_context_parallel
from .data import load_batches
from .metrics import lm_loss
from .modeling import build_model_and_tokenizer
from .pattern import OFFICIAL_OFFSET, PAPER_OFFSET, IndexCachePattern
from .pattern_search import SearchState, cost_report, greedy_search, nested_patterns, save_state
from .runtime import rank, resolve_device

CONVENTIONS = {PAPER_OFFSET: "paper", OFFICIAL_OFFSET: "official"}


def run(cfg: DictConfig) -> dict:
    """The whole `indexcache-search` job: search, reference evaluations, `search.json` and `search.png`."""
    from .plots import plot_search

    context_parallel = cli_context_parallel(cfg.context_parallel_size, cfg.data.seq_len, "indexcache_train.search")
    device = resolve_device(cfg.device)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    model.to(device).eval()
    batches = load_batches(cfg.data, cfg.num_batches, tokenizer, device)
    if not batches:
        raise ValueError("No calibration batch: the data is empty.")
    output = Path(cfg.output_dir)
    state = greedy_search(model, batches, num_full=cfg.search.num_full, ratio=cfg.search.ratio,
                          block_size=cfg.search.block_size, state_path=output / "search.json", resume=cfg.resume,
                          context_parallel=context_parallel)

    n = state.num_layers
    known = {s.pattern: s.loss for s in state.steps}  # a step's pattern is all-F outside its block
    known["F" * n] = state.all_full_loss
    evaluated = 0

    def loss_of(pattern: IndexCachePattern) -> float:
        nonlocal evaluated
        if str(pattern) not in known:
            apply_indexcache(model, pattern)
            known[str(pattern)] = lm_loss(model, batches, f"LM loss ({pattern})", context_parallel)
            evaluated += 1
        return known[str(pattern)]

    searched = [{"freq": freq, "pattern": str(p), "num_full": len(p.full_layers), "loss": loss_of(p)}
                for freq, p in nested_patterns(state, cfg.search.reference_freqs).items()]
    final = IndexCachePattern.all_full(n)
    for step in state.steps:  # blocks switch disjoint layers: the union of their choices
        final = final.with_shared(step.layer)
    uniform = []
    for freq in sorted(cfg.search.reference_freqs):
        for offset, convention in CONVENTIONS.items():
            pattern = IndexCachePattern.uniform(n, freq, offset)
            uniform.append({"freq": freq, "convention": convention, "offset": offset, "pattern": str(pattern),
                            "num_full": len(pattern.full_layers), "loss": loss_of(pattern)})
    result = {"final": {"pattern": str(final), "num_full": len(final.full_layers), "loss": loss_of(final)},
              "searched": searched, "uniform": uniform, "cost": cost_report(state, 1 + evaluated)}
    if rank() != 0:  # every rank of the CP group holds the same result
        return {**asdict(state), **result}
    save_state(state, output / "search.json", config=OmegaConf.to_container(cfg), **result)
    plot_search(json.loads((output / "search.json").read_text()), output / "search.png")
    print(format_summary(state, result))
    print(f"Wrote {output / 'search.json'} and {output / 'search.png'}")
    return {**asdict(state), **result}


def format_summary(state: SearchState, result: dict) -> str:
    rows = [("searched", s) for s in result["searched"]]
    rows += [(f"uniform, {u['convention']}", u) for u in result["uniform"]]
    rows.sort(key=lambda row: row[1]["freq"])
    lines = [f"all-F loss {state.all_full_loss:.4f}", f"{'retention':<10} {'F':>3}  {'pattern':<32} {'loss':>8}  kind"]
    lines += [f"1/{r['freq']:<8} {r['num_full']:>3}  {r['pattern']:<32} {r['loss']:>8.4f}  {kind}" for kind, r in rows]
    cost = result["cost"]
    lines.append(f"cost: {cost['search_layer_forwards']} layer-forwards = {cost['search_full_pass_equivalents']:.1f} "
                 f"full passes, against {cost['naive_full_passes']} for plain greedy "
                 f"({cost['speedup_vs_naive']:.2f}x cheaper)")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="search")
def _hydra_main(cfg: DictConfig) -> dict:
    check_known_keys(cfg, "search")
    return run(cfg)


def main() -> None:
    register_configs()  # here, not at import: importing the package registers nothing
    _hydra_main()


if __name__ == "__main__":
    main()
