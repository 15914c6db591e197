"""The memory planner: the CLI's plan.json, and the activation estimate against a peak measured on CPU."""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from indexcache_train.config import compose_config
from indexcache_train.distill import IndexerDistillation
from indexcache_train.plan import (
    activation_peak,
    activation_terms,
    model_activation_terms,
)
from indexcache_train.plan_cli import run_plan


def test_plan_cli_writes_every_field(tmp_path):
    cfg = compose_config("plan", ["model=deepseek_v32_shape", "plan.world_size=16", "data.seq_len=32768",
                                  "distill.pattern=0.25", "deepspeed=zero3_offload", f"output_dir={tmp_path}"])
    plan = run_plan(cfg)
    written = json.loads((tmp_path / "plan.json").read_text())
    assert {"params_total", "params_trainable", "weights_gib_per_gpu", "optimizer_gib_per_gpu",
            "activations_gib_per_gpu", "total_gib_per_gpu", "fits"} <= set(written)
    assert 671e9 < written["params_total"] < 673e9 and written["params_trainable"] < 1e9
    # Offloaded partitions leave the one module gathered at a time: one MoE layer's fused experts, 21 GiB.
    assert 20 < written["weights_gib_per_gpu"] < 23 and plan.fits


class _HeapPeak(TorchDispatchMode):
    """The peak of glibc's in-use heap (mallinfo2) above its level on entry, read after every aten op outside
    the kernels' CPU fallbacks (`kernels/*._*_torch`): what the model and the trainer hold. The fallbacks'
    own gathered scratch blocks stand in for Triton kernels that keep theirs on chip, so they are not part of
    the GPU plan."""

    def __init__(self):
        super().__init__()
        self._libc = ctypes.CDLL("libc.so.6")

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                             "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._libc.mallinfo2.restype = Info
        self.base = self._in_use()
        self.peak = 0

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _in_kernel_fallback(sys._getframe(1)):
            self.peak = max(self.peak, self._in_use() - self.base)
        return out


def _in_kernel_fallback(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_name.endswith("_torch") and f"indexcache_train{os.sep}kernels" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _measured_step_peak(distillation: IndexerDistillation, input_ids: torch.Tensor) -> int:
    """The heap peak of one distillation step (forward, backward, zero_grad) above its level on entry."""
    def step():
        loss, _ = distillation(input_ids)
        loss.backward()
        distillation.zero_grad(set_to_none=True)

    step()  # warm-up: thread pools and the allocator's first arenas are not the step's
    with _HeapPeak() as heap:
        step()
    return heap.peak


def test_activation_estimate_is_close_to_the_measured_peak():
    """A small GlmMoeDsa in fp32 at L = 4096 on the sparse forward: one distillation step's peak above the
    weights, against the plan's activation terms with the CPU's top-k block (2^26)."""
    from conftest import build_tiny

    from indexcache_train.sparse_forward import use_sparse_forward

    shape = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "n_routed_experts": 8,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 256,
             "kv_lora_rank": 128, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64,
             "index_n_heads": 8, "index_head_dim": 64, "index_topk": 128, "max_position_embeddings": 8192}
    model = use_sparse_forward(build_tiny("glm_moe_dsa", **shape))
    terms = activation_terms(model.config, batch=1, seq_len=4096, act_bytes=4, logits_block=1 << 26)
    planned = activation_peak(terms)
    distillation = IndexerDistillation(model, "FSSS", stage="sparse", recall_rows=0)
    distillation.freeze()
    input_ids = torch.randint(0, 257, (1, 4096), generator=torch.Generator().manual_seed(0))
    measured = _measured_step_peak(distillation, input_ids)
    ratio = planned / measured
    print(f"planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert 0.85 < ratio < 1.15


# Small fp32 models of the reference-forward families, each at a length where its L^2 terms lead: Glm5Next's
# pooled indexer scores (8 layers: KDA and 2 indexed, FS), DeepSeek-V4's eager scores over the sliding tokens
# and the compressed entries (a sliding, two CSA and an HCA layer).
REFERENCE_FORWARD_SHAPES = {
    "glm5_next": (2048, "FS", {
        "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 128, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "v_head_dim": 32, "index_n_heads": 8, "index_head_dim": 32, "index_topk": 128,
        "index_kpool": 4, "linear_head_dim": 16, "linear_num_heads": 2, "max_position_embeddings": 4096}),
    "deepseek_v4": (1024, "FS", {
        "hidden_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
        "head_dim": 64, "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 64, "index_n_heads": 8,
        "index_head_dim": 32, "index_topk": 64, "sliding_window": 128, "max_position_embeddings": 4096,
        "mlp_layer_types": ["moe"] * 4,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                        "compressed_sparse_attention"]}),
}


