"""The inputs users got wrong: each fails early, in our own words, and leaves nothing written."""

import json

import pytest
from transformers import LlamaConfig

from indexcache_train import train
from indexcache_train.config import compose_config
from indexcache_train.modeling import tiny_config


def smoke_config(output_dir, *overrides):
    return compose_config("train", ["experiment=smoke", f"output_dir={output_dir}", *overrides])


def config_only_base(tmp_path, config):
    """A model folder holding config.json and nothing else: any check that needs the weights would fail on
    the missing files, so passing these tests proves the checks read the config alone."""
    base = tmp_path / "base"
    config.save_pretrained(base)
    return base


def test_a_non_dsa_model_is_named_from_its_config(tmp_path):
    base = config_only_base(tmp_path, LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                  num_attention_heads=4, vocab_size=300))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM|LlamaConfig.*supports transformers' DSA models, "
                                         r"GlmMoeDsaForCausalLM, DeepseekV32ForCausalLM"):
        train.train(smoke_config(tmp_path / "run", f"model.name_or_path={base}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("distill.pattern=FSXS", r"distill.pattern='FSXS'.*only 'F' \(full\) and 'S'"),
    ("distill.pattern=SFFF", r"starts with S"),
    ("distill.pattern=FSF", r"3 characters, but the model has 4"),
    ("trainer.lr=-1", r"trainer.lr=-1.0 is invalid: it must be a positive number"),
    ("trainer.min_lr_ratio=2", r"trainer.min_lr_ratio=2.0 is invalid"),
    ("data.seq_len=8", r"must exceed the model's index_topk"),
    ("trainer.memory_report_step=0", r"trainer.memory_report_step=0 is invalid: it must be a step from 1"),
    ("trainer.memory_report_step=1", r"traces CUDA memory; this run is on the CPU"),
])
def test_settings_are_checked_before_the_model_loads(tmp_path, override, message):
    base = config_only_base(tmp_path, tiny_config(index_topk=16))
    with pytest.raises(ValueError, match=message):
        train.train(smoke_config(tmp_path / "run", f"model.name_or_path={base}", override))
    assert not (tmp_path / "run").exists()


def test_a_mistyped_key_is_an_error_even_with_plus():
    with pytest.raises(ValueError, match=r"Unknown config key 'trainer.max_stepz'"):
        compose_config("train", ["experiment=smoke", "+trainer.max_stepz=3"])
    # Free-form sections still take any key.
    cfg = compose_config("train", ["+deepspeed.config.zero_optimization.reduce_bucket_size=1000"])
    assert cfg.deepspeed.config.zero_optimization.reduce_bucket_size == 1000


def test_a_data_file_without_either_field_names_the_override(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"body": "def f(): pass"}) + "\n")
    with pytest.raises(ValueError, match=r"data.text_field=\.\.\."):
        train.train(smoke_config(tmp_path / "run", "data=files", f"data.files=[{data}]", "data.seq_len=64"))
