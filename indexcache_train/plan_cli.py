"""`indexcache-plan`: the per-GPU memory of a distillation run, from the model's config alone.

    indexcache-plan model=glm5_shape plan.world_size=16 data.seq_len=131072 distill.pattern=0.25
    indexcache-plan model=from_pretrained model.name_or_path=/ckpt/DeepSeek-V3.2-Exp deepspeed=zero3_offload \\
        plan.world_size=1

It prints the table and writes `${output_dir}/plan.json` (the fields of `plan.Plan`); it exits with status 1
when the plan does not fit. The trainer prints the same plan when it starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import CONFIG_DIR, check_known_keys, register_configs
from .files import write_text_atomically
from .plan import H200_GIB, Plan, plan_from_config


def run_plan(cfg: DictConfig) -> Plan:
    plan = plan_from_config(cfg, world_size=cfg.plan.world_size, gpu_gib=cfg.plan.gpu_memory_gib or H200_GIB)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))
    print(plan.table())
    return plan


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="plan")
def _hydra_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "plan")
    if not run_plan(cfg).fits:
        sys.exit(1)


def main() -> None:
    register_configs()  # here, not at import: importing the package registers nothing
    _hydra_main()


if __name__ == "__main__":
    main()
