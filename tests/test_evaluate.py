import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny

from indexcache_train.evaluate import evaluate, format_report, indexer_flops_per_layer
from indexcache_train.metrics import attention_recall, index_overlap, layer_recalls, lm_loss


def test_overlap_counts_only_real_keys():
    own = torch.tensor([[[0, 5, 9], [1, 0, 3], [0, 1, 2], [1, 2, 3]]])  # entries > t are padding
    shared = torch.tensor([[[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]])
    assert torch.allclose(index_overlap(own, shared), torch.tensor([[1.0, 1.0, 1.0, 2 / 3]]))


def test_recall_sums_the_selected_mass():
    probs = torch.tensor([[[1.0, 0, 0], [0.25, 0.75, 0], [0.2, 0.3, 0.5]]])
    selection = torch.tensor([[[0, -1], [1, 0], [2, 9]]])
    assert torch.allclose(attention_recall(probs, selection), torch.tensor([[1.0, 1.0, 0.5]]))


def test_flops_grow_quadratically():
    config = build_tiny().config
    short, long = indexer_flops_per_layer(config, 1000), indexer_flops_per_layer(config, 4000)
    assert 10 < long / short < 16


def test_lm_loss_weighs_batches_by_their_tokens():
    model = build_tiny().eval()
    ids = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = lm_loss(model, [ids], "one batch")
        split = lm_loss(model, [ids[:2], ids[2:]], "a full and a short batch")
    assert split == pytest.approx(whole, rel=1e-5)


def test_evaluate_tiny_model(model_type):
    model = build_tiny(model_type)
    batches = [torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = evaluate(model, batches, "FSFS")
    assert report.indexer_flops_removed == 0.5
    assert report.lm_loss != report.lm_loss_all_full
    assert [s.layer for s in report.shared_layers] == [1, 3]
    assert [s.source for s in report.shared_layers] == [0, 2]
    for s in report.shared_layers:
        assert 0 < s.index_overlap < 1 and 0 < s.attention_recall < 1
    assert "S layer" in format_report(report)
    assert model.config.index_topk_pattern == "FSFS"


def test_sequence_not_longer_than_topk_is_refused():
    with pytest.raises(ValueError, match="must exceed the model's index_topk"):
        evaluate(build_tiny(), [torch.zeros(1, 8, dtype=torch.long)], "FSFS")


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        evaluate(build_tiny(), [], "FSFS")


def test_cli_writes_json_and_prints_a_table(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "indexcache_train.evaluate", f"output_dir={out}", "pattern=FSSS",
         "model=tiny_glm", "model.random_init.num_hidden_layers=4", "data.seq_len=64", "data.max_records=30",
         "num_batches=2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["pattern"] == "FSSS" and len(report["shared_layers"]) == 3
    assert report["indexer_flops_removed"] == 0.75
    assert "attention recall" in result.stdout


def test_layer_recalls_follow_the_running_pattern():
    model = build_tiny("glm_moe_dsa")
    batches = [torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))]
    all_full = layer_recalls(model, batches)
    evaluate(model, batches, "FSFS")  # leaves the model running FSFS
    shared = layer_recalls(model, batches)
    assert len(all_full) == 4 and all(0 < r <= 1 for r in all_full + shared)
    assert shared[0] == pytest.approx(all_full[0])  # layer 0 runs the same in both
    assert shared[1] != pytest.approx(all_full[1])  # layer 1 now attends to layer 0's top-k
