"""One rank of the ZeRO-3 tests (tests/test_zero3.py): runs the trainer once per job, in one launch, and writes
what this rank held while each job loaded its model. Arguments: `<report> <overrides>... [then <report>
<overrides>...]...`; each job writes `<report>.rank<r>.json`."""

import json
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from indexcache_train import train
from indexcache_train.config import compose_config

SEPARATOR = "then"


def resident_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def reset_peak_rss() -> None:
    """Linux restarts the peak (VmHWM) from the current resident set, so that each job's load is measured alone
    in a process that ran others before."""
    Path("/proc/self/clear_refs").write_text("5")


def run_job(report: str, overrides: list[str]) -> None:
    cfg = compose_config("train", overrides)
    build = train.build_model
    facts = {}

    def recording_build(model_cfg, config):
        # Everything a load imports and sets up (model code, kernels, tokenizer), done once on the family's
        # tiny random model first, so that the peak below is the base's load alone.
        build(OmegaConf.merge(model_cfg, {"name_or_path": None}))
        AutoTokenizer.from_pretrained(model_cfg.name_or_path)
        reset_peak_rss()
        facts["rss_before"] = resident_kib("VmRSS") * 1024
        model = build(model_cfg, config)
        params = list(model.parameters())
        facts["full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        facts["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        facts["rss_after_load"] = resident_kib("VmHWM") * 1024
        return model

    train.build_model = recording_build
    try:
        summary = train.train(cfg)
    finally:
        train.build_model = build
    facts["summary_step"] = summary["step"]
    rank = torch.distributed.get_rank()
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(facts))


def main(*arguments: str) -> None:
    job: list[str] = []
    for argument in (*arguments, SEPARATOR):
        if argument != SEPARATOR:
            job.append(argument)
            continue
        run_job(job[0], job[1:])
        job = []


if __name__ == "__main__":
    main(*sys.argv[1:])
