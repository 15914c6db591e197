"""DeepSeek-V4: the pattern runs over the compressed-sparse-attention (CSA) layers, whose indexers rank
compressed KV entries; S layers reuse their F layer's top-k of entries through a stand-in."""

import pytest
import torch
from conftest import port
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM

from indexcache_train import apply_indexcache
from indexcache_train.adapters import SharedTopK, current_pattern, get_adapter
from indexcache_train.capture import attention_taps, capture_topk
from indexcache_train.export import export_indexcache
from indexcache_train.modeling import tiny_config

CSA_LAYERS = [1, 3, 4, 5]  # the tiny config's layer_types: sliding, CSA, HCA, CSA, CSA, CSA


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config("deepseek_v4", **overrides)).eval()
    with torch.no_grad():  # position biases and sinks start at zero: make the pooling and the sinks matter
        for name, param in model.named_parameters():
            if name.endswith(("position_bias", "sinks")):
                param.normal_(0, 1)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(1))


def indexer_layers(model):
    keys = [k for k in model.state_dict() if ".self_attn.compressor.indexer." in k]
    return sorted({int(k.split(".")[2]) for k in keys})


def test_pattern_runs_over_the_csa_layers():
    model = build()
    adapter = get_adapter(model)
    assert adapter.indexed_layers(model) == CSA_LAYERS and adapter.num_layers(model) == 4
    assert str(current_pattern(model)) == "FFFF"
    assert adapter.candidate_rate(model) == 4


def test_all_full_changes_nothing(ids):
    model = build()
    before = logits(model, ids)
    assert torch.equal(logits(apply_indexcache(model, "FFFF"), ids), before)
    assert indexer_layers(model) == CSA_LAYERS


def test_pattern_removes_the_s_indexers_and_brings_them_back(ids):
    model = build()
    before = logits(model, ids)
    apply_indexcache(model, "FSFS")
    assert indexer_layers(model) == [1, 4]
    assert model.config.index_topk_pattern == "FSFS" and model.config.use_index_cache is True
    assert str(current_pattern(model)) == "FSFS"
    assert not torch.equal(logits(model, ids), before)
    apply_indexcache(model, "FFFF")
    assert torch.equal(logits(model, ids), before)


def test_shared_layer_attends_to_its_source_topk(ids):
    model = apply_indexcache(build(), "FSSF")
    compressors = [model.model.layers[i].self_attn.compressor for i in CSA_LAYERS]
    assert isinstance(compressors[1].indexer, SharedTopK) and isinstance(compressors[2].indexer, SharedTopK)
    with capture_topk(model) as selected:
        logits(model, ids)
    assert torch.equal(selected[1], selected[0]) and torch.equal(selected[2], selected[0])
    assert not torch.equal(selected[3], selected[0])
    # The taps read each CSA layer's selection back from its attention mask: the same sets.
    seen = {}
    with attention_taps(model, lambda call: seen.__setitem__(call.layer, call)):
        logits(model, ids)
    assert sorted(seen) == [0, 1, 2, 3]
    for layer, call in seen.items():
        assert call.compress_rate == 4 and call.key.shape[2] == 64 // 4
        assert torch.equal(call.topk_indices.sort(-1).values, selected[layer].sort(-1).values)


def test_taps_leave_the_logits_alone(ids):
    model = apply_indexcache(build(), "FSFS")
    before = logits(model, ids)
    with attention_taps(model, lambda call: None):
        assert torch.equal(logits(model, ids), before)


def test_groups_must_not_mix_compress_rates():
    model = build()
    csa = model.model.layers[4].self_attn.compressor  # pattern position 2
    csa.compress_rate = csa.indexer.compress_rate = 8
    apply_indexcache(model, "FSFF")  # layer 2 is F, and no S layer follows it
    with pytest.raises(ValueError, match=r"CSA layers \[2\] would share the top-k of CSA layer 0, but they "
                                         r"compress every 8 tokens and layer 0 every 4"):
        apply_indexcache(model, "FSSF")


def test_export_reloads_with_the_pattern(ids, tmp_path):
    model = apply_indexcache(build(), "FSFS")
    expected = logits(model, ids)
    export_indexcache(model, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert reloaded.config.index_topk_pattern == "FSFS"
    # transformers builds every CSA layer with an indexer (it has no sharing keys for V4): the S ones are
    # missing from the export, and applying the pattern the config declares removes them again.
    assert str(current_pattern(reloaded)) == "FSFS"
    apply_indexcache(reloaded, current_pattern(reloaded))
    assert indexer_layers(reloaded) == [1, 4]
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)


def test_pattern_over_all_decoder_layers_is_read():
    model = build()
    model.config.index_topk_pattern = "SFSSFS"  # one character per decoder layer: the CSA ones count
    assert str(current_pattern(model)) == "FSFS"


