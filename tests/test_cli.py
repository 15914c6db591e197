"""The console scripts find their Hydra configs: from the checkout, and from a built wheel installed elsewhere."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, key", [("indexcache-train", "distill:"), ("indexcache-eval", "pattern:"),
                                         ("indexcache-search", "search:"), ("indexcache-analyze", "num_batches:")])
def test_console_script_composes_its_config(script, key, tmp_path):
    if shutil.which(script) is None:
        pytest.skip(f"{script} is not installed (pip install -e .)")
    result = subprocess.run([script, "--cfg", "job"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert key in result.stdout


@pytest.mark.slow
def test_wheel_trains_from_another_folder(tmp_path):
    """Build the wheel, install it (no deps: torch and the rest come from this interpreter's site-packages)
    into a fresh virtualenv, and run `indexcache-train experiment=smoke` in a folder outside the checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("indexcache_train-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"indexcache_train/configs/train.yaml", "indexcache_train/configs/experiment/smoke.yaml",
            "indexcache_train/embedded_model/model.safetensors"} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = subprocess.run([str(python), "-c", "import indexcache_train; print(indexcache_train.__file__)"],
                             capture_output=True, text=True, check=True, cwd=elsewhere)
    assert Path(located.stdout.strip()).is_relative_to(venv), located.stdout  # the wheel, not the checkout

    # Its own port: a trainer test in this process may hold the default one for its process group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port(51))}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(venv / "bin" / "indexcache-train"), "experiment=smoke", "output_dir=run"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (elsewhere / "run" / "export" / "config.json").is_file()
    assert "LM loss" in result.stdout
