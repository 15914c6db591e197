"""The console scripts find their Hydra configs (a relative config_path breaks only there)."""

import shutil
import subprocess

import pytest


@pytest.mark.parametrize("script, key", [("indexcache-train", "distill:"), ("indexcache-eval", "pattern:"),
                                         ("indexcache-search", "search:"), ("indexcache-analyze", "num_batches:")])
def test_console_script_composes_its_config(script, key):
    if shutil.which(script) is None:
        pytest.skip(f"{script} is not installed (pip install -e .)")
    result = subprocess.run([script, "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert key in result.stdout
