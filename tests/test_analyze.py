import json
import subprocess
import sys

import numpy as np
import torch
from conftest import build_tiny

from indexcache_train.analyze import layer_pairs
from indexcache_train.evaluate import sharing_stats
from indexcache_train.pattern import IndexCachePattern


def test_layer_pairs_agree_with_the_eval_sharing_stats(model_type):
    model = build_tiny(model_type)
    batches = [torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pairs = layer_pairs(model, batches)
    assert pairs.index_overlap.shape == pairs.attention_recall.shape == (4, 4)
    np.testing.assert_allclose(np.diag(pairs.index_overlap), 1.0)
    np.testing.assert_allclose(pairs.index_overlap, pairs.index_overlap.T, atol=1e-12)
    assert ((pairs.attention_recall > 0) & (pairs.attention_recall < 1)).all()

    # Row 0 is what every later layer keeps when it shares layer 0's top-k: evaluate's per-S-layer stats.
    for stats in sharing_stats(model, batches, IndexCachePattern("FSSS")):
        assert np.isclose(pairs.index_overlap[0, stats.layer], stats.index_overlap, atol=1e-6)
        assert np.isclose(pairs.attention_recall[0, stats.layer], stats.attention_recall, atol=1e-6)


def test_cli_writes_matrices_and_heatmaps(tmp_path):
    out = tmp_path / "analyze"
    result = subprocess.run(
        [sys.executable, "-m", "indexcache_train.analyze", f"output_dir={out}",
         "model=tiny_glm", "model.random_init.num_hidden_layers=4", "data.seq_len=48", "data.max_records=30",
         "num_batches=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    matrices = np.load(out / "pairs.npz")
    assert matrices["index_overlap"].shape == matrices["attention_recall"].shape == (4, 4)
    np.testing.assert_allclose(np.diag(matrices["index_overlap"]), 1.0)
    record = json.loads((out / "pairs.json").read_text())
    assert record["num_layers"] == 4 and record["index_topk"] == 32
    np.testing.assert_allclose(record["attention_recall"], matrices["attention_recall"])
    for name in ("index_overlap.png", "attention_recall.png"):
        assert (out / name).stat().st_size > 10_000
    assert "best source" in result.stdout
