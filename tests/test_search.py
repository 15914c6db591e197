import json
import subprocess
import sys
from itertools import pairwise

import pytest
import torch
from conftest import build_tiny

from indexcache_train import pattern_search
from indexcache_train.adapters import apply_indexcache
from indexcache_train.pattern import IndexCachePattern
from indexcache_train.pattern_search import DecoderStack, cost_report, greedy_search, nested_patterns, score_candidates


def calibration(num_batches=2, seq_len=24):
    return [torch.randint(0, 257, (2, seq_len), generator=torch.Generator().manual_seed(i)) for i in range(num_batches)]


def count_layer_calls(model):
    """Counts every decoder-layer forward, independently of DecoderStack's own counter."""
    calls = [0]
    for layer in model.model.layers:
        layer.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("base", ["FFFFFF", "FFSFFS"])
def test_prefix_cached_loss_equals_a_full_forward(model_type, base):
    model, batches = build_tiny(model_type, num_hidden_layers=6), calibration()
    stack, pattern = DecoderStack(model), IndexCachePattern(base)
    candidates = [i for i in pattern.full_layers if i > 0]
    losses, anchor = score_candidates(stack, batches, pattern, candidates, [stack.embed(ids) for ids in batches], "")
    assert [s.layer for s in anchor] == [candidates[0]] * len(batches)
    for layer in candidates:
        apply_indexcache(model, pattern.with_shared(layer))
        with torch.no_grad():
            full = sum(model(input_ids=ids, labels=ids).loss.item() for ids in batches) / len(batches)
        assert losses[layer] == pytest.approx(full, rel=0, abs=1e-6), layer


def test_search_nests_keeps_layer_0_and_counts_its_layer_forwards():
    model, batches = build_tiny(num_hidden_layers=6), calibration()
    calls = count_layer_calls(model)
    state = greedy_search(model, batches, num_full=1)

    patterns = [IndexCachePattern(s.pattern) for s in state.steps]
    assert [len(p.full_layers) for p in patterns] == [5, 4, 3, 2, 1] and str(patterns[-1]) == "FSSSSS"
    for before, after in pairwise(patterns):
        assert set(before.shared_layers) < set(after.shared_layers)
    for step in state.steps:
        assert step.loss == min(step.candidates.values()) == step.candidates[str(step.layer)]
        assert "0" not in step.candidates
    assert nested_patterns(state, [2, 4]) == {2: patterns[2], 4: patterns[3]}  # 3 and 2 F layers of 6

    # Per step and batch: one walk from the anchor (the previous step's first candidate) to the last candidate,
    # and a fork from each candidate to the top. First step: 5 + (5 + 4 + 3 + 2 + 1).
    expected, anchor = 0, 0
    for step in state.steps:
        candidates = sorted(map(int, step.candidates))
        expected += max(candidates) - anchor + sum(6 - c for c in candidates)
        anchor = candidates[0]
    assert state.layer_forwards == len(batches) * expected and expected < 15 * 6
    assert calls[0] == state.layer_forwards + 6 * len(batches)  # + the all-F reference forward
    cost = cost_report(state, num_reference_passes=1)
    assert cost["naive_full_passes"] == 5 + 4 + 3 + 2 + 1 == state.candidate_evaluations
    assert cost["naive_layer_forwards"] == 15 * 6 * len(batches) > cost["search_layer_forwards"]


def test_block_search_keeps_each_blocks_quota():
    model, batches = build_tiny(num_hidden_layers=6), calibration()
    state = greedy_search(model, batches, ratio=1 / 3, block_size=3)
    assert state.blocks == [[0, 1, 2], [3, 4, 5]] and state.quotas == [1, 1]
    assert [s.block for s in state.steps] == [0, 0, 1, 1]
    for step in state.steps:
        assert all(int(layer) in state.blocks[step.block] for layer in step.candidates)
    final = IndexCachePattern.all_full(6)
    for step in state.steps:
        final = final.with_shared(step.layer)
    assert final.is_full(0) and len(final.full_layers) == 2 and final.full_layers[1] in (3, 4, 5)
    assert state.candidate_evaluations == 2 + 1 + 3 + 2 < 5 + 4 + 3 + 2
    assert nested_patterns(state, [3]) == {3: final}


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    model, batches = build_tiny(num_hidden_layers=6), calibration()
    uninterrupted = greedy_search(model, batches, num_full=2)

    path, save_state, saves = tmp_path / "search.json", pattern_search.save_state, []

    def killed_after_two_steps(state, path, **extra):
        if len(saves) == 2:
            raise KeyboardInterrupt
        save_state(state, path, **extra)
        saves.append(len(state.steps))

    monkeypatch.setattr(pattern_search, "save_state", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        greedy_search(model, batches, num_full=2, state_path=path)
    monkeypatch.setattr(pattern_search, "save_state", save_state)
    assert len(json.loads(path.read_text())["steps"]) == 2
    assert not path.with_name("search.json.tmp").exists()

    resumed = greedy_search(model, batches, num_full=2, state_path=path)
    assert "Resuming the search" in capsys.readouterr().out
    assert [s.pattern for s in resumed.steps] == [s.pattern for s in uninterrupted.steps]
    assert [s.loss for s in resumed.steps] == pytest.approx([s.loss for s in uninterrupted.steps], abs=1e-6)
    assert resumed.done and json.loads(path.read_text())["done"]

    with pytest.raises(ValueError, match="different search"):
        greedy_search(model, batches, num_full=3, state_path=path)


def test_cli_writes_search_json_with_references_and_a_plot(tmp_path):
    out = tmp_path / "search"
    result = subprocess.run(
        [sys.executable, "-m", "indexcache_train.search", f"output_dir={out}", "model=tiny_glm",
         "model.random_init.num_hidden_layers=4", "data.seq_len=48", "data.max_records=30", "num_batches=1",
         "search.ratio=0.25", "search.reference_freqs=[2,4]"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "search.json").read_text())
    assert record["done"] and len(record["steps"]) == 3 and record["final"]["pattern"] == "FSSS"
    assert [s["freq"] for s in record["searched"]] == [2, 4]
    assert {(u["freq"], u["convention"]) for u in record["uniform"]} == {
        (2, "paper"), (2, "official"), (4, "paper"), (4, "official")}
    assert {u["pattern"] for u in record["uniform"]} == {"FSFS", "FFSF", "FSSS", "FFSS"}
    assert record["cost"]["naive_full_passes"] == 3 + 2 + 1
    assert record["cost"]["search_layer_forwards"] < record["cost"]["naive_layer_forwards"]
    assert (out / "search.png").stat().st_size > 10_000
    assert "full passes" in result.stdout