@pytest.mark.parametrize("model_type", sorted(REFERENCE_FORWARD_SHAPES))
def test_reference_forward_estimate_is_close_to_the_measured_peak(model_type):
    """Glm5Next and DeepSeek-V4 on transformers' own forward, in fp32: one sparse-stage distillation step's
    peak above the weights, against the activation terms the planner takes for the family."""
    from indexcache_train.adapters import ADAPTERS
    from indexcache_train.modeling import model_from_config, tiny_config

    seq_len, pattern, shape = REFERENCE_FORWARD_SHAPES[model_type]
    torch.manual_seed(0)
    config = tiny_config(model_type, **shape)
    model = model_from_config(config, attn_implementation=ADAPTERS[model_type].native_attention).eval()
    terms = model_activation_terms(config, batch=1, seq_len=seq_len, act_bytes=4)
    distillation = IndexerDistillation(model, pattern, stage="sparse", recall_rows=0)
    distillation.freeze()
    input_ids = torch.randint(0, 257, (1, seq_len), generator=torch.Generator().manual_seed(0))
    measured = _measured_step_peak(distillation, input_ids)
    ratio = activation_peak(terms) / measured
    print(f"{model_type}: planned {activation_peak(terms) / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert 0.85 < ratio < 1.15


@pytest.mark.parametrize("model_type", ["glm5_next", "deepseek_v4"])
def test_plan_cli_plans_the_reference_forward_families_from_a_config(model_type, tmp_path):
    """transformers' default Glm5Next and DeepSeek-V4 configs (full-size shapes) as a config.json alone: the CLI
    builds them on the meta device and plans them with their own terms, whose leading one grows with L as
    the reference forward materialises it (KDA's chunks linearly, V4's eager scores quadratically), and
    neither fits an H200 at 32K tokens."""
    from transformers import DeepseekV4Config, Glm5NextConfig

    config = {"glm5_next": Glm5NextConfig, "deepseek_v4": DeepseekV4Config}[model_type]()
    config.save_pretrained(tmp_path / "config")
    leading, growth = {"glm5_next": ("linear", 2), "deepseek_v4": ("attention.eager", 4)}[model_type]

    def plan(seq_len):
        cfg = compose_config("plan", ["model=from_pretrained", f"model.name_or_path={tmp_path / 'config'}",
                                      f"data.seq_len={seq_len}", "distill.pattern=0.25", f"output_dir={tmp_path}"])
        run_plan(cfg)
        return json.loads((tmp_path / "plan.json").read_text())

    short, long = plan(16384), plan(32768)
    assert short["params_total"] > 1e11 and short["params_trainable"] > 0
    assert long["terms_gib"][leading] / short["terms_gib"][leading] == pytest.approx(growth, rel=0.05)
    # The leading term is most of the step's activations, at either length
    assert long["activations_gib_per_gpu"] / short["activations_gib_per_gpu"] == pytest.approx(growth, rel=0.1)
    assert not long["fits"]


def test_a_plan_that_does_not_fit_the_gpu_stops_the_run(monkeypatch):
    from types import SimpleNamespace

    from indexcache_train.modeling import tiny_config
    from indexcache_train.plan import check_run_plan

    cfg = compose_config("train", ["experiment=smoke", "data.seq_len=4096"])
    gpu = SimpleNamespace(total_memory=2**30)  # a 1 GiB GPU, with 2 GiB to keep free
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    with pytest.raises(RuntimeError, match="does not fit.*zero3_offload"):
        check_run_plan(cfg, tiny_config(), world_size=1, device=torch.device("cuda"), dtype_bytes=2)
    plan = check_run_plan(cfg, tiny_config(), world_size=1, device=torch.device("cpu"), dtype_bytes=4)
    assert plan.fits is None and "no GPU" in plan.table()


def test_plan_is_within_ten_percent_of_the_h200_step_peaks():
    """The H200 measurements in docs/results (a 4-layer DeepSeek-V3.2-shaped GlmMoeDsa, batch 1, FSSS, one
    sparse distillation step with its optimizer, `torch.cuda.max_memory_allocated`), against the plan."""
    from indexcache_train.benchmarking import dsv32_shaped_config
    from indexcache_train.plan import meta_model, plan_memory

    measured = json.loads((Path(__file__).parents[1] / "docs/results/bench_long_context_h200.json").read_text())
    model = meta_model(dsv32_shaped_config(max_position_embeddings=262144))
    for row in measured["rows"]:
        plan = plan_memory(model, world_size=1, seq_len=row["length"], micro_batch_size=1, pattern="FSSS",
                           zero_stage=0)
        assert plan.total_gib_per_gpu == pytest.approx(row["sparse_step"]["peak_gib"], rel=0.10)


def test_zero3_sizes_set_in_the_deepspeed_config_change_the_plan():
    """stage3_max_live_parameters, stage3_prefetch_bucket_size, stage3_param_persistence_threshold and
    reduce_bucket_size, set through deepspeed.config, replace DeepSpeed's defaults in the plan (bf16)."""
    from indexcache_train.plan import H200_GIB, Zero3Sizes, plan_from_config

    section = "zero_optimization"
    assert Zero3Sizes.from_deepspeed_config({section: {"stage3_prefetch_bucket_size": 0}}) == Zero3Sizes(
        prefetch_bucket=0)
    assert Zero3Sizes.from_deepspeed_config({section: {
        "stage3_max_live_parameters": 2e8, "stage3_prefetch_bucket_size": 1e6, "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": 1e8}}) == Zero3Sizes(2e8, 1e6, 0, 1e8)

    def plan(*overrides):
        cfg = compose_config("plan", ["model=glm5_shape", "plan.world_size=8", "data.seq_len=32768",
                                      "deepspeed=zero3_offload", *overrides])
        return plan_from_config(cfg, world_size=8, gpu_gib=H200_GIB)

    default = plan()
    smaller = plan(f"+deepspeed.config.{section}.reduce_bucket_size=1e8")
    gib = 2**30
    assert default.optimizer_gib_per_gpu - smaller.optimizer_gib_per_gpu == pytest.approx(2 * 4e8 / gib)
    # GLM-5's fused experts, 256 x 3 x 2048 x 6144 parameters a layer, are fetched whole whatever the limits;
    # being past stage3_max_live_parameters alone, nothing is prefetched while they run.
    assert default.terms_gib["weights.gathered"] * gib / 2 == 256 * 3 * 2048 * 6144


@pytest.mark.slow
def test_zero3_gathered_peak_replays_deepspeeds_fetch_schedule(tmp_path):
    """One ZeRO-3 rank distils a small MoE GlmMoeDsa with the prefetch limits scaled down, so that the
    prefetch crosses stage3_max_live_parameters on a whole expert tensor; the most parameters DeepSpeed held
    gathered at once equals the planner's replay of its schedule, which a max_live + largest-module bound
    would overshoot."""
    from conftest import build_tiny, port
    from indexcache_train.adapters import get_adapter
    from indexcache_train.modeling import byte_tokenizer
    from indexcache_train.pattern import IndexCachePattern
    from indexcache_train.plan import Zero3Sizes, meta_model, zero3_fetch_trace, zero3_gathered_peak

    base = tmp_path / "base"
    model = build_tiny("glm_moe_dsa", hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
                       n_routed_experts=32, num_experts_per_tok=2, num_hidden_layers=4, q_lora_rank=128,
                       kv_lora_rank=64, index_head_dim=32, index_n_heads=4, index_topk=16)
    model.save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    sizes = Zero3Sizes(max_live_parameters=2e6, prefetch_bucket=5e4, persistence_threshold=0)
    section = "+deepspeed.config.zero_optimization"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port(61))}
    command = [sys.executable, str(Path(__file__).parent / "zero3_gather_worker.py"), str(tmp_path / "report.json"),
               "experiment=smoke", f"model.name_or_path={base}", f"output_dir={tmp_path / 'run'}", "resume=null",
               "deepspeed=zero3", "data.batch_size=1", "data.seq_len=64", "data.max_records=20", "distill.pattern=0.25",
               "trainer.max_steps=3", "distill.dense_steps=1", "trainer.eval_batches=0", "trainer.save_every=3",
               "logger=disabled", f"{section}.stage3_param_persistence_threshold=0",
               f"{section}.stage3_max_live_parameters={sizes.max_live_parameters:.0f}",
               f"{section}.stage3_prefetch_bucket_size={sizes.prefetch_bucket:.0f}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "report.json").read_text())["gathered"]

    meta = meta_model(model.config)
    adapter = get_adapter(meta)
    trace = zero3_fetch_trace(meta, adapter, IndexCachePattern.coerce(0.25, adapter.num_layers(meta)),
                              persistence_threshold=0)
    planned = zero3_gathered_peak(trace, sizes)
    largest_module = max(sum(numel for _, numel in module) for module in trace)
    bound = sizes.max_live_parameters + largest_module
    print(f"gathered at once: {measured} measured, {planned} replayed, bound {bound:.0f}")
    assert planned == pytest.approx(measured, rel=0.02)
    assert bound > 1.2 * measured
