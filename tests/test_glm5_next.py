"""Glm5Next (GLM-5.3-Flash): hybrid KDA + indexed attention; the pattern runs over the indexed layers."""

import pytest
import torch
from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

from indexcache_train import apply_indexcache
from indexcache_train.adapters import current_pattern, get_adapter
from indexcache_train.export import export_indexcache

LINEAR, INDEXED = "linear_attention", "indexed_attention"


def build(seed=0, **text):
    """8 decoder layers by default: layers 3 and 7 are indexed, the rest KDA."""
    config = {"hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16, "num_hidden_layers": 8,
              "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "kv_lora_rank": 8, "q_lora_rank": 8, "v_head_dim": 8, "qk_nope_head_dim": 8, "index_topk": 8,
              "index_head_dim": 8, "index_n_heads": 2, "index_kpool": 4, "linear_head_dim": 8, "linear_num_heads": 2,
              "hc_mult": 2, "hc_sinkhorn_iters": 2, "vocab_size": 64, "pad_token_id": 0, "max_position_embeddings": 128}
    config.update(text)
    torch.manual_seed(seed)
    vision = {"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 16, "out_hidden_size": 32}
    model = Glm5NextForConditionalGeneration(Glm5NextConfig(text_config=config, vision_config=vision)).eval()
    with torch.no_grad():  # the pooled indexer's compression starts at zeros/ones: make the pools differ
        for name, param in model.named_parameters():
            if "index_kpool_compress" in name:
                param.normal_(0, 1)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def ids():
    return torch.randint(1, 64, (2, 40), generator=torch.Generator().manual_seed(1))


def indexer_keys(model):
    return sorted({k.split(".self_attn.indexer.")[0] for k in model.state_dict() if ".self_attn.indexer." in k})


def test_pattern_runs_over_the_indexed_layers():
    model = build()
    adapter = get_adapter(model)
    assert adapter.indexed_layers(model) == [3, 7] and adapter.num_layers(model) == 2
    assert str(current_pattern(model)) == "FF"


def test_all_full_changes_nothing(ids):
    model = build()
    before = logits(model, ids)
    assert torch.equal(logits(apply_indexcache(model, "FF"), ids), before)
    assert indexer_keys(model) == ["model.language_model.layers.3", "model.language_model.layers.7"]


def test_pattern_removes_the_s_indexers_and_brings_them_back(ids):
    model = build()
    before = logits(model, ids)
    apply_indexcache(model, "FS")
    assert indexer_keys(model) == ["model.language_model.layers.3"]
    assert model.config.text_config.indexer_types == ["full"] * 4 + ["shared"] * 4
    assert model.config.text_config.index_topk_pattern == "FS"
    assert str(current_pattern(model)) == "FS"
    assert not torch.equal(logits(model, ids), before)
    apply_indexcache(model, "FF")
    assert torch.equal(logits(model, ids), before)


def test_shared_layer_uses_its_source_topk(ids):
    model = apply_indexcache(build(), "FS")
    decoder = model.model.language_model.layers
    seen = {}
    decoder[3].self_attn.indexer.register_forward_hook(lambda m, a, out: seen.__setitem__("f", out))
    decoder[7].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("s", kw["prev_topk_indices"]), with_kwargs=True)
    logits(model, ids)
    assert torch.equal(seen["f"], seen["s"])


def test_matches_native_indexer_types(ids):
    """Native sharing only reaches a directly following indexed layer (linear layers drop the top-k and S
    layers do not pass it on), so compare on a layout with adjacent indexed layers, LIIII, pattern FSFS."""
    layout = [LINEAR] + [INDEXED] * 4
    native = build(seed=3, num_hidden_layers=5, layer_types=layout, indexer_types=["full", "full", "shared", "full", "shared"])
    ours = build(seed=4, num_hidden_layers=5, layer_types=layout)
    state = {k: v for k, v in native.state_dict().items()}
    apply_indexcache(ours, "FSFS")
    ours.load_state_dict(state, strict=True)
    assert indexer_keys(ours) == indexer_keys(native)
    assert torch.equal(logits(ours, ids), logits(native, ids))


