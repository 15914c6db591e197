import pytest
import torch
from conftest import build_tiny

from indexcache_train.capture import attention_taps
from indexcache_train.distill import IndexerDistillation, causal_topk
from indexcache_train.kernels import reference_indexer_kl_loss


def test_only_f_indexers_train(model_type):
    distillation = IndexerDistillation(build_tiny(model_type), "FSSF", kl_backend="torch")
    counts = distillation.freeze()
    trainable = {n for n, p in distillation.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.model.layers.0.self_attn.indexer.",
                                           "model.model.layers.3.self_attn.indexer.")) for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in distillation.parameters() if p.requires_grad)
    assert counts["frozen"] > 10 * counts["trainable"]


def test_gradients_reach_only_f_indexers(model_type):
    distillation = IndexerDistillation(build_tiny(model_type, initializer_range=0.2), "FSSF", kl_backend="torch")
    distillation.freeze()
    loss, metrics = distillation(torch.randint(0, 257, (2, 40)))
    loss.backward()
    for name, p in distillation.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
    assert sorted(k for k in metrics if k.startswith("kl/")) == [f"kl/layer{i}" for i in range(4)]
    assert 0 < metrics["recall/layer1"] <= 1


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_loss_is_the_multi_layer_kl_of_the_captured_attention(stage):
    """The streamed loss equals the reference KL, averaged over each group's served layers, computed from
    the same forward's attention and indexer tensors."""
    model = build_tiny("glm_moe_dsa", initializer_range=0.2)
    distillation = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=0)
    distillation.freeze()
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    loss, metrics = distillation(ids)

    calls, projections, selections = {}, {}, {}
    adapter = distillation.adapter

    def grab(indexer, args, output):
        projections[indexer.layer_idx] = adapter.indexer_projections(indexer, *args[:3])
        selections[indexer.layer_idx] = causal_topk(output)

    hooks = [adapter.indexer(model, f).register_forward_hook(grab) for f in (0, 3)]
    with torch.no_grad(), attention_taps(model, lambda call: calls.__setitem__(call.layer, call)):
        model.model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    expected = 0.0
    for source, served in {0: [0, 1, 2], 3: [3]}.items():
        p = projections[source]
        topk = selections[source] if stage == "sparse" else None
        per_layer = [reference_indexer_kl_loss(p.query, p.key, p.weights, calls[j].query[None], calls[j].key[None],
                                               calls[j].scaling, topk_indices=topk) for j in served]
        expected += sum(per_layer) / len(per_layer)
        torch.testing.assert_close(metrics[f"kl/layer{served[-1]}"], per_layer[-1].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_own_layer_only_keeps_each_f_layers_own_term_under_the_pattern(stage):
    """cross_layer=False (the paper's ablation): the same forward under the pattern, but each F indexer's
    loss is its own layer's KL alone, which equals that layer's term of the multi-layer loss."""
    model = build_tiny("glm_moe_dsa", initializer_range=0.2)
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    cross = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=0)
    _, cross_metrics = cross(ids)
    own = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=0, cross_layer=False)
    own.freeze()
    loss, metrics = own(ids)
    assert sorted(k for k in metrics if k.startswith("kl/")) == ["kl/layer0", "kl/layer3"]
    for layer in (0, 3):
        torch.testing.assert_close(metrics[f"kl_group/layer{layer}"], cross_metrics[f"kl/layer{layer}"])
    assert not torch.allclose(cross_metrics["kl_group/layer0"], metrics["kl_group/layer0"])  # layers 1, 2 count there
    torch.testing.assert_close(loss, cross_metrics["kl/layer0"] + cross_metrics["kl/layer3"])
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in own.parameters())


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="Unknown distillation stage"):
        IndexerDistillation(build_tiny(), "FSSF", stage="warmup")


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_absorbed_teacher_gives_the_same_loss_and_gradients(model_type, stage):
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    results = {}
    for form in ("absorbed", "expanded"):
        distillation = IndexerDistillation(build_tiny(model_type, initializer_range=0.2), "FSSF", stage=stage,
                                           kl_backend="torch", recall_rows=0, teacher_form=form)
        distillation.freeze()
        loss, _ = distillation(ids)
        loss.backward()
        results[form] = (loss.detach(), [p.grad for p in distillation.parameters() if p.requires_grad])
    (absorbed, absorbed_grads), (expanded, expanded_grads) = results["absorbed"], results["expanded"]
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-6)
    for a, b in zip(absorbed_grads, expanded_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_absorbed_scores_equal_the_expanded_ones():
    from indexcache_train.capture import attention_taps
    from indexcache_train.teacher import AbsorbedTeacher

    model = build_tiny("glm_moe_dsa")
    attentions = [layer.self_attn for layer in model.model.layers]
    pairs = []
    with torch.no_grad(), AbsorbedTeacher(attentions) as teacher, \
            attention_taps(model, lambda call: pairs.append(((call.query, call.key), teacher(call)))):
        model.model(input_ids=torch.randint(0, 257, (1, 24)))
    (query, key), (absorbed_query, absorbed_key) = pairs[2]
    assert absorbed_key.shape == (1, 1, 24, 16 + 8) and absorbed_query.shape == (1, 4, 24, 16 + 8)
    torch.testing.assert_close(absorbed_query @ absorbed_key.transpose(-1, -2), query @ key.transpose(-1, -2),
                               rtol=1e-4, atol=1e-5)


def test_no_graph_under_no_grad():
    distillation = IndexerDistillation(build_tiny(initializer_range=0.2), "FSSF", kl_backend="torch", recall_rows=0)
    distillation.freeze()
    with torch.no_grad():
        loss, _ = distillation(torch.randint(0, 257, (1, 24)))
    assert not loss.requires_grad
