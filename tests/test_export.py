"""Export: the folder loads with plain transformers, in a process that never imports indexcache_train."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from indexcache_train import IndexCachePattern, apply_indexcache
from indexcache_train import export as export_module
from indexcache_train.export import export_indexcache, full_indexers, main, shared_indexer_prefixes
from indexcache_train.modeling import byte_tokenizer

PATTERN = "FSFS"
ARCHITECTURES = ("glm_moe_dsa", "deepseek_v32")
VARIANTS = ("single", "sharded", "no_base")  # base with one safetensors file, base with shards, no base
SHARED_PREFIXES = ("model.layers.1.self_attn.indexer.", "model.layers.3.self_attn.indexer.")
PATTERN_KEYS = ("index_topk_pattern", "indexer_types", "use_index_cache", "index_topk_freq", "index_skip_topk_offset")


def train(model, pattern=PATTERN):
    """Apply the pattern and move the F-layer indexers away from the base, as training would."""
    apply_indexcache(model, pattern)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for indexer in full_indexers(model).values():
            for param in indexer.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def trained_indexer_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": tensor.clone() for prefix, indexer in full_indexers(model).items()
            for key, tensor in indexer.state_dict().items()}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return tensors


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def assert_exported_tensors(export_dir: Path, base_dir: Path, trained: dict[str, torch.Tensor]):
    """No S-indexer tensor, the trained F-indexer tensors, every other tensor bitwise the base's."""
    exported, base = read_tensors(export_dir), read_tensors(base_dir)
    assert set(exported) == {key for key in base if not key.startswith(SHARED_PREFIXES)}
    assert set(trained) < set(exported)
    for key, tensor in exported.items():
        expected = trained[key].to(base[key].dtype) if key in trained else base[key]
        assert tensor.dtype == base[key].dtype and torch.equal(tensor, expected), key


# --------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per architecture: the saved base, the trained model, its trained F-indexer tensors and the exports."""
    root = tmp_path_factory.mktemp("exports")
    result = {}
    for arch in ARCHITECTURES:
        model = build_tiny(arch)
        base_state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
        model.save_pretrained(root / arch / "base")
        model.save_pretrained(root / arch / "base_sharded", max_shard_size="100KB")
        train(model)
        card = {"steps": 1000, "final kl": 0.0123}
        folders = {
            "single": export_indexcache(model, root / arch / "single", base_path=root / arch / "base", model_card=card),
            "sharded": export_indexcache(model, root / arch / "sharded", base_path=root / arch / "base_sharded"),
            "no_base": export_indexcache(model, root / arch / "no_base", tokenizer=byte_tokenizer()),
        }
        result[arch] = {"model": model, "base_dir": root / arch / "base", "base_state": base_state,
                        "folders": folders, "trained": trained_indexer_tensors(model)}
    return result


_PLAIN_LOAD = textwrap.dedent("""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    *folders, inputs_path, results_path = sys.argv[1:]
    input_ids = torch.load(inputs_path)
    results = {}
    for folder in folders:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        with torch.no_grad():
            logits = model.eval()(input_ids).logits
        results[folder] = dict(state=model.state_dict(), logits=logits, missing=sorted(info["missing_keys"]),
                               unexpected=sorted(info["unexpected_keys"]),
                               config={key: getattr(model.config, key, None) for key in {keys}})
    results["imported indexcache_train"] = "indexcache_train" in sys.modules
    torch.save(results, results_path)
""").replace("{keys}", repr(PATTERN_KEYS))


@pytest.fixture(scope="module")
def plain_loads(exports, tmp_path_factory):
    """Every export loaded by plain transformers in one subprocess that never imports indexcache_train."""
    root = tmp_path_factory.mktemp("plain")
    input_ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.save(input_ids, root / "inputs.pt")
    folders = [str(export["folders"][variant]) for export in exports.values() for variant in VARIANTS]
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *folders, root / "inputs.pt", root / "results.pt"],
                   check=True, cwd=root, capture_output=True)
    return torch.load(root / "results.pt"), input_ids


def test_plain_load_never_imports_indexcache_train(plain_loads):
    results, _ = plain_loads
    assert results["imported indexcache_train"] is False


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_safetensors_hold_trained_f_indexers_and_the_base_bitwise(exports, arch, variant):
    export = exports[arch]
    assert_exported_tensors(export["folders"][variant], export["base_dir"], export["trained"])