def test_fss_across_linear_layers_has_no_native_equivalent_but_runs(ids):
    """12 layers, 3 indexed: FSS needs the relay through linear layers and S layers; native raises."""
    model = build(num_hidden_layers=12)
    native = build(num_hidden_layers=12, indexer_types=["full"] * 4 + ["shared"] * 8)
    with pytest.raises(ValueError, match="require top-k"):
        logits(native, ids)
    apply_indexcache(model, "FSS")
    assert model.config.text_config.indexer_types == native.config.text_config.indexer_types
    model.load_state_dict(native.state_dict(), strict=True)
    out = logits(model, ids)
    assert torch.isfinite(out).all()


def load_plain(path):
    model, info = Glm5NextForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.eval()


def test_export_reloads_with_native_sharing(tmp_path, ids):
    """Adjacent indexed layers: plain transformers runs the exported pattern natively, logits unchanged."""
    model = apply_indexcache(build(num_hidden_layers=5, layer_types=[LINEAR] + [INDEXED] * 4), "FSFS")
    reloaded = load_plain(export_indexcache(model, tmp_path / "export"))
    assert reloaded.config.text_config.indexer_types == ["full", "full", "shared", "full", "shared"]
    assert indexer_keys(reloaded) == indexer_keys(model)
    assert str(current_pattern(reloaded)) == "FSFS"
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_export_of_the_hybrid_layout_reloads_without_the_s_indexers(tmp_path, ids):
    """Default layout: plain transformers builds layer 7 without an indexer from `indexer_types`; its forward
    cannot relay the top-k across the linear layers, so `apply_indexcache` with the saved pattern does."""
    model = apply_indexcache(build(), "FS")
    folder = export_indexcache(model, tmp_path / "export")
    assert "apply_indexcache(model, current_pattern(model))" in (folder / "README.md").read_text()
    reloaded = load_plain(folder)
    assert indexer_keys(reloaded) == ["model.language_model.layers.3"]
    assert str(current_pattern(reloaded)) == "FS"
    assert not hasattr(reloaded.config, "indexer_types")  # only on the text config, over the decoder layers
    apply_indexcache(reloaded, current_pattern(reloaded))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_capture_topk_sees_each_indexed_layer(ids):
    from indexcache_train.capture import capture_topk

    model = build(num_hidden_layers=12)
    before = logits(model, ids)
    with capture_topk(model) as topk:
        assert torch.equal(logits(model, ids), before)
    assert sorted(topk) == [0, 1, 2] and topk[0].shape == (2, 40, 8 + 4 - 1)  # top-k plus the visible tail
    apply_indexcache(model, "FSF")
    with capture_topk(model) as shared:
        logits(model, ids)
    assert torch.equal(shared[1], shared[0]) and torch.equal(shared[0], topk[0])


def test_attention_tap_is_exact_in_pattern_positions(ids):
    from indexcache_train.capture import attention_taps, capture_attention

    model = apply_indexcache(build(), "FS")
    before = logits(model, ids)
    calls = []
    with attention_taps(model, calls.append):
        tapped = logits(model, ids)
    assert torch.equal(tapped, before)
    assert [c.layer for c in calls] == [0, 1] and calls[0].query.shape == (2, 2, 40, 8)
    assert model.config._attn_implementation == "sdpa"
    with capture_attention(model, layers=[1]) as probs, torch.no_grad():
        model(input_ids=ids)
    assert list(probs) == [1] and torch.allclose(probs[1].sum(-1), torch.ones(2, 40))


def test_the_sparse_forward_refuses_it_with_the_native_route():
    from indexcache_train.sparse_forward import use_sparse_forward

    with pytest.raises(ValueError, match="attn_implementation=sdpa"):
        use_sparse_forward(build())


