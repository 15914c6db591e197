"""ZeRO-3 at scale on CPU, for GlmMoeDsa, Glm5Next and DeepSeek-V4: two gloo ranks load a 160-300 MB base
straight into partitions, train the same indexers as one rank does, and neither rank's peak resident memory
grows by the size of the model while loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import port
from safetensors.torch import load_file
from transformers import AutoConfig

from indexcache_train.adapters import current_pattern
from indexcache_train.modeling import (
    byte_tokenizer,
    model_class,
    model_from_config,
    tiny_config,
)

WORKER = Path(__file__).parent / "zero3_worker.py"
# Per family: the base's shape, the run's overrides and the pattern its export declares. The MLA base has ~76M
# parameters (300 MB in fp32) in 12 layers, the other two ~40M (160 MB), most of them in 32 experts per MoE
# layer: a rank holding the model would show in its resident memory, while one layer (the loader's unit) is a
# twelfth, an eighth or a sixth of it.
FAMILIES = {
    "glm_moe_dsa": (dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=32,
                         num_experts_per_tok=2, num_hidden_layers=12, q_lora_rank=128, kv_lora_rank=64,
                         index_head_dim=32, index_n_heads=4, index_topk=16, initializer_range=0.2),
                    ["model=tiny_glm", "distill.pattern=0.25"], "FSSS" * 3),
    "glm5_next": (dict(hidden_size=256, moe_intermediate_size=256, n_routed_experts=32, initializer_range=0.2),
                  ["model=tiny_glm5_next", "distill.pattern=FS"], "FS"),
    "deepseek_v4": (dict(hidden_size=256, moe_intermediate_size=256, n_routed_experts=32, initializer_range=0.2),
                    ["model=tiny_deepseek_v4", "distill.pattern=FSFS"], "FSFS"),
}


def save_base(model_type: str, path: Path) -> None:
    torch.manual_seed(0)
    model = model_from_config(tiny_config(model_type, **FAMILIES[model_type][0]))
    with torch.no_grad():  # pool compressions, position biases and sinks start constant: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("position_bias", "sinks")) or "index_kpool_compress" in name:
                param.normal_(0, 1)
    model.save_pretrained(path, max_shard_size="8MB")  # shards of a few layers
    byte_tokenizer().save_pretrained(path)


def launch(root: Path, bases: dict[str, Path], name: str, nproc: int, *overrides: str) -> dict:
    """One launch of `nproc` ranks that trains every family in turn: {family: (output folder, rank reports)}."""
    # The worker runs as a script: its package comes from this checkout, not from wherever it is installed.
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so resident memory follows live tensors
    # (its default threshold rises once a large block is freed, and freed heap then stays resident).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    jobs = []
    for family, base in bases.items():
        jobs += [*(["then"] if jobs else []), str(root / f"{name}-{family}-report"), "experiment=smoke",
                 *FAMILIES[family][1], f"model.name_or_path={base}", f"output_dir={root / name / family}",
                 "trainer.max_steps=3", "distill.dense_steps=2", "trainer.eval_batches=0", "trainer.save_every=3",
                 "data.seq_len=64", "data.max_records=20", *overrides]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port(31)}", str(WORKER), *jobs]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return {family: (root / name / family,
                     [json.loads((root / f"{name}-{family}-report.rank{r}.json").read_text()) for r in range(nproc)])
            for family in bases}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each family's base trained by one rank (the global batch of two in one micro-batch) and by two ZeRO-3
    ranks (one sequence each: the loader gives rank r positions r, r + 2, ... of the same order, so both see
    the same batches); one launch of each trains all the families."""
    root = tmp_path_factory.mktemp("zero3")
    bases = {family: root / f"base-{family}" for family in FAMILIES}
    for family, path in bases.items():
        save_base(family, path)
    single = launch(root, bases, "single", 1, "deepspeed=zero0", "data.batch_size=2")
    sharded = launch(root, bases, "zero3", 2, "deepspeed=zero3", "data.batch_size=1",
                     "+deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0")
    return bases, single, sharded


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {key: tensor for shard in sorted(folder.glob("*.safetensors")) for key, tensor in load_file(shard).items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_rank_zero3_loads_partitioned_and_matches_one_rank(runs, family):
    bases, single, sharded = runs
    (one_rank, whole), (two_ranks, reports) = single[family], sharded[family]
    model_bytes = sum(f.stat().st_size for f in bases[family].glob("*.safetensors"))
    assert model_bytes > 150e6

    growth = lambda report: report["rss_after_load"] - report["rss_before"]  # noqa: E731
    assert growth(whole[0]) > model_bytes  # the measure sees a whole copy
    for report in reports:
        assert report["local_numel"] <= report["full_numel"] / 2 + 1e5  # a half share, and nothing whole
        # Loading raised the peak resident memory by the half share and a few layers' worth, not by the model.
        assert growth(report) < model_bytes, (report, model_bytes)

    losses = lambda path: [m["loss"] for m in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    torch.testing.assert_close(torch.tensor(losses(two_ranks)), torch.tensor(losses(one_rank)), rtol=1e-5, atol=1e-6)
    a = load_file(one_rank / "checkpoints/step3/trainable.safetensors")
    b = load_file(two_ranks / "checkpoints/step3/trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # Adam divides by the root of the second moment, so near-zero gradients carry rounding into the step
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)

    # The export holds the base's tensors under the checkpoint's own names (DeepSeek-V4's differ from the
    # model's), bitwise, less the S-layer indexers and with only the trained indexers rewritten; transformers
    # reloads it with the pattern and the trained indexers.
    before, after = read_weights(bases[family]), read_weights(two_ranks / "export")
    dropped = before.keys() - after.keys()
    assert dropped and all(".indexer." in key for key in dropped) and after.keys() <= before.keys()
    rewritten = {key for key in after if not torch.equal(after[key], before[key])}
    assert rewritten and all(".indexer." in key for key in rewritten)
    exported = model_class(AutoConfig.from_pretrained(two_ranks / "export")).from_pretrained(two_ranks / "export")
    assert str(current_pattern(exported)) == FAMILIES[family][2]
    state = exported.state_dict()
    for key in b:
        torch.testing.assert_close(state[key], b[key])


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
