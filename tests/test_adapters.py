import pytest
import torch
from conftest import build_tiny

from indexcache_train import apply_indexcache, get_adapter
from indexcache_train.capture import attention_taps, capture_attention, capture_topk

PATTERN = "FSFS"


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_glm_matches_native_sharing(input_ids):
    """Our patched all-F model equals transformers' own GLM built with the same indexer_types."""
    native = build_tiny("glm_moe_dsa", seed=3, indexer_types=["full", "shared", "full", "shared"])
    ours = build_tiny("glm_moe_dsa", seed=4)
    missing, unexpected = ours.load_state_dict(native.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in k for k in missing) and missing
    apply_indexcache(ours, PATTERN)
    assert torch.equal(logits(ours, input_ids), logits(native, input_ids))
    assert set(ours.state_dict()) == set(native.state_dict())


def test_all_full_changes_nothing(model_type, input_ids):
    model = build_tiny(model_type)
    before = logits(model, input_ids)
    apply_indexcache(model, "F" * 4)
    assert torch.equal(logits(model, input_ids), before)


def test_sharing_changes_the_computation(model_type, input_ids):
    model = build_tiny(model_type)
    before = logits(model, input_ids)
    apply_indexcache(model, PATTERN)
    assert not torch.allclose(logits(model, input_ids), before)


def test_shared_layers_reuse_their_source_topk(model_type, input_ids):
    model = apply_indexcache(build_tiny(model_type), "FSSF")
    with capture_topk(model) as topk, torch.no_grad():
        model(input_ids)
    assert sorted(topk) == [0, 1, 2, 3]
    assert torch.equal(topk[1], topk[0]) and torch.equal(topk[2], topk[0])
    assert not torch.equal(topk[3], topk[0])
    assert topk[0].shape == (2, 40, 8)


def test_s_indexers_leave_the_module_tree_and_come_back(model_type, input_ids):
    model = build_tiny(model_type)
    full_keys = set(model.state_dict())
    before = logits(model, input_ids)
    apply_indexcache(model, PATTERN)
    keys = set(model.state_dict())
    assert not any(k.startswith(("model.layers.1.self_attn.indexer", "model.layers.3.self_attn.indexer")) for k in keys)
    assert any(k.startswith("model.layers.2.self_attn.indexer") for k in keys)
    assert model.config.index_topk_pattern == PATTERN and model.config.use_index_cache
    apply_indexcache(model, 1.0)  # back to all-F: the removed indexers return
    assert set(model.state_dict()) == full_keys
    assert torch.equal(logits(model, input_ids), before)


def test_pattern_from_ratio_and_bad_length(model_type):
    model = build_tiny(model_type)
    apply_indexcache(model, 0.5)
    assert model.config.index_topk_pattern == "FSFS"
    with pytest.raises(ValueError, match="5 characters, but the model has 4"):
        apply_indexcache(model, "FSFSF")


def test_unsupported_model_lists_supported_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="GlmMoeDsaForCausalLM, DeepseekV32ForCausalLM"):
        apply_indexcache(llama, "F")


def test_model_without_indexers_is_refused():
    model = build_tiny("glm_moe_dsa")
    for layer in model.model.layers:
        layer.self_attn.indexer = None
    with pytest.raises(ValueError, match="no lightning indexer"):
        apply_indexcache(model, "FSSS")


def test_f_layer_without_weights_is_refused():
    """A checkpoint exported with S layers cannot be turned back to F there."""
    model = build_tiny("glm_moe_dsa", indexer_types=["full", "shared", "full", "shared"])
    with pytest.raises(ValueError, match="Layer 1 is F"):
        apply_indexcache(model, "FFFF")


def test_indexer_projections_reproduce_the_native_scores(model_type, input_ids):
    """The differentiable q, k, w rebuild the exact scores the native indexer ranks."""
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    indexer = adapter.indexer(model, 2)
    seen = {}

    def grab(module, args, kwargs, output):
        seen["args"], seen["output"] = args, output

    handle = indexer.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    hidden, q_resid, position_embeddings, mask = seen["args"][:4]
    proj = adapter.indexer_projections(indexer, hidden, q_resid, position_embeddings)
    scores = torch.einsum("bthd,bsd->bths", proj.query, proj.key).relu()
    scores = torch.einsum("bth,bths->bts", proj.weights, scores).masked_fill(~mask, float("-inf"))
    native = seen["output"].long()
    ours = scores.topk(native.shape[-1], dim=-1).indices
    # Same selected scores (ties in the masked tail may pick different padding positions).
    assert torch.allclose(torch.gather(scores, -1, ours), torch.gather(scores, -1, native), atol=1e-5)
    assert torch.equal(ours[:, -1].sort(-1).values, native[:, -1].sort(-1).values)


def test_attention_tap_is_exact_and_sees_every_layer(model_type, input_ids):
    model = apply_indexcache(build_tiny(model_type), PATTERN)
    before = logits(model, input_ids)
    calls = []
    with attention_taps(model, calls.append):
        tapped = logits(model, input_ids)
    assert torch.equal(tapped, before)
    assert [c.layer for c in calls] == [0, 1, 2, 3]
    assert calls[0].query.shape == (2, 4, 40, 24) and calls[0].topk_indices.shape == (2, 40, 8)
    assert model.config._attn_implementation == "sdpa"


def test_capture_attention_rows_are_distributions(input_ids):
    model = build_tiny("glm_moe_dsa")
    with capture_attention(model, layers=[1]) as probs, torch.no_grad():
        model(input_ids)
    assert list(probs) == [1]
    assert torch.allclose(probs[1].sum(-1), torch.ones(2, 40))
    assert torch.all(probs[1].triu(1) == 0)