def indexer_inputs(model, seed=0, seq_len=42):
    indexer = get_adapter(model).indexer(model, 0)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, seq_len, indexer.hidden_size, generator=gen)
    q_resid = torch.randn(2, seq_len, indexer.q_lora_rank, generator=gen)
    return indexer, hidden, q_resid


def test_pooled_projections_compress_as_the_native_indexer():
    """Our differentiable pool keys are those of `Glm5NextTextIndexer.get_pooled_states`, at every token of
    each complete pool (42 tokens, pools of 4: 10 pools, the last 2 tokens in none)."""
    model = build()
    indexer, hidden, q_resid = indexer_inputs(model)
    projections = get_adapter(model).indexer_projections(indexer, hidden, q_resid)
    with torch.no_grad():
        key = indexer.k_norm(indexer.wk(hidden))
        gate = torch.nn.functional.linear(hidden, indexer.index_kpool_compress_gate)
        packed = torch.cat([key, gate, torch.ones(2, 42, 1)], dim=-1)
        native_keys, _, native_valid = indexer.get_pooled_states(packed)
    assert native_valid.all() and native_keys.shape[1] == 10
    torch.testing.assert_close(projections.key[:, :40], native_keys.repeat_interleave(4, dim=1))
    assert (projections.key[:, 40:] == 0).all()
    q = indexer.wq_b(q_resid).view(2, 42, indexer.n_heads, indexer.head_dim)
    torch.testing.assert_close(projections.query, q * indexer.softmax_scale)


