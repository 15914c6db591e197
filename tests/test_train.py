"""The trainer on CPU: DeepSpeed over gloo, Hydra configs, checkpoints, exact resume, NaN stop, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from indexcache_train import distill, train
from indexcache_train.config import compose_config
from indexcache_train.modeling import byte_tokenizer
from conftest import port


def smoke_config(output_dir, *overrides):
    return compose_config("train", ["experiment=smoke", f"output_dir={output_dir}", *overrides])


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
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port(zero_stage)}",
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


def test_a_base_without_tokenizer_trains_on_input_ids(tmp_path):
    """Records of ready `input_ids` need no tokenizer; text does, and then the error says where it looked."""
    from conftest import build_tiny

    base = tmp_path / "base"
    build_tiny("glm_moe_dsa", initializer_range=0.2).save_pretrained(base)  # weights and config, no tokenizer
    ids = tmp_path / "ids.jsonl"
    generator = torch.Generator().manual_seed(0)
    ids.write_text("".join(json.dumps({"input_ids": torch.randint(0, 257, (300,), generator=generator).tolist()})
                           + "\n" for _ in range(8)))
    summary = train.train(smoke_config(tmp_path / "run", f"model.name_or_path={base}", "data=files",
                                       f"data.files=[{ids}]", "data.seq_len=64", "trainer.max_steps=1",
                                       "trainer.eval_batches=1"))
    assert summary["after"]["lm_loss"] > 0 and (tmp_path / "run/export/config.json").is_file()

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 50}) + "\n")
    with pytest.raises(ValueError, match=rf"needs a tokenizer, but none could be loaded from {base}.*input_ids"):
        train.train(smoke_config(tmp_path / "text_run", f"model.name_or_path={base}", "data=files",
                                 f"data.files=[{text}]", "data.seq_len=64"))


def test_a_killed_run_resumes_with_one_row_per_step_and_the_same_wandb_run(tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["trainer.save_every=2", "export=false", "trainer.eval_batches=0", "logger.mode=offline"]
    train.train(smoke_config(straight, *common, "logger.mode=disabled"))

    calls = []
    forward = distill.IndexerDistillation.forward

    def killed_at_step_4(self, input_ids):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill after step 3 was logged; the last checkpoint is step 2
        return forward(self, input_ids)

    monkeypatch.setattr(distill.IndexerDistillation, "forward", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.train(smoke_config(killed, *common))
    monkeypatch.setattr(distill.IndexerDistillation, "forward", forward)
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3]
    run_id = (killed / "wandb_run_id").read_text()

    train.train(smoke_config(killed, *common))  # the smoke preset resumes (resume=auto)
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(straight)]
    assert (killed / "wandb_run_id").read_text() == run_id
    assert {p.name.rsplit("-", 1)[-1] for p in (killed / "wandb").glob("offline-run-*")} == {run_id}


def test_checkpoint_rng_state_is_not_a_pickle(tmp_path):
    train.train(smoke_config(tmp_path, "trainer.max_steps=1", "export=false", "trainer.eval_batches=0"))
    step = tmp_path / "checkpoints" / "step1"
    assert (step / "rng_rank0.safetensors").is_file() and not list(step.glob("rng_*.pt"))
