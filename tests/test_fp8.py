"""FP8 bases on CPU: a block-quantised e4m3 checkpoint (weight_scale_inv per block, as DeepSeek-V3.2 ships)
loads dequantised into ZeRO-3 partitions and through transformers' FineGrainedFP8, and the export keeps its
FP8 shards byte for byte."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from indexcache_train import apply_indexcache
from indexcache_train.export import export_indexcache, trained_indexer_state
from indexcache_train.fp8 import quantization_config, resolve_route
from indexcache_train.modeling import load_model
from indexcache_train.zero import ZeroContext
from conftest import port

BLOCK = (16, 16)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 with one fp32 scale per BLOCK, the layout of DeepSeek-V3.2's checkpoint."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // BLOCK[0], BLOCK[0], cols // BLOCK[1], BLOCK[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return quantized, scale


def dequantized(weight, scale):
    return (weight.float().reshape(scale.shape[0], BLOCK[0], scale.shape[1], BLOCK[1])
            * scale[:, None, :, None]).reshape(weight.shape)


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory):
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("fp8_base")
    build_tiny("deepseek_v32").save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        quantizable = tensor.dim() == 2 and key.endswith((".proj.weight", "_proj.weight", "_mqa.weight",
                                                             ".wq_b.weight", ".wk.weight"))
        if quantizable and "weights_proj" not in key and all(n % b == 0 for n, b in zip(tensor.shape, BLOCK)):
            out[key], out[f"{key}_scale_inv"] = quantize(tensor)
        else:
            out[key] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (path / "config.json").write_text(json.dumps(config))
    return path, out


def test_without_kernels_auto_names_what_to_install(fp8_base):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fp8_base[0])
    if torch.cuda.is_available():
        pytest.skip("the kernels' absence is what this checks")
    with pytest.raises(RuntimeError, match="pip install kernels|model.fp8=dequantize"):
        resolve_route(config, "auto", zero3=False)
    with pytest.raises(ValueError, match="cannot partition"):
        resolve_route(config, "native", zero3=True)
    assert resolve_route(config, "auto", zero3=True) == "dequantize"
    # The native route keeps the indexers (trained) and kv_b_proj (read by the teacher) out of FP8.
    native = quantization_config(config, "native")
    assert {r".*\.indexer", r".*\.kv_b_proj"} <= set(native.modules_to_not_convert) and not native.dequantize


def test_zero3_dequantises_on_load_and_matches_transformers(fp8_base, monkeypatch):
    import deepspeed

    path, tensors = fp8_base
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    expected = dequantized(tensors[key], tensors[f"{key}_scale_inv"])

    plain = load_model(str(path), dtype="float32", fp8="dequantize", attn_implementation="sdpa")
    torch.testing.assert_close(plain.state_dict()[key], expected)  # transformers' FineGrainedFP8 route

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port(71)))):
        monkeypatch.setenv(name, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    context = ZeroContext({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                           "bf16": {"enabled": False}})
    partitioned = load_model(str(path), dtype="float32", fp8="auto", attn_implementation="sdpa")
    weight = partitioned.get_submodule(key.removesuffix(".weight")).weight
    assert hasattr(weight, "ds_id")
    with deepspeed.zero.GatheredParameters([weight]):
        torch.testing.assert_close(weight.detach().clone(), expected)
    del context


def test_export_keeps_the_fp8_shards_and_writes_bf16_indexers(fp8_base, tmp_path):
    from transformers import AutoModelForCausalLM

    path, tensors = fp8_base
    model = apply_indexcache(load_model(str(path), dtype="float32", fp8="dequantize",
                                        attn_implementation="sdpa"), "FSFS")
    trained = trained_indexer_state(model)
    export = export_indexcache(model, tmp_path / "export", base_path=path)
    written = load_file(export / "model.safetensors")
    for key, tensor in written.items():
        if key in trained:  # a trained tensor over an FP8 one is bf16, without its scales
            fp8 = tensors[key].dtype == torch.float8_e4m3fn
            assert tensor.dtype == (torch.bfloat16 if fp8 else tensors[key].dtype)
            assert f"{key}_scale_inv" not in written
        else:
            assert tensor.dtype == tensors[key].dtype  # every other tensor bit for bit, FP8 included
            assert torch.equal(tensor.view(torch.uint8), tensors[key].view(torch.uint8))
    assert any(t.dtype == torch.float8_e4m3fn for t in written.values())
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert r".*\.indexer" in config["quantization_config"]["modules_to_not_convert"]
    reloaded = AutoModelForCausalLM.from_pretrained(export)  # on a CPU transformers dequantises it
    name = next(k for k in trained if k.endswith("wq_b.weight"))
    torch.testing.assert_close(reloaded.state_dict()[name].float(), trained[name].to(torch.bfloat16).float())
