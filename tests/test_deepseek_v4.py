"""DeepSeek-V4: the pattern runs over the compressed-sparse-attention (CSA) layers, whose indexers rank
compressed KV entries; S layers reuse their F layer's top-k of entries through a stand-in."""

import pytest
import torch
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
