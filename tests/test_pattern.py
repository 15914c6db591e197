import pytest

from indexcache_train import OFFICIAL_OFFSET, PAPER_OFFSET, IndexCachePattern
from indexcache_train.modeling import tiny_config


def test_parse_and_groups():
    pattern = IndexCachePattern.parse("FSSFSF")
    assert pattern.full_layers == [0, 3, 5]
    assert pattern.shared_layers == [1, 2, 4]
    assert pattern.groups == {0: [1, 2], 3: [4], 5: []}
    assert [pattern.source_layer(i) for i in range(6)] == [0, 0, 0, 3, 3, 5]
    assert pattern.retention == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text, message",
    [("", "empty"), ("FSX", "'X'"), ("fss", "only 'F'"), ("SFF", "layer 0"), ("F S", "' '")],
)
def test_malformed_patterns_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        IndexCachePattern.parse(text)


def test_length_must_match_the_model():
    with pytest.raises(ValueError, match="3 characters, but the model has 4"):
        IndexCachePattern.parse("FSS", num_layers=4)


def test_both_uniform_conventions():
    assert str(IndexCachePattern.uniform(10, 4, PAPER_OFFSET)) == "FSSSFSSSFS"
    assert str(IndexCachePattern.uniform(10, 4, OFFICIAL_OFFSET)) == "FFSSSFSSSF"
    assert str(IndexCachePattern.uniform(4, 1)) == "FFFF"


def test_from_ratio():
    assert str(IndexCachePattern.from_ratio(8, 0.25)) == "FSSSFSSS"
    assert str(IndexCachePattern.from_ratio(8, 1.0)) == "FFFFFFFF"
    assert IndexCachePattern.from_ratio(10, 0.3).full_layers == [0, 3, 6]
    with pytest.raises(ValueError, match="ratio"):
        IndexCachePattern.from_ratio(8, 0.0)


def test_with_shared_keeps_layer_zero():
    pattern = IndexCachePattern.all_full(4).with_shared(2)
    assert str(pattern) == "FFSF"
    with pytest.raises(ValueError, match="Layer 0"):
        pattern.with_shared(0)
    with pytest.raises(ValueError, match="already S"):
        pattern.with_shared(2)


@pytest.mark.parametrize(
    "keys, expected",
    [
        (dict(index_topk_pattern="FSFS"), "FSFS"),
        (dict(index_topk_freq=2, index_skip_topk_offset=1), "FSFS"),
        (dict(index_topk_freq=2, index_skip_topk_offset=2), "FFSF"),
        (dict(), "FFFF"),
    ],
)
@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32"])
def test_from_config_reads_every_convention(model_type, keys, expected):
    assert str(IndexCachePattern.from_config(tiny_config(model_type, **keys))) == expected


def test_from_config_reads_indexer_types():
    config = tiny_config("glm_moe_dsa", indexer_types=["full", "shared", "shared", "full"])
    assert str(IndexCachePattern.from_config(config)) == "FSSF"


def test_config_keys_round_trip():
    pattern = IndexCachePattern.uniform(8, 4, OFFICIAL_OFFSET)
    keys = pattern.to_config_dict()
    assert keys["index_topk_pattern"] == "FFSSSFSS"
    assert keys["indexer_types"][:3] == ["full", "full", "shared"]
    assert (keys["index_topk_freq"], keys["index_skip_topk_offset"], keys["use_index_cache"]) == (4, 2, True)
    for only in ("index_topk_pattern", "indexer_types"):
        config = tiny_config("deepseek_v32", num_hidden_layers=8, **{only: keys[only]})
        assert IndexCachePattern.from_config(config) == pattern
    irregular = IndexCachePattern.parse("FSFFSS").to_config_dict()
    assert "index_topk_freq" not in irregular


def test_coerce_accepts_every_form():
    assert str(IndexCachePattern.coerce("FSFS", 4)) == "FSFS"
    assert str(IndexCachePattern.coerce(0.5, 4)) == "FSFS"
    assert str(IndexCachePattern.coerce({"freq": 2}, 4)) == "FSFS"
    assert str(IndexCachePattern.coerce({"freq": 2, "offset": 2}, 4)) == "FFSF"
    with pytest.raises(ValueError, match="freq: N"):
        IndexCachePattern.coerce({"every": 2}, 4)
    with pytest.raises(ValueError, match="freq: N"):
        IndexCachePattern.coerce(True, 4)
