"""The embedded default model: a plain transformers checkpoint with a truthful card, the CLIs' default, and a
model with attention structure that IndexCache's trade-offs show on."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from indexcache_train import train
from indexcache_train.config import EMBEDDED_MODEL_DIR, compose_config
from indexcache_train.data import build_dataloader, load_packed
from indexcache_train.metrics import layer_recalls, lm_loss
from indexcache_train.modeling import load_model

MODEL = Path(EMBEDDED_MODEL_DIR)


def test_ships_within_budget_and_loads_with_plain_transformers():
    assert (MODEL / "model.safetensors").stat().st_size <= 16 * 2**20
    check = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(MODEL)!r}, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained({str(MODEL)!r})
        assert type(model).__name__ == "GlmMoeDsaForCausalLM"
        assert not any(name.startswith("indexcache_train") for name in sys.modules)
        print(sum(p.numel() for p in model.parameters()), model.config.index_topk,
              model.config.max_position_embeddings, tokenizer.decode(tokenizer("import os").input_ids))
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    num_params, index_topk, context, *text = result.stdout.split()
    assert int(num_params) <= 8_000_000 and int(index_topk) == 128 and int(context) == 2048
    assert " ".join(text) == "import os"


def test_card_states_the_recorded_figures():
    summary = json.loads((MODEL / "pretrain.json").read_text())
    card = (MODEL / "README.md").read_text()
    assert summary["command"] in card and summary["rerun_command"] in card
    for figures in (summary["figures"]["sparse"]["validation"], summary["rescored"]["validation"]):
        for key in ("lm_loss_dense", "lm_loss_dsa", "kl_dense", "kl_sparse"):
            assert f"{figures[key]:.4f}" in card, key
        assert f"{figures['topk_recall']:.3f}" in card
    assert summary["model"]["parameters"] <= 8_000_000 and summary["model"]["context"] >= 8 * 128


@pytest.mark.parametrize("name", ["train", "eval", "search", "analyze"])
def test_every_cli_defaults_to_the_embedded_model(name):
    cfg = compose_config(name)
    assert cfg.model.name_or_path == EMBEDDED_MODEL_DIR and cfg.model.dtype == "float32"


@pytest.fixture(scope="module")
def model_and_batches():
    model = load_model(EMBEDDED_MODEL_DIR, dtype="float32").eval()
    packed = load_packed(seq_len=1024, tokenizer=AutoTokenizer.from_pretrained(MODEL), split="validation",
                         max_records=4)
    batches = [b["input_ids"] for b in build_dataloader(packed, 2, seed=0, shuffle=False)][:1]
    return model, batches


def test_the_model_has_learnt_the_corpus_and_its_indexers_their_layers(model_and_batches):
    model, batches = model_and_batches
    assert lm_loss(model, batches, "all-F") < 1.6  # nats per byte; a uniform guess is ln(257) = 5.55
    recalls = layer_recalls(model, batches)
    # The top-k holds 128 of up to 1024 keys (12.5% or more); trained indexers hold far more of the mass.
    assert sum(recalls) / len(recalls) > 0.6, recalls


def test_the_quickstart_preset_distils_the_quarter_pattern(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a user's CPU run: the torch KL path
    cfg = compose_config("train", [
        "experiment=quickstart", f"output_dir={tmp_path}", "logger.mode=disabled", "data.seq_len=256",
        "data.max_records=20", "trainer.max_steps=2", "distill.dense_steps=1", "trainer.eval_batches=1",
        "export=false"])
    assert cfg.distill.pattern == 0.25 and cfg.model.name_or_path == EMBEDDED_MODEL_DIR
    summary = train.train(cfg)
    assert summary["pattern"] == "FSSSFSSS"
    before = summary["before"]
    # Sharing costs the real model loss before any distillation: what the preset's table shows closing.
    assert before["lm_loss_as_loaded"] < before["lm_loss"]
    assert torch.isfinite(torch.tensor(summary["after"]["lm_loss"]))
