"""The notebooks run headless on the embedded model (the distillation one on the tiny smoke run), so that they
never rot."""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(autouse=True)
def this_checkout(monkeypatch):
    """The kernels (and the runs they start) import this checkout's package, installed or not."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def execute(name: str, workdir: Path, **parameters) -> nbformat.NotebookNode:
    """Run a notebook in `workdir`, with `parameters` injected after its "parameters" cell (papermill-style)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    resources = {"metadata": {"path": str(workdir)}}  # the kernel's working directory
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources=resources).execute()
    return notebook


def images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


TINY = ["data.seq_len=256", "data.max_records=20", "num_batches=1"]  # the embedded model, short sequences


def test_overlap_analysis(tmp_path):
    notebook = execute("overlap_analysis.ipynb", tmp_path, overrides=TINY, output_dir=str(tmp_path / "analyze"))
    assert (tmp_path / "analyze" / "pairs.npz").is_file() and images(notebook) == 2


def test_pattern_search(tmp_path):
    notebook = execute("pattern_search.ipynb", tmp_path, overrides=[*TINY, "search.ratio=0.25"], block_size=3,
                       output_dir=str(tmp_path / "search"))
    assert (tmp_path / "search" / "search.json").is_file() and (tmp_path / "search_blocks" / "search.json").is_file()
    assert images(notebook) == 1


@pytest.mark.parametrize("given_run", [False, True], ids=["smoke-run", "eval-report-folder"])
def test_distillation_results(tmp_path, monkeypatch, given_run):
    # conftest turns the Triton interpreter on for the kernel tests; the smoke run should train as a user's
    # CPU run does (the torch KL path), not through the interpreter, which is 10x slower.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run_dir = None
    if given_run:  # a folder of another shape: EvalReport files and a metrics.jsonl cut off mid-line
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        report = {"pattern": "FSFS", "lm_loss": 5.6, "perplexity": 270.4, "shared_layers": [
            {"layer": 1, "source": 0, "index_overlap": 0.5, "attention_recall": 0.6}]}
        (run_dir / "eval_before.json").write_text(json.dumps(report))
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "kl/layer1": 0.5, "recall/layer1": 0.6}\n'
                                               '{"step": 2, "loss": 0.9, "kl/layer1": 0.4, "recall/layer1": 0.7}\n'
                                               '{"step": 3, "lo')
        run_dir = str(run_dir)
    notebook = execute("distillation_results.ipynb", tmp_path, run_dir=run_dir,
                       demo_dir=str(tmp_path / "smoke"), figures_dir=str(tmp_path / "figures"))
    assert (tmp_path / "figures" / "curves.png").is_file()
    assert images(notebook) == 2
