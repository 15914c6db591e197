"""One rank of the ZeRO-3 test (tests/test_zero3.py): runs the trainer and writes what this rank held."""

import json
import resource
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from indexcache_train import train
from indexcache_train.config import compose_config


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(report: str, *overrides: str) -> None:
    cfg = compose_config("train", overrides)
    build = train.build_model
    facts = {}

    def recording_build(model_cfg, config):
        # Everything a load imports and sets up (model code, kernels, tokenizer), done once on a tiny random
        # model first, so that the peak below is the base's load alone.
        build(OmegaConf.merge(model_cfg, {"name_or_path": None, "random_init": {"num_hidden_layers": 2}}))
        AutoTokenizer.from_pretrained(model_cfg.name_or_path)
        facts["rss_before"] = peak_rss_bytes()
        model = build(model_cfg, config)
        params = list(model.parameters())
        facts["full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        facts["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        facts["rss_after_load"] = peak_rss_bytes()
        return model

    train.build_model = recording_build
    summary = train.train(cfg)
    facts["summary_step"] = summary["step"]
    rank = torch.distributed.get_rank()
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
