"""scripts/pretrain_tiny.py at micro scale on a CPU: the three phases train, the folder is a plain transformers
checkpoint, and the recorded rerun command reproduces the figures."""

import importlib.util
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny.py"
MICRO = ["--model-size", "micro", "--context", "128", "--index-topk", "16", "--device", "cpu", "--batch-size", "8",
         "--eval-sequences", "16", "--max-records", "50"]
STEPS = 24


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def pretrained(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_tiny")
    # A generous budget, so that the cap sets the steps however busy the machine is.
    summary = recipe.main(["--out", str(out), *MICRO, "--minutes", "60", "--max-steps-per-phase", str(STEPS)])
    return out, summary


def test_folder_loads_with_plain_transformers(pretrained):
    """A fresh interpreter that never imports indexcache_train loads the model and the tokenizer and runs DSA."""
    out, summary = pretrained
    check = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tokenizer("def add(a, b):\\n    return a + b\\n" * 4, return_tensors="pt").input_ids
        assert ids.shape[1] > model.config.index_topk, ids.shape  # the top-k really drops keys
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss), loss
        assert type(model).__name__ == "GlmMoeDsaForCausalLM"
        assert tokenizer.decode(ids[0, :15]) == "def add(a, b):\\n"
        assert not any(name.startswith("indexcache_train") for name in sys.modules)
        print(sum(p.numel() for p in model.parameters()), model.config.index_topk)
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=out, timeout=120)
    assert result.returncode == 0, result.stderr
    num_params, index_topk = result.stdout.split()[-2:]
    assert int(num_params) == summary["model"]["parameters"] and int(index_topk) == 16
    assert {"model.safetensors", "config.json", "tokenizer.json", "pretrain.json", "README.md"} <= {
        p.name for p in out.iterdir()}


def test_every_phase_records_its_validation_figures(pretrained):
    out, summary = pretrained
    figures = json.loads((out / "pretrain.json").read_text())["figures"]
    assert list(figures) == ["init", "pretrain", "warmup", "sparse"]
    for name, record in figures.items():
        validation = record if name == "init" else record["validation"]
        for key in ("lm_loss_dense", "lm_loss_dsa", "kl_dense", "kl_sparse", "topk_recall"):
            assert validation[key] >= 0, (name, key)
        assert 0 < validation["topk_recall"] <= 1
        assert len(validation["per_layer"]["topk_recall"]) == 4
        if name != "init":
            assert record["steps"] == STEPS
    card = (out / "README.md").read_text()
    assert summary["command"] in card and summary["rerun_command"] in card
    assert f"{figures['sparse']['validation']['lm_loss_dsa']:.4f}" in card


def test_pretraining_lowers_the_lm_loss(pretrained):
    figures = pretrained[1]["figures"]
    # ln(257) = 5.55 nats at init; two dozen steps on real text learn at least the byte frequencies.
    assert figures["pretrain"]["validation"]["lm_loss_dense"] < figures["init"]["lm_loss_dense"] - 1.0
    assert figures["pretrain"]["train"]["lm_loss_end"] < figures["pretrain"]["train"]["lm_loss_start"]


def test_indexer_warmup_lowers_its_kl_and_leaves_the_base_alone(pretrained):
    figures = pretrained[1]["figures"]
    before, after = figures["pretrain"]["validation"], figures["warmup"]["validation"]
    assert after["kl_dense"] < 0.5 * before["kl_dense"]
    assert figures["warmup"]["train"]["kl_dense_end"] < figures["warmup"]["train"]["kl_dense_start"]
    assert after["lm_loss_dense"] == before["lm_loss_dense"]  # the base is frozen


def test_the_rerun_command_reproduces_the_figures(recipe, pretrained, tmp_path):
    out, summary = pretrained
    rerun = shlex.split(summary["rerun_command"])[2:]  # drop "python scripts/pretrain_tiny.py"
    assert rerun[-4:] == ["--steps", str(STEPS), str(STEPS), str(STEPS)]
    rerun[rerun.index("--out") + 1] = str(tmp_path)
    assert validation_figures(recipe.main(rerun)) == validation_figures(summary)
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def validation_figures(summary: dict) -> dict:
    return {name: record if name == "init" else record["validation"] for name, record in summary["figures"].items()}


def test_rescore_reproduces_the_last_row_from_the_saved_files(recipe, pretrained, tmp_path):
    out, summary = pretrained
    copy = tmp_path / "model"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    rescored = recipe.main(["--out", str(copy), "--rescore", *MICRO])["rescored"]["validation"]
    shipped = summary["figures"]["sparse"]["validation"]
    for key in ("lm_loss_dense", "lm_loss_dsa", "kl_dense", "kl_sparse", "topk_recall"):
        assert rescored[key] == pytest.approx(shipped[key], rel=1e-4, abs=1e-6), key
    card = (copy / "README.md").read_text()
    assert "Rescored from these files" in card and f"{rescored['lm_loss_dsa']:.4f}" in card
    assert json.loads((copy / "pretrain.json").read_text())["figures"] == summary["figures"]


def test_rescore_needs_a_recipe_folder(recipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain.json"):
        recipe.main(["--out", str(tmp_path), "--rescore", "--device", "cpu"])


def test_glm5_next_family_pretrains_its_indexed_layers(recipe, tmp_path):
    """`--family glm5_next` at micro scale: a Glm5NextForConditionalGeneration folder, figures per indexed layer
    (3 and 7), the LM loss falls, and the indexer warm-up leaves the base alone."""
    import torch
    from transformers import Glm5NextForConditionalGeneration

    summary = recipe.main(["--out", str(tmp_path), "--family", "glm5_next", "--model-size", "micro", "--context", "64",
                           "--index-topk", "16", "--device", "cpu", "--eval-sequences", "8", "--max-records", "30",
                           "--steps", "4", "4", "4"])
    figures = summary["figures"]
    assert len(figures["init"]["per_layer"]["topk_recall"]) == 2
    assert figures["sparse"]["validation"]["lm_loss_dense"] < figures["init"]["lm_loss_dense"]
    assert figures["warmup"]["validation"]["lm_loss_dense"] == figures["pretrain"]["validation"]["lm_loss_dense"]
    assert figures["warmup"]["train"]["kl_dense_end"] < figures["warmup"]["train"]["kl_dense_start"]
    model = Glm5NextForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    text = model.config.text_config
    assert (text.index_topk, text.index_kpool, text.max_position_embeddings) == (16, 4, 64)
    assert [i for i, kind in enumerate(text.layer_types) if kind == "indexed_attention"] == [3, 7]
    assert "# Tiny GLM-5.3-Flash" in (tmp_path / "README.md").read_text()
