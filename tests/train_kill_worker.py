"""One rank of a trainer run (tests/test_train_context_parallel.py) that rank 0 ends with SIGKILL at its
`kill_at`-th distillation forward, as a crash or a pre-emption would."""

import os
import signal
import sys

from indexcache_train import distill, train
from indexcache_train.config import compose_config


def main(kill_at: str, *overrides: str) -> None:
    forward = distill.IndexerDistillation.forward
    calls = 0

    def forward_or_die(self, input_ids):
        nonlocal calls
        calls += 1
        if calls == int(kill_at) and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, input_ids)

    distill.IndexerDistillation.forward = forward_or_die
    train.train(compose_config("train", overrides))


if __name__ == "__main__":
    main(*sys.argv[1:])