# ------------------------------------------------------------------------------------------ distillation
def test_recomputed_projections_reproduce_the_indexer_scores(ids):
    """The differentiable q, k, w the trainer recomputes give the scores V4's own indexer ranks."""
    from indexcache_train.kernels.reference import student_logits

    model = build()
    adapter = get_adapter(model)
    indexer = adapter.indexer(model, 0)
    seen = {}
    indexer.register_forward_hook(lambda m, args, out: seen.__setitem__("args", args))
    indexer.scorer.register_forward_hook(lambda m, args, out: seen.__setitem__("scores", out))
    logits(model, ids)
    hidden, q_resid, position_ids = seen["args"][:3]
    projections = adapter.indexer_projections(indexer, hidden, q_resid, position_ids)
    assert projections.key.shape == (2, 64 // 4, 16) and projections.query.shape == (2, 64, 4, 16)
    torch.testing.assert_close(student_logits(projections.query, projections.key, projections.weights),
                               seen["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_loss_is_the_compressed_kl_of_the_captured_attention(stage, ids):
    """The streamed loss equals the reference KL over compressed entries, averaged over each group's served
    layers, from the same forward's attention (query against the CSA layer's entries) and indexer tensors."""
    from indexcache_train.distill import IndexerDistillation
    from indexcache_train.kernels.reference import reference_compressed_indexer_kl_loss

    model = build()
    distillation = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=8)
    distillation.freeze()
    loss, metrics = distillation(ids)
    adapter = distillation.adapter
    calls, projections, selections = {}, {}, {}
    for source in (0, 3):
        def grab(indexer, args, output, source=source):
            projections[source] = adapter.indexer_projections(indexer, *args[:3])
            selections[source] = output
        adapter.indexer(model, source).register_forward_hook(grab)
    with torch.no_grad(), attention_taps(model, lambda call: calls.__setitem__(call.layer, call)):
        model.model(input_ids=ids)
    expected = 0.0
    for source, served in {0: [0, 1, 2], 3: [3]}.items():
        p = projections[source]
        topk = selections[source] if stage == "sparse" else None
        per_layer = [reference_compressed_indexer_kl_loss(p.query, p.key, p.weights, calls[j].query[None],
                                                          calls[j].key[None], calls[j].scaling, compress_rate=4,
                                                          topk_indices=topk) for j in served]
        expected += sum(per_layer) / len(per_layer)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-6)
    assert 0 < metrics["recall/layer1"] <= 1


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_distillation_trains_only_the_f_indexers_and_the_loss_falls(stage, ids):
    from indexcache_train.distill import IndexerDistillation

    model = build()
    distillation = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=0)
    counts = distillation.freeze()
    f_indexers = [get_adapter(model).indexer(model, layer) for layer in (0, 3)]
    assert counts["trainable"] == sum(p.numel() for ix in f_indexers for p in ix.parameters())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in distillation.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss, _ = distillation(ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert f_indexers[0].position_bias.grad.abs().sum() > 0  # the pooling trains with the indexer
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


# ------------------------------------------------------------------------------------------ eval, search, analyze
def test_prefix_cached_search_loss_equals_a_full_forward(ids):
    """The search's decoder stack (hyper-connection streams, sliding-window mask, both rotary tables) gives
    the loss of a full forward, forking at each candidate CSA layer."""
    from indexcache_train.pattern_search import DecoderStack, score_candidates

    model = build()
    batches = [ids[:1], ids[1:]]
    stack, pattern = DecoderStack(model), current_pattern(model)
    assert stack.starts == [0, 3, 4, 5, 6]
    losses, _ = score_candidates(stack, batches, pattern, [1, 2, 3], [stack.embed(b) for b in batches], "")
    for layer in (1, 2, 3):
        apply_indexcache(model, pattern.with_shared(layer))
        with torch.no_grad():
            full = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
        assert losses[layer] == pytest.approx(full, rel=0, abs=1e-6), layer


def test_evaluate_counts_rows_with_more_entries_than_the_top_k(ids):
    from indexcache_train.evaluate import evaluate

    report = evaluate(build(), [ids], "FSSF")
    assert report.lm_loss_all_full is not None and [s.layer for s in report.shared_layers] == [1, 2]
    for stats in report.shared_layers:
        assert 0 < stats.index_overlap < 1 and 0 < stats.attention_recall < 1
    assert report.indexer_flops_removed == 0.5


def test_sampled_recall_skips_the_queries_before_the_first_entry(ids):
    from indexcache_train.distill import IndexerDistillation

    distillation = IndexerDistillation(build(), "FSFS", kl_backend="torch", recall_rows=64)
    distillation.freeze()
    with torch.no_grad():
        _, metrics = distillation(ids)
    recalls = [metrics[f"recall/layer{layer}"] for layer in range(4)]
    assert all(0 < r <= 1 for r in recalls), recalls


# ------------------------------------------------------------------------------------------ the CLIs
TINY_V4 = ["model=tiny_deepseek_v4", "data.seq_len=64", "data.max_records=30"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The eval, analyze, search and train CLIs on the tiny V4, in one subprocess (each job's `main()`, as
    `python -m` runs it), so that the tests below share its start-up: each job's output folder and stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cli_jobs_worker import job_arguments, job_stdouts

    root = tmp_path_factory.mktemp("v4_cli")
    jobs = {
        "indexcache_train.evaluate": ["pattern=FSSF", "num_batches=2"],
        "indexcache_train.analyze": ["num_batches=1"],
        "indexcache_train.search": ["num_batches=1", "search.ratio=0.25", "search.reference_freqs=[2,4]"],
        "indexcache_train.train": ["deepspeed=zero0", "distill.pattern=FSFS", "distill.stage=schedule",
                                   "distill.dense_steps=3", "trainer.max_steps=6", "trainer.lr=3e-3",
                                   "trainer.warmup_steps=1", "trainer.eval_batches=2", "logger.mode=disabled"],
    }
    tests = Path(__file__).parent
    # The worker runs as a script: this checkout's package, installed or not.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port(142)), "PYTHONPATH": str(tests.parent)}
    arguments = job_arguments(*([module, f"output_dir={root / module}", *overrides, *TINY_V4]
                                for module, overrides in jobs.items()))
    result = subprocess.run([sys.executable, str(tests / "cli_jobs_worker.py"), *arguments], capture_output=True,
                            text=True, timeout=900, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    stdouts = job_stdouts(result.stdout)
    return {module: (root / module, stdouts[module]) for module in jobs}


def test_eval_cli(cli_runs):
    import json

    output, stdout = cli_runs["indexcache_train.evaluate"]
    report = json.loads((output / "eval.json").read_text())
    assert report["pattern"] == "FSSF" and [s["layer"] for s in report["shared_layers"]] == [1, 2]
    assert report["indexer_flops_removed"] == 0.5 and "attention recall" in stdout


def test_analyze_cli(cli_runs):
    import numpy as np

    output, _ = cli_runs["indexcache_train.analyze"]
    matrices = np.load(output / "pairs.npz")
    assert matrices["index_overlap"].shape == (4, 4)
    np.testing.assert_allclose(np.diag(matrices["index_overlap"]), 1.0)
    assert ((matrices["attention_recall"] > 0) & (matrices["attention_recall"] < 1)).all()


def test_search_cli(cli_runs):
    import json

    output, _ = cli_runs["indexcache_train.search"]
    record = json.loads((output / "search.json").read_text())
    assert record["done"] and len(record["steps"]) == 3 and record["final"]["pattern"] == "FSSS"


def test_train_cli_distils_and_exports(cli_runs):
    import json

    out, stdout = cli_runs["indexcache_train.train"]
    recall_line = next(line for line in stdout.splitlines() if line.startswith("mean attention recall"))
    assert "nan" not in recall_line, recall_line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    plan = json.loads((out / "plan.json").read_text())  # planned on its eager reference forward's terms
    assert plan["pattern"] == "FSFS" and plan["terms_gib"]["attention.eager"] > 0 and "Memory plan:" in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    assert reloaded.config.index_topk_pattern == "FSFS"
    apply_indexcache(reloaded, current_pattern(reloaded))
    assert indexer_layers(reloaded) == [1, 4]


# ------------------------------------------------------------------------------------------ bad input
def test_too_few_entries_for_the_top_k_is_refused():
    from indexcache_train.modeling import check_seq_len

    check_seq_len(tiny_config("deepseek_v4"), 20)  # 5 entries > top-4
    with pytest.raises(ValueError, match=r"in compressed entries \(16 // compress rate 4\) must exceed the model's "
                                         r"index_topk \(4\)"):
        check_seq_len(tiny_config("deepseek_v4"), 16)


def test_the_sparse_forward_is_refused_with_the_eager_route():
    from indexcache_train.modeling import check_attn_implementation

    check_attn_implementation(tiny_config("deepseek_v4"), "eager")
    with pytest.raises(ValueError, match="model.attn_implementation=eager"):
        check_attn_implementation(tiny_config("deepseek_v4"), "indexcache_sparse")


def test_a_pattern_of_the_wrong_length_names_the_csa_count():
    with pytest.raises(ValueError, match="has 6 characters, but the model has 4 DSA layers"):
        apply_indexcache(build(), "FSFSFS")  # one per decoder layer: the pattern runs over the 4 CSA layers
