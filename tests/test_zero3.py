"""ZeRO-3 at scale on CPU: two gloo ranks load a 300 MB base straight into partitions, train the same indexers
as one rank does, and neither rank's peak resident memory grows by the size of the model while loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from indexcache_train.modeling import byte_tokenizer
from conftest import port

WORKER = Path(__file__).parent / "zero3_worker.py"
# ~76M parameters (300 MB in fp32) in 12 layers, most of them in 32 experts per MoE layer: a rank holding the
# model would show in its resident memory, while one layer (the loader's unit) is a twelfth of it.
BASE_SHAPE = dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=32,
                  num_experts_per_tok=2, num_hidden_layers=12, q_lora_rank=128, kv_lora_rank=64, index_head_dim=32,
                  index_n_heads=4, index_topk=16, initializer_range=0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("base")
    build_tiny("glm_moe_dsa", **BASE_SHAPE).save_pretrained(path, max_shard_size="8MB")  # shards of a few layers
    byte_tokenizer().save_pretrained(path)
    return path


def run(tmp_path, base, name, nproc, *overrides):
    output = tmp_path / name
    # The worker runs as a script: its package comes from this checkout, not from wherever it is installed.
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so resident memory follows live tensors
    # (its default threshold rises once a large block is freed, and freed heap then stays resident).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port(31)}",
               str(WORKER), str(tmp_path / f"{name}-report"), "experiment=smoke", f"model.name_or_path={base}",
               f"output_dir={output}", "trainer.max_steps=3", "distill.dense_steps=2", "trainer.eval_batches=0",
               "trainer.save_every=3", "data.seq_len=64", "data.max_records=20", "distill.pattern=0.25", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"{name}-report.rank{r}.json").read_text()) for r in range(nproc)]
    return output, reports


@pytest.mark.slow
def test_two_rank_zero3_loads_partitioned_and_matches_one_rank(tmp_path, base):
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert model_bytes > 250e6
    # One rank, the global batch of two in one micro-batch; two ZeRO-3 ranks, one sequence each (the loader
    # gives rank r positions r, r + 2, ... of the same order), so both see the same batches.
    single, whole = run(tmp_path, base, "single", 1, "deepspeed=zero0", "data.batch_size=2")
    sharded, reports = run(tmp_path, base, "zero3", 2, "deepspeed=zero3", "data.batch_size=1",
                           "+deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0")

    growth = lambda report: report["rss_after_load"] - report["rss_before"]  # noqa: E731
    assert growth(whole[0]) > model_bytes  # the measure sees a whole copy
    for report in reports:
        assert report["local_numel"] <= report["full_numel"] / 2 + 1e5  # a half share, and nothing whole
        # Loading raised the peak resident memory by the half share and a few layers' worth, not by the model.
        assert growth(report) < model_bytes, (report, model_bytes)

    losses = lambda path: [m["loss"] for m in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    torch.testing.assert_close(torch.tensor(losses(sharded)), torch.tensor(losses(single)), rtol=1e-5, atol=1e-6)
    a = load_file(single / "checkpoints/step3/trainable.safetensors")
    b = load_file(sharded / "checkpoints/step3/trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # Adam divides by the root of the second moment, so near-zero gradients carry rounding into the step
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)

    # The export copied the base's shards and rewrote only the trained indexers; transformers reloads it.
    exported = AutoModelForCausalLM.from_pretrained(sharded / "export")
    assert exported.config.index_topk_pattern == "FSSS" * 3
    torch.testing.assert_close(exported.state_dict()[next(iter(b))], b[next(iter(b))])


def test_cpu_offload_runs_and_exports(tmp_path):
    from test_train import smoke_config

    from indexcache_train import engine, train

    cfg = smoke_config(tmp_path, "deepspeed=zero3_offload", "trainer.max_steps=2", "distill.dense_steps=1",
                       "trainer.eval_batches=1")
    assert engine.deepspeed_config(cfg, bf16=False)["zero_optimization"]["offload_param"]["device"] == "cpu"
    summary = train.train(cfg)
    assert summary["after"]["lm_loss"] < 10 and (tmp_path / "export" / "config.json").is_file()
    assert json.loads((tmp_path / "plan.json").read_text())["offload_param"] == "cpu"


def test_offload_settings_fail_clearly():
    from omegaconf import OmegaConf

    from indexcache_train.config import DeepSpeedConfig
    from indexcache_train.zero import zero_settings

    settings = lambda **kw: OmegaConf.structured(DeepSpeedConfig(**kw))  # noqa: E731
    with pytest.raises(ValueError, match="needs ZeRO-3"):
        zero_settings(settings(zero_stage=2, offload_param="cpu"))
    with pytest.raises(ValueError, match="nvme_path"):
        zero_settings(settings(zero_stage=3, offload_param="nvme"))
    nvme = zero_settings(settings(zero_stage=3, offload_param="nvme", offload_optimizer="cpu", nvme_path="/nvme"))
    assert nvme["zero_optimization"]["offload_param"] == {"device": "nvme", "pin_memory": torch.cuda.is_available(),
                                                          "nvme_path": "/nvme"}
    assert nvme["zero_force_ds_cpu_optimizer"] is False
