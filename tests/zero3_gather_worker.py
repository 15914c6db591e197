"""One rank of the planner's ZeRO-3 check (tests/test_plan.py): runs the trainer and writes the most parameters
that DeepSpeed held gathered at once."""

import json
import sys
from pathlib import Path

from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from indexcache_train import train
from indexcache_train.config import compose_config


def main(report: str, *overrides: str) -> None:
    build = train.build_model
    peak = {"gathered": 0}

    def recording_build(model_cfg, config=None):
        model = build(model_cfg, config)
        params = list(model.parameters())

        def record(module, args, output):
            # Registered before DeepSpeed's own hooks: it runs after a module's fetch and prefetch, before the
            # release. In-flight parameters count, as DeepSpeed counts them against its limit.
            gathered = sum(p.ds_numel for p in params
                           if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist)
            peak["gathered"] = max(peak["gathered"], gathered)

        for module in model.modules():
            module.register_forward_hook(record)
        return model

    train.build_model = recording_build
    train.train(compose_config("train", overrides))
    Path(report).write_text(json.dumps(peak))


if __name__ == "__main__":
    main(*sys.argv[1:])
