"""Several CLI jobs in one process or launched world (tests/test_train_context_parallel.py,
tests/test_deepseek_v4.py): each job is a module's `main()` on its own overrides, as `python -m <module>
<overrides>` runs it, so that one start-up (imports, process group) serves them all. Arguments:
`<module> <overrides>... [then <module> <overrides>...]...`; each job's stdout follows a line JOB_HEADER + module."""

import importlib
import sys

SEPARATOR = "then"
JOB_HEADER = "### job: "


def job_arguments(*jobs: list[str]) -> list[str]:
    """The worker's arguments for `jobs`, each [module, *overrides]."""
    return [argument for i, job in enumerate(jobs) for argument in ([SEPARATOR] if i else []) + job]


def job_stdouts(stdout: str) -> dict[str, str]:
    """Each job's stdout, by module (one job per module)."""
    sections = stdout.split(JOB_HEADER)[1:]
    return dict(section.split("\n", 1) for section in sections)


def main(*arguments: str) -> None:
    jobs, job = [], []
    for argument in (*arguments, SEPARATOR):
        if argument != SEPARATOR:
            job.append(argument)
            continue
        jobs.append(job)
        job = []
    for module, *overrides in jobs:
        print(f"{JOB_HEADER}{module}", flush=True)
        sys.argv = [module, *overrides]  # what Hydra parses
        importlib.import_module(module).main()


if __name__ == "__main__":
    main(*sys.argv[1:])
