"""The trainer on CPU: DeepSpeed over gloo, Hydra configs, checkpoints, exact resume, NaN stop, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from indexcache_train import distill, train
from indexcache_train.modeling import byte_tokenizer

CONFIGS = Path(__file__).parents[1] / "indexcache_train" / "configs"


def smoke_config(output_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=["experiment=smoke", f"output_dir={output_dir}", *overrides])


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_distils_and_exports(tmp_path):
    summary = train.train(smoke_config(tmp_path))
    before, after = summary["before"], summary["after"]
    assert after["kl_group/layer0"] < before["kl_group/layer0"]
    metrics = read_metrics(tmp_path)
    assert [m["stage"] for m in metrics] == ["dense"] * 3 + ["sparse"] * 3
    assert {"loss", "kl/layer1", "recall/layer1", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib"} <= set(metrics[0])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.index_topk_pattern == "FSFS"
    assert not any(".layers.1.self_attn.indexer" in k for k in exported.state_dict())
    trained = load_file(tmp_path / "checkpoints" / "step6" / "trainable.safetensors")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.items())
    assert "FSFS" in (tmp_path / "export" / "README.md").read_text()


def test_user_model_and_files_export_by_copying_the_base(tmp_path):
    """model.name_or_path and data.files replace the defaults; the export copies the base's shards."""
    from conftest import build_tiny

    base = tmp_path / "base"
    build_tiny("glm_moe_dsa", initializer_range=0.2).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3}) + "\n"
                            for i in range(300)))
    summary = train.train(smoke_config(
        tmp_path / "run", f"model.name_or_path={base}", f"data.files=[{data}]", "distill.pattern={freq:2}",
        "trainer.gradient_accumulation_steps=2", "trainer.max_steps=2", "trainer.eval_batches=1"))
    assert summary["pattern"] == "FSFS"
    exported, original = load_file(tmp_path / "run/export/model.safetensors"), load_file(base / "model.safetensors")
    assert set(exported) == {k for k in original if not k.startswith(("model.layers.1.self_attn.indexer",
                                                                        "model.layers.3.self_attn.indexer"))}
    changed = {k for k in exported if not torch.equal(exported[k], original[k])}
    assert changed and all(".self_attn.indexer." in k for k in changed)
    assert (tmp_path / "run/export/tokenizer.json").is_file()


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["trainer.lr_decay_steps=6", "export=false", "trainer.eval_batches=0"]
    train.train(smoke_config(straight, "trainer.max_steps=6", "resume=null", *common))
    train.train(smoke_config(split, "trainer.max_steps=3", "resume=null", *common))
    train.train(smoke_config(split, "trainer.max_steps=6", "resume=auto", *common))
    final = "checkpoints/step6/trainable.safetensors"
    a, b = load_file(straight / final), load_file(split / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda path: [(m["step"], m["loss"]) for m in read_metrics(path)]  # noqa: E731
    assert losses(straight) == losses(split)


def test_existing_checkpoints_are_not_overwritten(tmp_path):
    args = ("trainer.max_steps=1", "export=false", "trainer.eval_batches=0", "resume=null")
    train.train(smoke_config(tmp_path, *args))
    with pytest.raises(FileExistsError, match="resume=auto"):
        train.train(smoke_config(tmp_path, *args))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    forward = distill.IndexerDistillation.forward

    def poisoned(self, input_ids):
        calls.append(1)
        loss, metrics = forward(self, input_ids)
        return (loss * float("nan") if len(calls) == 4 else loss), metrics

    monkeypatch.setattr(distill.IndexerDistillation, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"nan at step 4.*step3 \(untouched\)"):
        train.train(smoke_config(tmp_path, "trainer.eval_batches=0"))
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step3"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step3"]
    assert load_file(checkpoints / "step3" / "trainable.safetensors")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_rank_deepspeed(tmp_path, zero_stage):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29600 + zero_stage}",
               "-m", "indexcache_train.train", "experiment=smoke", f"deepspeed=zero{zero_stage}",
               f"output_dir={tmp_path}", "trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_batches=1",
               # Step 2 is sparse, whose absorbed teacher reads kv_b_proj: under ZeRO-3, with nothing kept
               # whole, it must gather it.
               "distill.dense_steps=1", "+deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert {"latest", "step1", "step2"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.index_topk_pattern == "FSFS"
