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
    config = dict(hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=8,
                  num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                  kv_lora_rank=8, q_lora_rank=8, v_head_dim=8, qk_nope_head_dim=8, index_topk=8, index_head_dim=8,
                  index_n_heads=2, index_kpool=4, linear_head_dim=8, linear_num_heads=2, hc_mult=2,
                  hc_sinkhorn_iters=2, vocab_size=64, pad_token_id=0, max_position_embeddings=128)
    config.update(text)
    torch.manual_seed(seed)
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32)
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
