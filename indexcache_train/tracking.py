"""Run tracking on rank 0: `metrics.jsonl` (one row per optimizer step) and wandb.

A resumed run continues both where its checkpoint left off: rows logged after that checkpoint (by a run
that was killed later) are dropped from `metrics.jsonl` before the resumed steps are written again, and
wandb continues the same run, whose id is kept in `<output_dir>/wandb_run_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .files import write_text_atomically

METRICS_NAME = "metrics.jsonl"
WANDB_ID_NAME = "wandb_run_id"


class Tracker:
    """metrics.jsonl and wandb, on rank 0 only; `start_step` is the step the run resumes from (0: fresh)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, rank: int, start_step: int):
        self.active = rank == 0
        self.run = None
        if not self.active:
            return
        path = output_dir / METRICS_NAME
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        self.metrics = path.open("a")
        if cfg.logger.mode != "disabled":
            import wandb

            id_path = output_dir / WANDB_ID_NAME
            run_id = id_path.read_text().strip() if start_step > 0 and id_path.is_file() else None
            # On resume, wandb ignores the steps it already holds from the killed run; an exact resume
            # would log the same values there anyway.
            self.run = wandb.init(project=cfg.logger.project, name=cfg.logger.name, mode=cfg.logger.mode,
                                  dir=str(output_dir), id=run_id, resume="allow" if run_id else None,
                                  config=OmegaConf.to_container(cfg, resolve=True))
            write_text_atomically(id_path, self.run.id)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "stage"}, step=record["step"])

    def finish(self, summary: dict) -> None:
        if not self.active:
            return
        self.metrics.close()
        if self.run is not None:
            self.run.summary.update({"final_step": summary["step"]})
            self.run.finish()
