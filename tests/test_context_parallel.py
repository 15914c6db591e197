"""Context parallelism (`context_parallel.py`): gloo groups of 2 and 4 CPU ranks split each sequence zig-zag
and give the one-rank run's loss, metrics (the sampled recall included), indexer gradients and top-k, in the
dense and the sparse stage with either teacher form, at odd lengths and with chunks shorter than the top-k."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from indexcache_train.context_parallel import zigzag_ranges
from conftest import port

WORKER = Path(__file__).parent / "context_parallel_worker.py"


def test_zigzag_chunks_cover_the_sequence_and_balance_the_causal_load():
    for seq_len, size in [(40, 2), (37, 4), (9, 4), (1000, 8)]:
        ranges = zigzag_ranges(seq_len, size)
        positions = sorted(p for rank in ranges for start, end in rank for p in range(start, end))
        assert positions == list(range(seq_len))
        assert all(end > start for rank in ranges for start, end in rank)
        # Causal work of a rank: the keys its queries see. Zig-zag pairs a cheap chunk with a dear one.
        work = [sum(p + 1 for start, end in rank for p in range(start, end)) for rank in ranges]
        contiguous = [sum(p + 1 for p in range(seq_len * r // size, seq_len * (r + 1) // size)) for r in range(size)]
        assert max(work) / min(work) < max(contiguous) / min(contiguous)
        if seq_len >= 1000:
            assert max(work) / min(work) < 1.02  # contiguous chunks: 15x
    with pytest.raises(ValueError, match="shorter"):
        zigzag_ranges(7, 4)


# (stage, teacher form) pairs: each stage in its default form; on one run, each in the other form too.
DEFAULT_FORMS = [("sparse", "auto"), ("dense", "auto")]
BOTH_FORMS = [*DEFAULT_FORMS, ("sparse", "expanded"), ("dense", "absorbed")]


# (world size, model type, setups, lengths)
CASES = [
    (2, "glm_moe_dsa", BOTH_FORMS, [40, 37]),  # chunks of 10 and an odd length
    (2, "deepseek_v32", DEFAULT_FORMS, [37]),
    (4, "glm_moe_dsa", DEFAULT_FORMS, [37, 9]),  # chunks of 4-5 and of 1-2 tokens, shorter than the top-k of 8
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The results of the worker's ranks, one launch per world size for all of that size's cases (so that
    they share its start-up): results_of(nproc)[rank]."""
    results = {}

    def results_of(nproc: int) -> list[dict]:
        if nproc not in results:
            output = tmp_path_factory.mktemp(f"nproc{nproc}") / "result"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
            cases = [f"{model_type}/{','.join(f'{stage}:{form}' for stage, form in setups)}/"
                     f"{','.join(map(str, lengths))}" for size, model_type, setups, lengths in CASES if size == nproc]
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                       f"--master_port={port(120 + nproc)}", str(WORKER), str(output), *cases]
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            assert result.returncode == 0, result.stderr[-4000:]
            results[nproc] = [torch.load(f"{output}.rank{rank}.pt") for rank in range(nproc)]
        return results[nproc]

    return results_of


@pytest.mark.slow
@pytest.mark.parametrize("nproc, model_type, setups, lengths", CASES)
def test_context_parallel_step_equals_one_rank(launched, nproc, model_type, setups, lengths):
    for results in launched(nproc):
        refused = results["refused"]
        assert len(refused) == 3 and all("sparse forward" in e for e in refused[:2]) and "shorter" in refused[2]
        results = results[model_type]
        assert sorted(results) == sorted(lengths)
        for length, runs_of in results.items():
            assert sorted(runs_of) == sorted(setups)
            for setup, runs in runs_of.items():
                one, split = runs["one_rank"], runs["context_parallel"]
                torch.testing.assert_close(split["loss"], one["loss"], rtol=1e-5, atol=1e-7, msg=str(setup))
                assert split["metrics"].keys() == one["metrics"].keys()
                assert sum(name.startswith("recall/") for name in one["metrics"]) == 4
                for name in one["metrics"]:
                    assert one["metrics"][name] > 0, (setup, name)
                    torch.testing.assert_close(split["metrics"][name], one["metrics"][name], rtol=1e-5, atol=1e-7,
                                               msg=f"{setup} {name}")
                assert split["grads"].keys() == one["grads"].keys()
                for name in one["grads"]:
                    assert one["grads"][name].abs().max() > 0, name  # every trained tensor gets a gradient
                    torch.testing.assert_close(split["grads"][name], one["grads"][name], rtol=1e-4, atol=1e-7,
                                               msg=f"{setup} {name}")
                assert split["topk"].keys() == one["topk"].keys() and len(one["topk"]) == 4
                for layer in one["topk"]:
                    assert torch.equal(split["topk"][layer], one["topk"][layer]), (length, setup, layer)
