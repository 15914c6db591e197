"""CPU smoke run of scripts/bench_train.py, so that the GPU benchmark does not rot between H200 runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_train_runs_both_trainers_on_cpu(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(SCRIPT), "--model-size", "tiny", "--device", "cpu", "--lengths", "64",
                    "--steps", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(out.with_suffix(".json").read_text())

    check = report["loss_check"]
    assert check["length"] == 64 and check["rel_diff"] < 1e-4, check  # both trainers compute the same loss
    by_stage = {row["stage"]: row for row in report["results"]}
    assert sorted(by_stage) == ["dense", "sparse"]
    for result in (by_stage["sparse"]["ours"], by_stage["sparse"]["naive"], by_stage["dense"]["ours"]):
        assert result["status"] == "ok", result
        assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("step_s", "tokens_per_s", "loss"))
    assert by_stage["dense"]["naive"]["status"] == "n/a"

    table = out.with_suffix(".md").read_text()
    assert "| sparse | 64 |" in table and "--model-size tiny" in table
