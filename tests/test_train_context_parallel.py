"""Context parallelism in the trainer, the eval and the search CLIs, on CPU over gloo: a sequence split over
the ranks of a CP group trains, evaluates and searches as on one rank, composes with data parallelism, and
resumes exactly after a kill -9."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from indexcache_train import train
from indexcache_train.config import compose_config
from indexcache_train.data import load_batches
from indexcache_train.evaluate import evaluate
from indexcache_train.modeling import build_model_and_tokenizer
from indexcache_train.pattern_search import greedy_search
from cli_jobs_worker import job_arguments
from conftest import port

TESTS = Path(__file__).parent
# The smoke model with 16 indexer heads, so that exact ties among the indexer's logits (which top-k may break
# differently when the keys are ranked in other blocks) are vanishingly rare; 40 tokens are 4 or 8 zig-zag
# chunks, each shorter than index_topk 16.
SMALL = ["+model.random_init.index_n_heads=16", "data.seq_len=40"]
# A dense step, then sparse ones.
TRAIN = ["experiment=smoke", *SMALL, "data.max_records=8", "distill.dense_steps=1", "trainer.max_steps=4",
         "trainer.save_every=2", "trainer.eval_batches=1", "export=false"]
TRAINABLE = "checkpoints/step4/trainable.safetensors"


def launch(nproc: int, master_port: int, target: list[str], *overrides: str) -> subprocess.CompletedProcess:
    # The workers run as scripts: this checkout's package, installed or not.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={master_port}", *target, *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def train_on(nproc: int, master_port: int, *overrides: str) -> None:
    result = launch(nproc, master_port, ["-m", "indexcache_train.train"], *TRAIN, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]


def train_here(*overrides: str) -> dict:
    """A one-rank run in this process (a world of one on a port of this file's own)."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", str(port(108)))):
            env.setenv(key, value)
        return train.train(compose_config("train", [*TRAIN, *overrides]))


def per_step(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(ours: Path, reference: Path, exact: bool = False) -> None:
    steps, reference_steps = per_step(ours), per_step(reference)
    assert [m["step"] for m in steps] == [m["step"] for m in reference_steps] == [1, 2, 3, 4]
    for key in ("loss", "kl_group/layer0", "kl_group/layer2", "recall/layer1", "grad_norm"):
        got, expected = [m[key] for m in steps], [m[key] for m in reference_steps]
        assert got == expected if exact else got == pytest.approx(expected, rel=1e-5), key
    a, b = load_file(ours / TRAINABLE), load_file(reference / TRAINABLE)
    assert a.keys() == b.keys()
    for key in a:
        # Adam's first steps move a weight by about lr (3e-3) whatever the size of its gradient, so the rounding
        # of a gradient near zero can show in the weight as a small fraction of lr. (The gradient's scale, to
        # which Adam is blind, is checked through grad_norm above.)
        assert torch.equal(a[key], b[key]) if exact else torch.allclose(a[key], b[key], rtol=0, atol=1e-4), key


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("one_rank")
    train_here(f"output_dir={output_dir}")
    return output_dir


EVAL = ["model=tiny_glm", *SMALL, "model.random_init.index_topk=16", "pattern=FSFSFSFS", "num_batches=2",
        "data.max_records=20"]
SEARCH = ["model=tiny_glm", *SMALL, "model.random_init.index_topk=16", "model.random_init.num_hidden_layers=4",
          "search.ratio=null", "search.num_full=2", "search.reference_freqs=[2]", "num_batches=2",
          "data.max_records=20"]


@pytest.fixture(scope="module")
def context_parallel_2(tmp_path_factory) -> Path:
    """One 2-rank launch runs the train, eval and search CLIs with context_parallel_size=2, one after the other
    (each job's `main()`, as `python -m` runs it), so that the tests below share its start-up: train/, eval/
    and search/ hold their outputs."""
    root = tmp_path_factory.mktemp("cp2")
    jobs = [[module, *overrides, f"output_dir={root / folder}", "context_parallel_size=2"]
            for module, overrides, folder in [("indexcache_train.train", TRAIN, "train"),
                                              ("indexcache_train.evaluate", EVAL, "eval"),
                                              ("indexcache_train.search", SEARCH, "search")]]
    result = launch(2, port(103), [str(TESTS / "cli_jobs_worker.py")], *job_arguments(*jobs))
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def test_two_rank_context_parallel_trains_as_one_rank(one_rank, context_parallel_2):
    context_parallel_2 = context_parallel_2 / "train"
    assert_same_training(context_parallel_2, one_rank)
    trained = load_file(context_parallel_2 / TRAINABLE)
    assert any(not torch.equal(trained[k], v) for k, v in load_file(context_parallel_2 / "checkpoints/step2/"
                                                                   "trainable.safetensors").items())
    for table in ("eval_before.json", "eval_after.json"):  # the before/after table's LM loss and KLs
        ours, reference = (json.loads((d / table).read_text()) for d in (context_parallel_2, one_rank))
        keys = ["lm_loss", "mean_recall", "kl_group/layer0", "kl_group/layer2"]
        keys += ["lm_loss_as_loaded"] * (table == "eval_before.json")
        assert [ours[k] for k in keys] == pytest.approx([reference[k] for k in keys], rel=1e-5), table


def test_context_and_data_parallel_compose(tmp_path):
    """cp=2 x dp=2 on 4 ranks, 2 sequences per replica, equals data parallelism over the same sequences.
    The replicas draw positions r, r + 2, ... of one shuffled order, so a step's 4 sequences are those of one
    rank taking 4 at a time; data-parallel training on them averages the two replicas' losses and gradients,
    which is the 4-sequence batch's mean."""
    common = ("trainer.eval_batches=0",)
    train_on(4, port(104), f"output_dir={tmp_path / 'cp2_dp2'}", "context_parallel_size=2", *common)
    train_here(f"output_dir={tmp_path / 'batch4'}", "data.batch_size=4", *common)
    assert_same_training(tmp_path / "cp2_dp2", tmp_path / "batch4")


def test_a_killed_context_parallel_run_resumes_exactly(tmp_path, context_parallel_2):
    killed = tmp_path / "killed"
    # Forward 1 is the before-evaluation, 2-5 are steps 1-4: rank 0 dies in step 3, after the step-2 checkpoint.
    result = launch(2, port(105), [str(TESTS / "train_kill_worker.py"), "4"], *TRAIN, f"output_dir={killed}",
                    "context_parallel_size=2")
    assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-4000:]
    assert (killed / "checkpoints/latest").read_text() == "step2"
    assert not (killed / "checkpoints/step4").exists()
    train_on(2, port(106), f"output_dir={killed}", "context_parallel_size=2")  # resume=auto, as smoke sets
    assert_same_training(killed, context_parallel_2 / "train", exact=True)


def test_two_rank_context_parallel_eval_equals_one_rank(context_parallel_2):
    ours = json.loads((context_parallel_2 / "eval" / "eval.json").read_text())

    cfg = compose_config("eval", EVAL)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    reference = evaluate(model.eval(), load_batches(cfg.data, cfg.num_batches, tokenizer, torch.device("cpu")),
                         cfg.pattern)
    assert ours["num_sequences"] == reference.num_sequences == 4
    assert [ours["lm_loss"], ours["lm_loss_all_full"]] == pytest.approx(
        [reference.lm_loss, reference.lm_loss_all_full], rel=1e-5)
    assert ours["lm_loss"] != ours["lm_loss_all_full"]
    assert ours["context_parallel_size"] == 2 and len(ours["shared_layers"]) == len(reference.shared_layers) == 4
    for stats, expected in zip(ours["shared_layers"], reference.shared_layers):
        assert [stats["layer"], stats["source"]] == [expected.layer, expected.source]
        assert [stats["index_overlap"], stats["attention_recall"]] == pytest.approx(
            [expected.index_overlap, expected.attention_recall], rel=1e-5)


def test_two_rank_context_parallel_search_equals_one_rank(context_parallel_2):
    ours = json.loads((context_parallel_2 / "search" / "search.json").read_text())

    cfg = compose_config("search", SEARCH)
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    batches = load_batches(cfg.data, cfg.num_batches, tokenizer, torch.device("cpu"))
    reference = greedy_search(model.eval(), batches, num_full=2)
    assert ours["all_full_loss"] == pytest.approx(reference.all_full_loss, rel=1e-5)
    assert [s["pattern"] for s in ours["steps"]] == [s.pattern for s in reference.steps]
    for step, expected in zip(ours["steps"], reference.steps):
        assert step["candidates"] == pytest.approx(expected.candidates, rel=1e-5)
    assert ours["layer_forwards"] == reference.layer_forwards  # the prefix cache works the same on shares


@pytest.mark.parametrize(("overrides", "error"), [
    (["context_parallel_size=3"], "does not divide the world size 2"),
    (["context_parallel_size=2", "data.seq_len=3"], "into 4 zig-zag chunks; data.seq_len=3 is shorter"),
    (["context_parallel_size=2", "model.attn_implementation=sdpa"], "model.attn_implementation=indexcache_sparse"),
])
def test_context_parallel_settings_it_cannot_run_are_refused(overrides, error):
    cfg = compose_config("train", [*TRAIN, *overrides])
    with pytest.raises(ValueError, match=error):
        train.check_context_parallel_config(cfg, world_size=2)