@pytest.mark.parametrize("sparse", [False, True])
def test_pooled_kl_gradients_equal_the_reference_in_every_indexer_parameter(sparse):
    """IndexerKLLoss on the adapter's projections against the materialising pool-level reference fed with the
    native `get_pooled_states` pool keys: equal gradients in wq_b, wk, k_norm, weights_proj and the
    compression (gate, ape); the value exceeds the reference's pooled KL by its teacher-only term."""
    from indexcache_train.kernels import IndexerKLLoss
    from indexcache_train.kernels.reference import reference_pooled_indexer_kl_loss

    model = build()
    indexer, hidden, q_resid = indexer_inputs(model, seed=1)
    indexer.requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    teacher_q, teacher_k = torch.randn(2, 2, 2, 42, 8, generator=gen), torch.randn(2, 2, 2, 42, 8, generator=gen)
    topk = None
    if sparse:
        with torch.no_grad():
            topk = indexer(hidden_states=hidden, q_resid=q_resid, attention_mask=torch.ones(2, 42, dtype=torch.bool),
                           cache=None)
        assert (topk > torch.arange(42)[None, :, None] - (torch.arange(42) + 1)[None, :, None] % 4).any()  # a tail

    projections = get_adapter(model).indexer_projections(indexer, hidden, q_resid)
    kl = IndexerKLLoss(projections.query, projections.key, projections.weights, num_layers=2, topk_indices=topk,
                       backend="torch", pool_size=4)
    for g in range(2):
        kl.add_layer(teacher_q[g], teacher_k[g], 0.35)
    value = kl.loss()
    value.backward()
    ours = {name: p.grad.clone() for name, p in indexer.named_parameters()}
    indexer.zero_grad()

    key = indexer.k_norm(indexer.wk(hidden))
    gate = torch.nn.functional.linear(hidden, indexer.index_kpool_compress_gate)
    pool_keys, _, _ = indexer.get_pooled_states(torch.cat([key, gate, torch.ones(2, 42, 1)], dim=-1))
    q = indexer.wq_b(q_resid).view(2, 42, indexer.n_heads, indexer.head_dim) * indexer.softmax_scale
    w = indexer.weights_proj(hidden) * indexer.n_heads ** -0.5
    layer_kls = [reference_pooled_indexer_kl_loss(q, pool_keys, w, teacher_q[g:g + 1], teacher_k[g:g + 1], 0.35,
                                                  pool_size=4, topk_indices=topk) for g in range(2)]
    reference = sum(kl for kl, _ in layer_kls) / 2
    reference.backward()
    torch.testing.assert_close(value, (reference + sum(t for _, t in layer_kls) / 2).detach())
    assert set(ours) >= {"index_kpool_compress_ape", "index_kpool_compress_gate", "wq_b.weight", "wk.weight"}
    for name, p in indexer.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_distillation_trains_only_the_f_indexers_and_the_loss_falls(stage, ids):
    """Native path (sdpa), pattern FS: only layer 3's indexer, pooling parameters included, gets gradients,
    and six AdamW steps lower the loss."""
    from indexcache_train.distill import IndexerDistillation

    model = build(initializer_range=0.5)
    distill = IndexerDistillation(model, "FS", stage=stage)
    counts = distill.freeze()
    f_indexer = get_adapter(model).indexer(model, 0)
    assert counts["trainable"] == sum(p.numel() for p in f_indexer.parameters())
    trainable = [p for p in distill.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss, metrics = distill(ids)
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
            assert with_grad == {f"model.language_model.layers.3.self_attn.indexer.{n}"
                                 for n, _ in f_indexer.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert set(metrics) == {"kl/layer0", "kl/layer1", "recall/layer0", "recall/layer1", "kl_group/layer0"}
    assert losses[-1] < 0.95 * losses[0], losses


def test_indexcache_train_runs_on_a_tiny_glm5_next(tmp_path):
    """`indexcache-train experiment=smoke_glm5_next`: the tiny random GLM-5.3-Flash (model=tiny_glm5_next) on the
    native path, dense then sparse steps, the group KL falls on held-out batches, the memory plan is written,
    and the export reloads in plain transformers without the S indexer."""
    import json

    from indexcache_train import train
    from indexcache_train.config import compose_config

    def config(*overrides):
        return compose_config("train", ["experiment=smoke_glm5_next", f"output_dir={tmp_path}", *overrides])

    summary = train.train(config("trainer.check_plan=true"))
    assert summary["pattern"] == "FS"
    plan = json.loads((tmp_path / "plan.json").read_text())  # planned on its reference forward's terms
    assert plan["pattern"] == "FS" and plan["terms_gib"]["linear"] > 0 and plan["activations_gib_per_gpu"] > 0
    assert summary["after"]["kl_group/layer0"] < summary["before"]["kl_group/layer0"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["dense"] * 3 + ["sparse"] * 3
    assert {"kl/layer1", "recall/layer1"} <= set(rows[0])
    reloaded = load_plain(tmp_path / "export")
    assert indexer_keys(reloaded) == ["model.language_model.layers.3"]
    assert str(current_pattern(reloaded)) == "FS"


def test_evaluate_reports_overlap_recall_and_flops(ids):
    """indexcache-eval's `evaluate` on 3 indexed layers, FSS: the S layers' selections come from capture_topk
    (its taps carry none), rows count from t = top-k + P - 1, and the pooled indexer's FLOPs scale with L^2/P."""
    from indexcache_train.evaluate import evaluate, indexer_flops_per_layer

    model = build(num_hidden_layers=12, initializer_range=0.5)
    report = evaluate(model, [ids, ids.flip(0)], "FSS")
    assert [(s.layer, s.source) for s in report.shared_layers] == [(1, 0), (2, 0)]
    for s in report.shared_layers:
        assert 0 < s.index_overlap < 1 and 0 < s.attention_recall < 1
    assert report.indexer_flops_removed == pytest.approx(2 / 3) and report.lm_loss != report.lm_loss_all_full
    text = model.config.text_config.to_dict()
    per_key, per_pool = (indexer_flops_per_layer(Glm5NextConfig(text_config={**text, "index_kpool": pool}), 8000)
                         for pool in (1, 4))
    assert 3.5 < per_key / per_pool < 4  # the scored pairs, over pools of 4, dominate at 8K tokens
    with pytest.raises(ValueError, match="drops a candidate"):
        evaluate(model, [ids[:, :11]], "FSS")


def test_analyze_layer_pairs_over_the_indexed_layers(ids):
    """indexcache-analyze's pairwise matrices run over the pattern positions (3 indexed layers); a layer's own
    top-k overlaps itself fully, and recall stays in (0, 1]."""
    from indexcache_train.analyze import layer_pairs

    pairs = layer_pairs(build(num_hidden_layers=12, initializer_range=0.5), [ids])
    assert pairs.index_overlap.shape == (3, 3) and pairs.attention_recall.shape == (3, 3)
    assert pairs.index_overlap.diagonal() == pytest.approx(1.0)
    assert ((pairs.attention_recall > 0) & (pairs.attention_recall <= 1 + 1e-6)).all()
    assert (pairs.index_overlap < 1).any()


def test_prefix_cached_search_loss_equals_a_full_forward(ids):
    """The search's decoder stack (the text model's hyper-connection streams, NoPE, the [B, L] padding mask)
    gives the loss of a full forward, forking at each candidate indexed layer, also where the candidate's top-k
    comes from an F layer across linear layers and S layers already in the pattern."""
    from indexcache_train.pattern import IndexCachePattern
    from indexcache_train.pattern_search import DecoderStack, score_candidates

    model = build(num_hidden_layers=16, initializer_range=0.5)
    batches = [ids[:1], ids[1:]]
    stack = DecoderStack(model)
    assert stack.starts == [0, 7, 11, 15, 16]  # position j starts at its indexed layer (position 0 at layer 0)
    for pattern, candidates in (("FFFF", [1, 2, 3]), ("FSFF", [2, 3])):
        pattern = IndexCachePattern.parse(pattern)
        losses, _ = score_candidates(stack, batches, pattern, candidates, [stack.embed(b) for b in batches], "")
        for layer in candidates:
            apply_indexcache(model, pattern.with_shared(layer))
            with torch.no_grad():
                full = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
            assert losses[layer] == pytest.approx(full, rel=0, abs=1e-6), (str(pattern), layer)
        assert len({round(loss, 6) for loss in losses.values()}) == len(losses)  # the candidates differ


def test_search_cli_on_a_tiny_glm5_next(tmp_path):
    """`indexcache-search model=tiny_glm5_next` with 16 decoder layers (4 indexed): greedy to 1/4, a valid
    pattern over the indexed layers, nested read-offs, and each step keeps its cheapest candidate."""
    import json
    import math

    from indexcache_train import search
    from indexcache_train.config import compose_config
    from indexcache_train.pattern import IndexCachePattern

    cfg = compose_config("search", ["model=tiny_glm5_next", "model.random_init.num_hidden_layers=16",
                                    "data.seq_len=64", "data.batch_size=2", "data.max_records=20", "num_batches=2",
                                    "search.ratio=0.25", "search.reference_freqs=[2,4]", "device=cpu",
                                    f"output_dir={tmp_path}"])
    search.run(cfg)
    record = json.loads((tmp_path / "search.json").read_text())
    assert record["done"] and record["num_layers"] == 4 and len(record["steps"]) == 3
    final = IndexCachePattern.parse(record["final"]["pattern"], 4)  # raises unless valid for 4 positions
    assert final.layers == record["steps"][-1]["pattern"] and final.full_layers == [0]
    for step in record["steps"]:
        assert step["loss"] == min(step["candidates"].values())
        assert all(math.isfinite(loss) for loss in step["candidates"].values())
    assert {s["freq"]: s["num_full"] for s in record["searched"]} == {2: 2, 4: 1}
    assert math.isfinite(record["all_full_loss"]) and (tmp_path / "search.png").is_file()