def test_sharded_index_names_every_tensor_once(exports):
    folder = exports["glm_moe_dsa"]["folders"]["sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    by_shard = {file.name: set(safe_open(file, framework="pt").keys()) for file in folder.glob("*.safetensors")}
    assert len(by_shard) > 1
    assert index["weight_map"] == {key: shard for shard, keys in by_shard.items() for key in keys}
    sizes = sum(t.numel() * t.element_size() for t in read_tensors(folder).values())
    assert index["metadata"]["total_size"] == sizes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_plain_transformers_load(exports, plain_loads, arch, variant):
    export, (results, input_ids) = exports[arch], plain_loads
    loaded = results[str(export["folders"][variant])]
    assert {key: loaded["config"][key] for key in PATTERN_KEYS} == IndexCachePattern(PATTERN).to_config_dict()
    state = loaded["state"]
    for key, tensor in state.items():
        if ".indexer." not in key:
            assert torch.equal(tensor, export["base_state"][key]), key
    for key, tensor in export["trained"].items():
        assert torch.equal(state[key], tensor), key
    if arch == "glm_moe_dsa":  # native sharing: S layers are built without indexers
        assert loaded["missing"] == loaded["unexpected"] == []
        assert set(state) == set(export["model"].state_dict())
        assert torch.equal(loaded["logits"], logits(export["model"], input_ids))
    else:  # no native sharing: transformers re-creates the S indexers at random
        assert loaded["missing"] and all(key.startswith(SHARED_PREFIXES) for key in loaded["missing"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepseek_reproduces_logits_after_apply_from_config(exports, plain_loads, variant):
    export, (_, input_ids) = exports["deepseek_v32"], plain_loads
    loaded = AutoModelForCausalLM.from_pretrained(export["folders"][variant]).eval()
    apply_indexcache(loaded, IndexCachePattern.from_config(loaded.config))
    assert set(loaded.state_dict()) == set(export["model"].state_dict())
    assert torch.equal(logits(loaded, input_ids), logits(export["model"], input_ids))


def test_folder_holds_base_files_tokenizer_and_model_card(exports):
    folders = exports["deepseek_v32"]["folders"]
    assert (folders["single"] / "generation_config.json").is_file()
    assert (folders["no_base"] / "tokenizer.json").is_file()
    card = (folders["single"] / "README.md").read_text()
    assert "`FSFS`" in card and "| final kl | 0.0123 |" in card and "| 0 | 1 |" in card
    assert "apply_indexcache(model, IndexCachePattern.from_config(model.config))" in card
    assert "apply_indexcache" not in (exports["glm_moe_dsa"]["folders"]["single"] / "README.md").read_text()


# --------------------------------------------------------------------------------------------- edge cases
def test_failed_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    model = build_tiny()
    model.save_pretrained(tmp_path / "base")
    train(model)
    output = export_indexcache(model, tmp_path / "export", base_path=tmp_path / "base", model_card={"steps": 1})
    before = {file.name: file.read_bytes() for file in output.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_indexcache(model, output, base_path=tmp_path / "base", model_card={"steps": 2})
    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_indexcache(model, output)
    assert {file.name: file.read_bytes() for file in output.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "export"]

    monkeypatch.undo()
    export_indexcache(model, output, base_path=tmp_path / "base", model_card={"steps": 2})
    assert "| steps | 2 |" in (output / "README.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "export"]


def test_trained_tensors_take_the_base_dtype(tmp_path):
    model = build_tiny()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    train(model.float())
    export_indexcache(model, tmp_path / "export", base_path=tmp_path / "base")
    assert_exported_tensors(tmp_path / "export", tmp_path / "base", trained_indexer_tensors(model))


def test_s_layers_must_have_lost_their_indexers():
    model = build_tiny("deepseek_v32")  # as transformers loads an export: pattern in config, S indexers present
    model.config.update(IndexCachePattern(PATTERN).to_config_dict())
    with pytest.raises(ValueError, match=r"Layers \[1, 3\] are S .* call `apply_indexcache"):
        export_indexcache(model, "unused")


def test_non_uniform_pattern_drops_a_stale_schedule(tmp_path):
    model = apply_indexcache(build_tiny(), "FSFS")  # uniform: the config gets index_topk_freq
    train(model, "FSFF")
    export_indexcache(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["index_topk_pattern"] == "FSFF" and "index_topk_freq" not in config


# --------------------------------------------------------------------------------------------- CLI
def make_run(run_dir: Path, model_section: dict, trained: dict[str, torch.Tensor], step: int = 10) -> Path:
    """A trainer output folder as the trainer writes it: run.json and checkpoints/step{N}/trainable.safetensors."""
    checkpoint = run_dir / "checkpoints" / f"step{step}"
    checkpoint.mkdir(parents=True)
    save_file(trained, checkpoint / "trainable.safetensors")
    run = {"model": model_section, "pattern": PATTERN, "step": step, "metrics": {"kl": 0.25}}
    (run_dir / "run.json").write_text(json.dumps(run))
    return checkpoint


def test_cli_exports_a_checkpoint_onto_its_base(tmp_path, model_type):
    model = build_tiny(model_type)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    trained = trained_indexer_tensors(train(model))
    checkpoint = make_run(tmp_path / "run", {"name_or_path": str(tmp_path / "base")}, trained)
    assert main([str(checkpoint)]) == tmp_path / "run" / "export"
    assert_exported_tensors(tmp_path / "run" / "export", tmp_path / "base", trained)
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "| step | 10 |" in card and "| kl | 0.25 |" in card
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["index_topk_pattern"] == PATTERN


def test_cli_exports_a_random_init_run(tmp_path):
    model = build_tiny("deepseek_v32")
    model.save_pretrained(tmp_path / "base")
    trained = trained_indexer_tensors(train(model))
    checkpoint = make_run(tmp_path / "run", {"random_init": {"model_type": "deepseek_v32"}, "dtype": "auto"}, trained)
    main([str(checkpoint), "--output", str(tmp_path / "out")])
    assert_exported_tensors(tmp_path / "out", tmp_path / "base", trained)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_cli_names_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and str(tmp_path / "nowhere") in capsys.readouterr().err

    checkpoint = tmp_path / "run" / "checkpoints" / "step5"
    checkpoint.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="trainable.safetensors is missing"):
        export_module.export_checkpoint(checkpoint)
    save_file({}, checkpoint / "trainable.safetensors")
    with pytest.raises(FileNotFoundError, match="run.json is missing"):
        export_module.export_checkpoint(checkpoint)


def test_cli_rejects_tensors_outside_the_f_indexers(tmp_path):
    model = build_tiny()
    model.save_pretrained(tmp_path / "base")
    trained = trained_indexer_tensors(train(model))
    shared = shared_indexer_prefixes(model)[0] + "wk.weight"
    checkpoint = make_run(tmp_path / "extra", {"name_or_path": str(tmp_path / "base")},
                          {**trained, shared: torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"not F-layer indexer tensors .*{shared}"):
        export_module.export_checkpoint(checkpoint)
    partial = {key: tensor for key, tensor in trained.items() if "layers.2." not in key}
    checkpoint = make_run(tmp_path / "partial", {"name_or_path": str(tmp_path / "base")}, partial)
    with pytest.raises(ValueError, match="lacks F-layer indexer tensors"):
        export_module.export_checkpoint(checkpoint)


# --------------------------------------------------------------------------------------------- distributed
def test_zero3_parameters_are_gathered_and_only_rank_zero_writes(tmp_path, monkeypatch):
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model = build_tiny()
    model.save_pretrained(tmp_path / "base")
    train(model)
    for param in model.parameters():
        param.ds_id = id(param)  # what ZeRO-3 partitioning marks its parameters with, and a released state
        param.ds_status = ZeroParamStatus.NOT_AVAILABLE
    gathered = []

    class RecordGather:
        def __init__(self, params, modifier_rank):
            assert modifier_rank is None  # read-only: nothing is scattered back
            self.params = params

        def __enter__(self):
            gathered.append(len(self.params))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", RecordGather)
    export_indexcache(model, tmp_path / "shards", base_path=tmp_path / "base")
    export_indexcache(model, tmp_path / "whole")
    indexer_params = sum(len(list(indexer.parameters())) for indexer in full_indexers(model).values())
    assert gathered == [indexer_params, len(list(model.parameters()))]

    monkeypatch.setattr(export_module, "rank", lambda: 1)
    export_indexcache(model, tmp_path / "rank1", base_path=tmp_path / "base")
    assert not (tmp_path / "rank1").exists()
